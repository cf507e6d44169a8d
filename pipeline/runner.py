"""Run stages by name, in-process or as a subprocess, and ask DVC which ones are stale.

The Prefect flow and `python -m pipeline run` use this; it holds the orchestration logic so
that flows/ stays wiring. Training stages run as subprocesses because DDP launchers
re-execute the command line, which must never be a Prefect worker.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from pipeline import STAGES
from pipeline.artifacts import SUMMARY, read_json
from pipeline.errors import PipelineError

SUBPROCESS_STAGES = {"pretrain", "finetune"}
OUTPUT_PATH_KEY = {
    "ingest": "raw", "clean": "clean", "tokenizer": "tokenizer", "shard": "shards",
    "pretrain": "pretrain", "finetune": "finetune", "eval": "reports",
}


def run_stage(stage: str, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """Run one stage with the given Hydra overrides and return its summary."""
    from pipeline.cli import stage_module
    from pipeline.config import load

    cfg = load(overrides)
    if stage in SUBPROCESS_STAGES:
        proc = subprocess.run([sys.executable, "-m", "pipeline", stage, *overrides])
        if proc.returncode != 0:
            raise PipelineError(f"stage {stage} failed (exit {proc.returncode})")
        return read_json(Path(cfg.paths[OUTPUT_PATH_KEY[stage]]) / SUMMARY)
    return stage_module(stage).run(cfg)


def in_dvc_repo(cwd: Path | None = None) -> bool:
    cwd = Path(cwd or Path.cwd())
    return (cwd / ".dvc").is_dir() and (cwd / "dvc.yaml").is_file()


def dvc_stale(requested: list[str], cwd: Path | None = None) -> list[str]:
    """Requested stages that DVC reports changed, plus everything downstream of them.

    `dvc status` lists only stages whose own deps/params/outs changed; the pipeline is a
    chain, so a stale stage makes every later stage stale too.
    """
    proc = subprocess.run(
        [sys.executable, "-m", "dvc", "status", "--json", *requested], cwd=cwd, capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise PipelineError(f"dvc status failed: {proc.stderr.strip().splitlines()[-1:]}")
    changed = set(json.loads(proc.stdout or "{}"))
    first = min((STAGES.index(s) for s in changed if s in STAGES), default=None)
    if first is None:
        return []
    return [s for s in requested if STAGES.index(s) >= first]


def dvc_commit(stage: str, cwd: Path | None = None) -> None:
    """Record in dvc.lock what this run just produced, so `dvc repro` has nothing to redo."""
    proc = subprocess.run([sys.executable, "-m", "dvc", "commit", "-f", "-q", stage], cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise PipelineError(f"dvc commit {stage} failed: {proc.stderr.strip()}")


def plan(stages: list[str] | None, overrides: list[str]) -> tuple[list[str], bool]:
    """Which stages to run, and whether to record them in DVC.

    In a DVC repo with no overrides only stale stages run and each is committed; overrides
    make the run differ from conf/, so everything requested runs and dvc.lock is untouched.
    """
    requested = list(stages or STAGES)
    unknown = [s for s in requested if s not in STAGES]
    if unknown:
        raise PipelineError(f"unknown stage(s) {unknown}; expected some of {list(STAGES)}")
    requested = [s for s in STAGES if s in requested]
    if in_dvc_repo() and not overrides:
        return dvc_stale(requested), True
    return requested, False


def summary_markdown(summary: dict) -> str:
    """A readable table of a stage summary's scalar fields, for the Prefect UI."""
    rows = [
        f"| {k} | {v} |"
        for k, v in summary.items()
        if k not in ("config", "inputs") and not isinstance(v, (dict, list))
    ]
    body = "\n".join(["| field | value |", "| --- | --- |", *rows])
    return f"### Stage `{summary.get('stage')}`\n\n{body}\n"
