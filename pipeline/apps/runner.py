"""Run stages by name, in-process or as a subprocess, and ask DVC which ones are stale.

The Prefect flow and `python -m pipeline run` use this; it holds the orchestration logic so
that flows/ stays wiring. Training stages run as subprocesses because DDP launchers
re-execute the command line, which must never be a Prefect worker.
"""

from __future__ import annotations

import importlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from pipeline.core.artifacts import SUMMARY, read_json
from pipeline.core.config import load, train_settings
from pipeline.core.errors import PipelineError
from pipeline.core.lock import child_env, workspace_lock
from pipeline.stages import registry


def run_stage(stage: str, overrides: list[str] | tuple[str, ...] = (), timeout: float | None = None) -> dict:
    """Run one stage with the given Hydra overrides and return its summary.

    Holds the workspace lock of `paths.root` (re-entrant: the flow already holds it).
    Training stages run as a subprocess (`launch_command`). When this process is stopped
    (SIGTERM, Ctrl-C) or `timeout` seconds pass, the subprocess gets SIGTERM, saves a
    checkpoint and exits; after `executor.stop_grace` seconds it is killed.
    """
    spec = registry.get(stage)
    cfg = load(overrides)
    with workspace_lock(cfg.paths.root, what=f"stage {stage}"):
        if spec.subprocess:
            cmd = launch_command(cfg, stage, list(overrides))
            grace = float(cfg.executor.get("stop_grace", 120))
            proc = subprocess.Popen(cmd, env=child_env(cfg.paths.root))
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                stop_child(proc, grace)
                raise PipelineError(f"stage {stage} timed out after {timeout:g}s: {shlex.join(cmd)}") from None
            except BaseException:
                stop_child(proc, grace)
                raise
            if rc != 0:
                stopped = rc < 0 or rc in (128 + signal.SIGTERM, 128 + signal.SIGINT, 128 + signal.SIGUSR1)
                why = " (stopped by a signal; its checkpoint is kept and a rerun resumes)" if stopped else ""
                raise PipelineError(f"stage {stage} failed (exit {rc}){why}: {shlex.join(cmd)}")
            return read_json(Path(cfg.paths[spec.output]) / SUMMARY)
        return stage_module(stage).run(cfg)


def stop_child(proc: subprocess.Popen, grace: float) -> None:
    """SIGTERM (a training stage saves a checkpoint and exits), then SIGKILL after `grace` s."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def stage_module(name: str):
    """The module of a stage's entry point, `run(cfg) -> summary`."""
    return importlib.import_module(registry.get(name).module)


def launch_command(cfg, stage: str, overrides: list[str], environ: dict | None = None) -> list[str]:
    """The command line that runs a training stage: plain python, `torchrun` or `srun`.

    `executor.launcher` picks it; `auto` uses `srun` inside a SLURM allocation when the stage
    wants several nodes (srun starts one task per GPU on every node and Lightning reads the
    SLURM variables), `torchrun` when it wants several nodes elsewhere (started on this
    node; every other node runs the same command with its own NODE_RANK), and a plain
    subprocess otherwise. DDP launchers re-execute the command line, which is why this is
    never the Prefect worker process itself.
    """
    environ = os.environ if environ is None else environ
    tc = train_settings(cfg, stage)
    ex = cfg.get("executor") or {}
    nodes = int(tc.get("num_nodes", 1) or 1)
    launcher = str(ex.get("launcher", "auto") or "auto")
    if launcher == "auto":
        launcher = ("srun" if "SLURM_JOB_ID" in environ else "torchrun") if nodes > 1 else "python"
    module = ["-m", "pipeline", stage, *overrides]
    if launcher == "python":
        return [sys.executable, *module]
    devices = tc.get("devices", 1)
    per_node = int(devices) if str(devices).lstrip("-").isdigit() and int(devices) > 0 else None
    if launcher == "torchrun":
        if per_node is None:  # devices: -1 / auto = every GPU of the node
            per_node_arg = "gpu" if str(tc.get("accelerator", "")) in ("gpu", "cuda") else "1"
        else:
            per_node_arg = str(per_node)
        endpoint = ex.get("rdzv_endpoint") or (
            f"{environ.get('MASTER_ADDR', '127.0.0.1')}:{environ.get('MASTER_PORT', '29500')}"
        )
        torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
        return [
            torchrun, f"--nnodes={nodes}", f"--nproc-per-node={per_node_arg}",
            f"--node-rank={environ.get('NODE_RANK', '0')}", "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}",
            f"--rdzv-id={ex.get('rdzv_id') or 'pipeline-' + stage}", *module,
        ]
    if launcher == "srun":
        tasks = [f"--ntasks-per-node={per_node}"] if per_node else []
        return ["srun", f"--nodes={nodes}", *tasks, *shlex.split(str(ex.get("srun_args") or "")), sys.executable, *module]
    raise PipelineError(f"unknown executor.launcher {launcher!r} (expected auto, python, torchrun or srun)")


def in_dvc_repo(cwd: Path | None = None) -> bool:
    cwd = Path(cwd or Path.cwd())
    return (cwd / ".dvc").is_dir() and (cwd / "dvc.yaml").is_file()


def dvc_usable(cwd: Path | None = None) -> tuple[bool, str]:
    """Whether DVC can say what is stale here, and if not, why (for the run's log).

    DVC needs git unless `.dvc/config` sets `core.no_scm`: an exported tree (a release
    tarball, a downloaded zip) has `.dvc/` and `dvc.yaml` but no git.
    """
    cwd = Path(cwd or Path.cwd())
    if not in_dvc_repo(cwd):
        return False, f"{cwd} is not a DVC project (no .dvc/ and dvc.yaml)"
    dvc_config = cwd / ".dvc" / "config"
    no_scm = dvc_config.is_file() and "no_scm = true" in dvc_config.read_text().replace("no_scm=true", "no_scm = true")
    if no_scm:
        return True, ""
    try:
        inside = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=cwd, capture_output=True, text=True)
    except OSError:
        return False, "git is not installed, and DVC needs it (or core.no_scm) to track stages"
    if inside.returncode != 0:
        return False, (f"{cwd} has dvc.yaml but is not a git checkout (an exported tree?), and DVC needs git: "
                       "every requested stage runs and dvc.lock is left alone")
    return True, ""


def dvc_stale(requested: list[str], cwd: Path | None = None) -> list[str]:
    """Requested stages that DVC reports changed, plus every stage downstream of them.

    `dvc status` lists only stages whose own deps/params/outs changed; a stage that reads a
    changed stage's output is stale too.
    """
    proc = subprocess.run(
        [sys.executable, "-m", "dvc", "status", "--json", *requested], cwd=cwd, capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise PipelineError(f"dvc status failed: {proc.stderr.strip().splitlines()[-1:]}")
    changed = [s for s in json.loads(proc.stdout or "{}") if s in registry.NAMES]
    stale = set(registry.downstream(changed))
    return [s for s in requested if s in stale]


def dvc_commit(stage: str, cwd: Path | None = None) -> None:
    """Record in dvc.lock what this run just produced, so `dvc repro` has nothing to redo."""
    proc = subprocess.run([sys.executable, "-m", "dvc", "commit", "-f", "-q", stage], cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise PipelineError(f"dvc commit {stage} failed: {proc.stderr.strip()}")


def plan(stages: list[str] | None, overrides: list[str], force: bool = False) -> tuple[list[str], bool, str]:
    """Which stages to run, whether to record them in DVC, and why (one line for the log).

    In a DVC repo with no overrides only stale stages run and each is committed; overrides
    make the run differ from conf/, so everything requested runs and dvc.lock is untouched.
    `force` runs every requested stage (still committed when there are no overrides: the
    outputs come from conf/ as it is, e.g. a re-crawl of a site that changed).
    """
    requested = list(stages or registry.NAMES)
    unknown = [s for s in requested if s not in registry.NAMES]
    if unknown:
        raise PipelineError(f"unknown stage(s) {unknown}; expected some of {list(registry.NAMES)}")
    requested = [s for s in registry.NAMES if s in requested]
    if overrides:
        return requested, False, "overrides differ from conf/: every requested stage runs, dvc.lock is left alone"
    usable, why = dvc_usable()
    if not usable:
        return requested, False, why
    if force:
        return requested, True, "forced: every requested stage runs and is recorded in dvc.lock"
    return dvc_stale(requested), True, "DVC says which stages are stale; each is recorded in dvc.lock"


def summary_markdown(summary: dict) -> str:
    """A readable table of a stage summary's scalar fields, for the Prefect UI."""
    rows = [
        f"| {k} | {v} |"
        for k, v in summary.items()
        if k not in ("config", "inputs") and not isinstance(v, (dict, list))
    ]
    body = "\n".join(["| field | value |", "| --- | --- |", *rows])
    return f"### Stage `{summary.get('stage')}`\n\n{body}\n"
