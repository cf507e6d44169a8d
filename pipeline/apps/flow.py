"""Prefect flow `build-model`: the registry's stages as tasks, each publishing its summary
as an artifact.

Every task calls `pipeline.apps.runner.run_stage`, the same entry point as the CLI and
dvc.yaml; retries and timeouts come from the stage registry. `flows/build.py` only
re-exports the flow for `prefect.yaml`. The flow holds the workspace lock of `paths.root` from planning to the last
`dvc commit`, so two runs on one workspace never interleave (see pipeline/lock.py).
"""

from __future__ import annotations

import time
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from pipeline.apps import runner
from pipeline.core.config import load
from pipeline.core.lock import workspace_lock
from pipeline.stages import registry

# the report stage: its Markdown report is published as an artifact too, also when it fails
REPORT_STAGE = next(s.name for s in registry.STAGES if s.output == "reports")


def _publish_report(overrides: list[str], since: float, failed: bool = False) -> None:
    """The evaluation report as the `evaluation-report` artifact, when this run wrote it; a run
    stopped by the release gate still publishes its FAILED report, so operators see why."""
    report = Path(load(overrides).paths.reports) / "report.md"
    if report.is_file() and report.stat().st_mtime >= since:
        create_markdown_artifact(key="evaluation-report", markdown=report.read_text(),
                                 description="evaluation report" + (" (the stage failed)" if failed else ""))


@task(cache_policy=NO_CACHE, retry_delay_seconds=10)
def stage_task(stage: str, overrides: list[str], timeout: float | None = None) -> dict:
    started = time.time() - 1
    try:
        summary = runner.run_stage(stage, overrides, timeout=timeout)
    except Exception:
        if stage == REPORT_STAGE:
            _publish_report(overrides, started, failed=True)
        raise
    create_markdown_artifact(
        key=f"{stage}-summary", markdown=runner.summary_markdown(summary), description=f"{stage} stage summary"
    )
    if stage == REPORT_STAGE:
        _publish_report(overrides, started)
    return {k: v for k, v in summary.items() if k not in ("config", "inputs")}


@flow(name="build-model")
def build_model(
    overrides: list[str] | None = None,
    stages: list[str] | None = None,
    force: bool = False,
    timeouts: dict[str, float] | None = None,
    lock_wait: float | None = None,
) -> dict:
    """Run the pipeline; in a DVC repo without overrides, only stale stages (then `dvc commit`).

    `overrides`: Hydra overrides (a run with overrides never touches dvc.lock). `stages`: a
    subset to run. `force`: run the requested stages even when DVC says they are up to date
    (an incremental crawl re-fetches the site). `lock_wait`: seconds to wait for another run
    on the same workspace (default $PIPELINE_LOCK_WAIT, else fail at once).
    """
    overrides = list(overrides or [])
    limits = {**{s.name: s.timeout for s in registry.STAGES}, **(timeouts or {})}
    logger = get_run_logger()
    root = load(overrides).paths.root
    with workspace_lock(root, wait=lock_wait, what="flow build-model"):
        todo, record, why = runner.plan(stages, overrides, force=force)
        logger.info("stages to run: %s (%s)", todo or "none (up to date)", why)
        results = {}
        for stage in todo:
            limit = limits.get(stage) or None
            results[stage] = stage_task.with_options(
                name=stage, retries=registry.get(stage).retries, timeout_seconds=limit
            )(stage, overrides, limit)
            if record:
                runner.dvc_commit(stage)
    return results
