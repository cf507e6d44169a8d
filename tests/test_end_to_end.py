"""The whole default pipeline through `python -m pipeline run` (the Prefect flow), lighter eval."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import DEFAULT_LIGHT_EVAL, overrides, run_cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("e2e")
    proc = run_cli("run", *overrides(root, DEFAULT_LIGHT_EVAL), timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return root


def test_every_artifact_is_there(built):
    for rel in [
        "data/raw", "data/clean", "data/tokenizer", "data/shards", "models/pretrain", "models/finetune", "reports",
    ]:
        summary = json.loads((built / rel / "_summary.json").read_text())
        assert summary["config"]["paths"]["root"] == str(built)
        assert summary["seconds"] >= 0
    assert list((built / "data/raw").glob("part-*.parquet"))
    funnel = json.loads((built / "data/clean/funnel.json").read_text())
    assert funnel["in"] == funnel["kept"] + sum(funnel["rejected"].values())
    assert funnel["kept"] > 10
    assert (built / "data/tokenizer/tokenizer.json").is_file()
    index = json.loads((built / "data/shards/index.json").read_text())
    assert index["splits"]["train"]["tokens"] > 0 and index["splits"]["val"]["tokens"] > 0
    for run in ("pretrain", "finetune"):
        assert (built / "models" / run / "checkpoints" / "last.ckpt").is_file()
        assert (built / "models" / run / "metrics.csv").is_file()
        assert (built / "models" / run / "hf" / "config.json").is_file()
    assert (built / "models/finetune/sft/heldout.jsonl").is_file()
    for name in ("report.md", "report.html", "metrics.json"):
        assert (built / "reports" / name).stat().st_size > 0


def test_pretrained_model_beats_the_ngram_baseline(built):
    metrics = json.loads((built / "reports/metrics.json").read_text())
    pre, ngram = metrics["pretrain"]["val_bpb"], metrics["ngram"]["val_bpb"]
    assert 0 < pre < ngram, (pre, ngram)
    for model in ("pretrain", "finetune"):
        for key in ("val_bpb", "val_ppl", "bleu", "rougeL"):
            assert metrics[model][key] >= 0
    assert metrics["finetune"]["val_bpb"] > 0


def test_data_artifacts_are_byte_identical_on_rerun(built, tmp_path):
    from pipeline.core.artifacts import hash_tree

    for stage in ("ingest", "clean", "tokenizer", "shard"):
        proc = run_cli(stage, *overrides(tmp_path, DEFAULT_LIGHT_EVAL))
        assert proc.returncode == 0, proc.stderr[-3000:]
    for rel in ("data/raw", "data/clean", "data/tokenizer", "data/shards"):
        assert hash_tree(tmp_path / rel) == hash_tree(built / rel), rel


def test_generate_samples_from_the_latest_model(built):
    proc = run_cli("generate", "--prompt", "The json module", "--max-new-tokens", "12", f"paths.root={built}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip()
