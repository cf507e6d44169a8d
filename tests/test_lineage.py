"""`python -m pipeline lineage` on a workspace built by the real stages (files -> ... -> a micro model)."""

from __future__ import annotations

import json
import pydoc
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.core.config import load
from tests.conftest import run_cli
from tests.fixtures import MICRO, MODULES


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    from pipeline.stages import clean, ingest, pretrain, shard, tokenizer

    root = tmp_path_factory.mktemp("lineage")
    corpus = root / "corpus"
    corpus.mkdir()
    with open(corpus / "docs.jsonl", "w") as f:
        for name in MODULES:
            f.write(json.dumps({"text": pydoc.render_doc(__import__(name), renderer=pydoc.plaintext)}) + "\n")
        f.write(json.dumps({"text": "far too short"}) + "\n")
    cfg = load([f"paths.root={root}", "source=files", f"source.paths=[{corpus}]", "source.rows_per_shard=6",
                "tokenizer.vocab_size=400", "shard.val_fraction=0.25", *MICRO, "pretrain.max_steps=4",
                "pretrain.val_every=2"])
    for stage in (ingest, clean, tokenizer, shard, pretrain):
        stage.run(cfg)
    return root


def _lineage(root: Path, target: str) -> dict:
    proc = run_cli("lineage", target, "--json", f"paths.root={root}")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _clean_row(root: Path, n: int = 0) -> dict:
    return pq.read_table(root / "data" / "clean" / "part-00000.parquet").slice(n, 1).to_pylist()[0]


def test_document_traced_to_its_source_filters_token_file_and_model(workspace):
    row = _clean_row(workspace)
    rep = _lineage(workspace, row["id"][:12])  # a unique prefix is enough
    assert rep["kind"] == "document"
    raw = rep["raw"][0]
    assert raw["id"] == row["raw_id"] and raw["shard"].startswith("data/raw/part-")
    assert raw["source"] == "files"
    schema = pq.read_schema(next((workspace / "data" / "raw").glob("*.parquet"))).names
    for col in set(schema) - {"text", "html"}:  # every provenance column ingest writes is shown
        assert col in raw
    if "source_file" in schema:
        assert raw["source_file"].endswith("docs.jsonl")
    assert rep["filters"]["decision"] == "kept" and "MinLength" in rep["filters"]["passed"]
    (clean,) = rep["clean"]
    assert clean["id"] == row["id"] and clean["split"] in ("train", "val")
    assert clean["token_files"] and all(f.startswith(f"data/shards/{clean['split']}/") for f in clean["token_files"])
    assert [m["model"] for m in rep["fed"]] == ["models/pretrain"]
    assert rep["fed"][0]["inputs"]["shards"]["matches_disk"] is True


def test_document_found_by_url(workspace):
    row = _clean_row(workspace, 1)
    rep = _lineage(workspace, row["url"])
    assert [c["id"] for c in rep["clean"]] == [row["id"]]


def test_rejected_document_names_the_step_and_reason(workspace):
    rejected = pq.read_table(workspace / "data" / "clean" / "rejected").to_pylist()
    short = next(r for r in rejected if r["reason"] != "duplicate")
    rep = _lineage(workspace, short["id"])
    assert rep["filters"]["decision"] == "rejected"
    assert rep["filters"]["reason"] == short["reason"] and rep["filters"]["step"] == short["step"]
    assert "clean" not in rep and "fed" not in rep


def test_shards_trace_both_ways(workspace):
    raw_rep = _lineage(workspace, "data/raw/part-00000.parquet")
    assert raw_rep["kind"] == "raw_shard" and raw_rep["rows"] == 6
    assert raw_rep["clean_shards"] and raw_rep["token_files"]
    assert raw_rep["sources"]["files"]["documents"] == 6

    index = json.loads((workspace / "data" / "shards" / "index.json").read_text())
    name = index["splits"]["train"]["files"][0]["name"]
    tok_rep = _lineage(workspace, str(workspace / "data" / "shards" / name))
    assert tok_rep["kind"] == "token_file" and tok_rep["from_clean"] and tok_rep["from_raw"]
    assert "MinLength" in tok_rep["filters"] and tok_rep["fed"][0]["model"] == "models/pretrain"


def test_checkpoint_traced_to_shards_filters_and_sources(workspace):
    rep = _lineage(workspace, "models/pretrain/checkpoints/last.ckpt")
    assert rep["kind"] == "checkpoint"
    assert rep["models"][0]["model"] == "models/pretrain" and rep["models"][0]["steps"] == 4
    assert {f["file"].split("/")[2] for f in rep["token_files"]} == {"train", "val"}
    n_raw = len(list((workspace / "data" / "raw").glob("*.parquet")))
    assert len(rep["raw_shards"]) == n_raw
    assert rep["filters"]["in"] == len(MODULES) + 1 and rep["filters"]["rejected"]
    assert rep["sources"]["files"]["config"]["kind"] == "files"

    text = run_cli("lineage", "models/pretrain", f"paths.root={workspace}")
    assert text.returncode == 0 and "kind: checkpoint" in text.stdout and "raw_shards:" in text.stdout


def test_unknown_target_is_a_one_line_error(workspace):
    proc = run_cli("lineage", "0123456789abcdef", f"paths.root={workspace}")
    assert proc.returncode == 2
    assert "no document, shard or checkpoint matches '0123456789abcdef'" in proc.stderr
