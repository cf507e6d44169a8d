"""Prefect flow `build-model`: the stages as tasks, each publishing its summary as an artifact.

Wiring only: every task calls `pipeline.runner.run_stage`, the same entry point as the CLI
and dvc.yaml.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from pipeline import runner

# network stages retry; training resumes from its last checkpoint when retried
RETRIES = {"ingest": 2, "pretrain": 1, "finetune": 1}


@task(cache_policy=NO_CACHE, retry_delay_seconds=10)
def stage_task(stage: str, overrides: list[str]) -> dict:
    summary = runner.run_stage(stage, overrides)
    create_markdown_artifact(
        key=f"{stage}-summary", markdown=runner.summary_markdown(summary), description=f"{stage} stage summary"
    )
    if stage == "eval" and summary.get("report_md"):
        report = Path(summary["report_md"])
        if report.is_file():
            create_markdown_artifact(key="evaluation-report", markdown=report.read_text(), description="evaluation report")
    return {k: v for k, v in summary.items() if k not in ("config", "inputs")}


@flow(name="build-model")
def build_model(overrides: list[str] | None = None, stages: list[str] | None = None) -> dict:
    """Run the pipeline; in a DVC repo without overrides, only stale stages (then `dvc commit`)."""
    overrides = list(overrides or [])
    logger = get_run_logger()
    todo, record = runner.plan(stages, overrides)
    logger.info("stages to run: %s%s", todo or "none (up to date)", " (recorded in dvc.lock)" if record else "")
    results = {}
    for stage in todo:
        results[stage] = stage_task.with_options(name=stage, retries=RETRIES.get(stage, 0))(stage, overrides)
        if record:
            runner.dvc_commit(stage)
    return results
