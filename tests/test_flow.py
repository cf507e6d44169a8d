"""The Prefect flow against a real (temporary) Prefect server: tasks run, artifacts published."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml


@pytest.fixture(scope="module")
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


def test_flow_runs_stages_and_publishes_summaries(prefect_server, clean_corpus):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from flows.build import build_model

    overrides = [f"paths.root={clean_corpus}", "tokenizer.vocab_size=512", "shard.val_fraction=0.25"]
    result = build_model(overrides=overrides, stages=["tokenizer", "shard"])
    assert list(result) == ["tokenizer", "shard"]
    assert result["shard"]["val_docs"] > 0
    assert (clean_corpus / "data" / "shards" / "index.json").is_file()

    async def read(key):
        async with get_client() as client:
            return await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))

    import asyncio

    for stage in ("tokenizer", "shard"):
        arts = asyncio.run(read(f"{stage}-summary"))
        assert arts, f"no artifact for {stage}"
        assert f"Stage `{stage}`" in arts[0].data


def test_flow_rejects_unknown_stage(prefect_server, tmp_path):
    from flows.build import build_model
    from pipeline.errors import PipelineError

    with pytest.raises(PipelineError, match="unknown stage"):
        build_model(overrides=[f"paths.root={tmp_path}"], stages=["nope"])


def test_prefect_yaml_has_a_scheduled_deployment_of_the_flow():
    spec = yaml.safe_load((Path(__file__).parent.parent / "prefect.yaml").read_text())
    dep = spec["deployments"][0]
    module, func = dep["entrypoint"].split(":")
    import importlib

    flow_obj = getattr(importlib.import_module(module), func)
    assert flow_obj.name == "build-model"
    assert dep["schedules"][0]["cron"].count(" ") == 4
    from prefect.client.schemas.schedules import CronSchedule

    CronSchedule(cron=dep["schedules"][0]["cron"])  # parses
