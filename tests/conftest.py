"""Shared fixtures: a small real corpus (pydoc text of stdlib modules) and clean Hydra state."""

from __future__ import annotations

import os
import pydoc
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# A local Prefect run starts a temporary server: keep its state out of ~ and give it time.
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="prefect-home-"))
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CORPUS_MODULES = [
    "json", "os", "re", "collections", "pathlib", "typing", "inspect", "functools", "itertools",
    "subprocess", "argparse", "logging", "datetime", "random", "string", "shutil", "textwrap", "csv",
]


@pytest.fixture(autouse=True)
def _clear_hydra():
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    yield
    GlobalHydra.instance().clear()


def write_clean_corpus(root: Path, modules=CORPUS_MODULES, rows_per_shard: int = 5) -> Path:
    """Write pydoc plain-text pages as data/clean shards (the clean stage's output schema)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.core.artifacts import doc_id

    out = Path(root) / "data" / "clean"
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in modules:
        text = pydoc.render_doc(__import__(name), renderer=pydoc.plaintext)
        rows.append({"id": doc_id(text), "text": text, "url": f"pydoc:///{name}.html", "source": "pydoc_site",
                     "raw_id": doc_id(text)})
    for i in range(0, len(rows), rows_per_shard):
        pq.write_table(pa.Table.from_pylist(rows[i : i + rows_per_shard]), out / f"part-{i // rows_per_shard:05d}.parquet")
    return out


@pytest.fixture
def clean_corpus(tmp_path) -> Path:
    write_clean_corpus(tmp_path)
    return tmp_path


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 900, env: dict | None = None):
    import subprocess

    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args],
        cwd=cwd or ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


# A CPU-minute version of the default pipeline for tests that check wiring, not quality.
TINY = {
    "source.max_pages": 70,
    "pretrain.max_steps": 60,
    "pretrain.val_every": 30,
    "pretrain.progress_bar": False,
    "finetune.max_steps": 10,
    "finetune.val_every": 5,
    "eval.max_val_tokens": 10000,
    "eval.max_heldout_pairs": 4,
    "eval.max_new_tokens": 8,
    "eval.lstm.steps": 20,
    "eval.lstm.hidden": 64,
    # models trained for a few dozen steps move by more than any sane threshold when the data
    # changes; the gate itself is tested in test_evaluate.py and runs in the default end-to-end test
    "eval.gate.enabled": False,
}

# The default pipeline with a lighter evaluation: what the end-to-end test runs, so that the
# bits-per-byte check is made on the model the default configuration really trains.
DEFAULT_LIGHT_EVAL = {
    "pretrain.progress_bar": False,
    "finetune.max_steps": 60,
    "eval.max_heldout_pairs": 8,
    "eval.max_new_tokens": 24,
}


def overrides(root: Path, values: dict) -> list[str]:
    return [f"paths.root={root}", *(f"{k}={v}" for k, v in values.items())]


def write_tiny_conf(conf: Path) -> None:
    """Bake TINY into a copy of conf/ (for `dvc repro`, which reads the files as they are)."""
    import yaml

    group_file = {"source": "source/pydoc_site.yaml", "tokenizer": "tokenizer/bpe.yaml", "model": "model/gpt_tiny.yaml",
                  "clean": "clean/docs.yaml",
                  "pretrain": "pretrain/default.yaml", "finetune": "finetune/default.yaml", "eval": "eval/default.yaml"}
    for key, value in TINY.items():
        group, name = key.split(".", 1)
        path = conf / group_file[group]
        data = yaml.safe_load(path.read_text())
        *parents, leaf = name.split(".")
        node = data
        for part in parents:
            node = node[part]
        assert leaf in node, f"{key} is not in {path}"
        node[leaf] = value
        path.write_text(yaml.safe_dump(data, sort_keys=False))
