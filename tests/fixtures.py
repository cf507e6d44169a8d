"""A tiny, self-contained project for tests and smoke runs: clean docs, tokenizer, shards.

The documents are Python's own pydoc pages for a few small stdlib modules (what the
default corpus is made of), written in the formats the real stages produce, so the
training stages can be exercised without ingest/clean/tokenizer/shard having run.
"""

from __future__ import annotations

import importlib
import pydoc
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core.artifacts import doc_id

SPECIALS = ["<|endoftext|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
MODULES = ("json", "textwrap", "shlex", "fnmatch", "glob", "bisect", "heapq", "colorsys", "base64",
           "string", "keyword", "copy", "queue", "calendar", "contextlib", "functools")

# micro model + short runs: seconds, not minutes
MICRO = [
    "model.n_layer=2", "model.n_head=2", "model.d_model=32", "model.mlp_hidden=64", "model.block_size=64",
    "pretrain.max_steps=40", "pretrain.batch_size=8", "pretrain.val_every=10", "pretrain.val_batches=2",
    "pretrain.warmup_steps=5", "pretrain.lr=1e-2", "pretrain.min_lr=1e-3", "pretrain.progress_bar=false",
    "pretrain.log_every=5", "hardware.num_threads=0", "hardware.devices=1", "hardware.strategy=auto",
    "hardware.precision=32-true", "hardware.accelerator=cpu", "pretrain.max_time=null",
    "finetune.max_steps=12", "finetune.batch_size=4", "finetune.val_every=6", "finetune.log_every=3",
    "finetune.warmup_steps=2", "finetune.val_batches=2",
]


def pydoc_text(name: str) -> str:
    mod = importlib.import_module(name)
    return pydoc.plain(pydoc.render_doc(mod, renderer=pydoc.plaintext))


def write_clean(clean_dir: Path, modules=MODULES) -> list[dict]:
    rows = []
    for name in modules:
        text = pydoc_text(name)
        rows.append({"id": doc_id(text), "text": text, "url": f"pydoc:///{name}.html", "source": "pydoc_site",
                     "raw_id": doc_id(name)})
    clean_dir.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), clean_dir / "part-00000.parquet")
    return rows


def val_fraction_for(ids: list[str], n_val: int = 3) -> float:
    """A fraction that puts exactly the `n_val` lowest-hashing documents in val."""
    hs = sorted(int(i[:8], 16) / 0x1_0000_0000 for i in ids)
    return round((hs[n_val - 1] + hs[n_val]) / 2, 12)


def write_tokenizer(tok_dir: Path, texts: list[str], vocab_size: int = 512):
    """Train the project's own BPE recipe (pipeline.tokenize.bpe.build) on `texts`."""
    from omegaconf import OmegaConf

    from pipeline.tokenize.bpe import build

    tok, trainer = build(OmegaConf.create({"vocab_size": vocab_size, "min_frequency": 2, "special_tokens": SPECIALS}))
    tok.train_from_iterator(texts, trainer=trainer)
    tok_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(tok_dir / "tokenizer.json"))
    return tok


def make_project(root: Path, modules=MODULES, vocab_size: int = 512, n_val: int = 3) -> list[str]:
    """Write data/clean, data/tokenizer and data/shards under `root`; returns Hydra overrides."""
    root = Path(root)
    rows = write_clean(root / "data" / "clean", modules)
    fraction = val_fraction_for([r["id"] for r in rows], n_val)
    from pipeline.core import config
    from pipeline.stages import shard, tokenizer

    cfg = config.load([f"paths.root={root}", f"shard.val_fraction={fraction}", f"tokenizer.vocab_size={vocab_size}"])
    tokenizer.run(cfg)  # the real stages, so fixtures cannot drift from the data contracts
    shard.run(cfg)
    return [f"paths.root={root}", f"shard.val_fraction={fraction}", *MICRO]


def pipeline_processes(root: Path, stage: str | None = None) -> list[int]:
    """pids of live `python -m pipeline [stage] ... paths.root=<root>` processes (from /proc)."""
    want = f"-m pipeline {stage}" if stage else "-m pipeline"
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if want in cmd and f"paths.root={root}" in cmd:
                found.append(int(d.name))
    return found
