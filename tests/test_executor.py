"""executor=dask gives byte-identical data outputs to the local executor (a real LocalCluster)."""

from __future__ import annotations

import json
import pydoc
from pathlib import Path

import pytest

from pipeline.core.config import load
from pipeline.core.errors import PipelineError
from pipeline.core.executor import map_ordered
from tests.conftest import CORPUS_MODULES

pytest.importorskip("dask.distributed", reason="executor=dask needs the [dask] extra (installed by [dev])")


def _square(x: int) -> int:
    return x * x


def _tree(root: Path) -> dict[str, bytes]:
    """Every file's bytes except the summaries (they hold timings and the executor's config)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != "_summary.json"}


def _summary(root: Path) -> dict:
    data = json.loads((root / "_summary.json").read_text())
    return {k: v for k, v in data.items() if k not in ("seconds", "config", "config_sha256", "inputs", "code_version")}


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    """A raw corpus of several Parquet shards, written by the real ingest stage."""
    from pipeline.stages import ingest

    base = tmp_path_factory.mktemp("exec")
    corpus = base / "corpus"
    corpus.mkdir()
    for name in CORPUS_MODULES:
        (corpus / f"{name}.txt").write_text(pydoc.render_doc(__import__(name), renderer=pydoc.plaintext))
    (corpus / "short.txt").write_text("too short")  # a rejection, so rejected/ is compared too
    (corpus / "copy.txt").write_text((corpus / "json.txt").read_text())  # a duplicate
    cfg = load([f"paths.root={base / 'local'}", "source=files", f"source.paths=[{corpus}]",
                "source.rows_per_shard=4"])
    ingest.run(cfg)
    return base


def _run(stage: str, base: Path, root: str, executor: list[str]) -> Path:
    from pipeline.apps.runner import stage_module

    cfg = load([f"paths.root={base / root}", f"paths.raw={base / 'local' / 'data' / 'raw'}",
                "shard.val_fraction=0.2", "tokenizer.vocab_size=512", *executor])
    stage_module(stage).run(cfg)
    return Path(cfg.paths[{"clean": "clean", "shard": "shards", "tokenizer": "tokenizer"}[stage]])


def test_dask_outputs_are_byte_identical_to_local(raw):
    local = ["executor=local", "executor.workers=2"]
    dask = ["executor=dask", "executor.workers=2"]
    assert len(list((raw / "local" / "data" / "raw").glob("*.parquet"))) >= 4  # something to fan out

    clean_local = _run("clean", raw, "local", local)
    clean_dask = _run("clean", raw, "dask", dask)
    assert _tree(clean_local) == _tree(clean_dask)
    assert _summary(clean_local)["kept"] > 0
    # lineage in the summary names input shards by file name, so it matches too
    assert _summary(clean_local) == _summary(clean_dask)

    # the tokenizer is trained once (it is not a fan-out stage); shard both ways from the same one
    tok = _run("tokenizer", raw, "local", local)
    (raw / "dask" / "data" / "tokenizer").symlink_to(tok, target_is_directory=True)
    shards_local = _run("shard", raw, "local", local)
    shards_dask = _run("shard", raw, "dask", dask)
    assert _tree(shards_local).keys() == _tree(shards_dask).keys()
    for name, blob in _tree(shards_local).items():
        if name != "index.json":
            assert blob == _tree(shards_dask)[name], name
    idx_local = json.loads((shards_local / "index.json").read_text())
    idx_dask = json.loads((shards_dask / "index.json").read_text())
    for split in ("train", "val"):
        assert [f["sha256"] for f in idx_local["splits"][split]["files"]] == \
            [f["sha256"] for f in idx_dask["splits"][split]["files"]]
        assert idx_local["splits"][split]["tokens"] == idx_dask["splits"][split]["tokens"] > 0


def test_dask_map_keeps_order_and_reports_a_missing_scheduler():
    cfg = {"kind": "dask", "workers": 2}
    assert map_ordered(_square, list(range(7)), cfg) == [x * x for x in range(7)]
    with pytest.raises(PipelineError, match="no Dask scheduler at tcp://127.0.0.1:9"):
        map_ordered(_square, [1], {"kind": "dask", "address": "tcp://127.0.0.1:9", "connect_timeout": 2})


def test_unknown_executor_kind_is_a_clear_error():
    with pytest.raises(PipelineError, match="unknown executor kind 'spark'"):
        map_ordered(_square, [1, 2], {"kind": "spark"})


def _pid_and_square(x: int) -> tuple[int, int]:
    import os

    return os.getpid(), x * x


def _die_on_three(x: int) -> int:
    import os
    import signal

    if x == 3:
        os.kill(os.getpid(), signal.SIGKILL)  # what the OOM killer does
    return x


def test_fresh_workers_run_each_item_in_its_own_process_in_order():
    out = map_ordered(_pid_and_square, list(range(6)), {"kind": "local", "workers": 2}, fresh_workers=True)
    assert [sq for _, sq in out] == [x * x for x in range(6)]
    assert len({pid for pid, _ in out}) == 6  # a new process per item: no memory carried between shards
    with pytest.raises(PipelineError, match="died"):
        map_ordered(_die_on_three, list(range(5)), {"kind": "local", "workers": 2}, fresh_workers=True)


def test_workers_auto_is_every_core_this_process_may_use():
    import os

    import pytest

    from pipeline.core.errors import PipelineError
    from pipeline.core.executor import worker_count

    assert worker_count({"workers": "auto"}) == len(os.sched_getaffinity(0))
    assert worker_count({}) == len(os.sched_getaffinity(0))
    assert worker_count({"workers": 3}) == 3 and worker_count({"workers": 0}) == 1
    with pytest.raises(PipelineError, match="executor.workers='many'"):
        worker_count({"workers": "many"})
