"""A tiny, self-contained project for tests and smoke runs: clean docs, tokenizer, shards.

The documents are Python's own pydoc pages for a few small stdlib modules (what the
default corpus is made of), written in the formats the real stages produce, so the
training stages can be exercised without ingest/clean/tokenizer/shard having run.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import pydoc
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.artifacts import doc_id
from pipeline.splits import is_val

SPECIALS = ["<|endoftext|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
MODULES = ("json", "textwrap", "shlex", "fnmatch", "glob", "bisect", "heapq", "colorsys", "base64",
           "string", "keyword", "copy", "queue", "calendar", "contextlib", "functools")

# micro model + short runs: seconds, not minutes
MICRO = [
    "model.n_layer=2", "model.n_head=2", "model.d_model=32", "model.mlp_hidden=64", "model.block_size=64",
    "pretrain.max_steps=40", "pretrain.batch_size=8", "pretrain.val_every=10", "pretrain.val_batches=2",
    "pretrain.warmup_steps=5", "pretrain.lr=1e-2", "pretrain.min_lr=1e-3", "pretrain.progress_bar=false",
    "pretrain.log_every=5", "pretrain.num_threads=0", "pretrain.devices=1", "pretrain.strategy=auto",
    "pretrain.precision=32-true", "pretrain.accelerator=cpu", "pretrain.max_time=null",
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
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    tok_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(tok_dir / "tokenizer.json"))
    return tok


def write_shards(shards_dir: Path, tok, rows: list[dict], fraction: float, tokenizer_file: Path) -> dict:
    eot = tok.token_to_id(SPECIALS[0])
    splits = {"train": [], "val": []}
    for r in rows:
        ids = tok.encode(r["text"], add_special_tokens=False).ids + [eot]
        splits["val" if is_val(r["id"], fraction) else "train"].append((ids, len(r["text"].encode())))
    index = {"dtype": "uint16", "eot_id": eot, "vocab_size": tok.get_vocab_size(),
             "tokenizer_sha256": hashlib.sha256(Path(tokenizer_file).read_bytes()).hexdigest(), "splits": {}}
    for split, docs in splits.items():
        (shards_dir / split).mkdir(parents=True, exist_ok=True)
        arr = np.array([t for ids, _ in docs for t in ids], dtype="<u2")
        path = shards_dir / split / "00000.bin"
        arr.tofile(path)
        index["splits"][split] = {
            "files": [{"name": f"{split}/00000.bin", "tokens": int(arr.size),
                       "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}],
            "tokens": int(arr.size), "docs": len(docs), "bytes": sum(b for _, b in docs),
        }
    (shards_dir / "index.json").write_text(json.dumps(index, indent=2, sort_keys=True))
    return index


def make_project(root: Path, modules=MODULES, vocab_size: int = 512, n_val: int = 3) -> list[str]:
    """Write data/clean, data/tokenizer and data/shards under `root`; returns Hydra overrides."""
    root = Path(root)
    rows = write_clean(root / "data" / "clean", modules)
    fraction = val_fraction_for([r["id"] for r in rows], n_val)
    train_texts = [r["text"] for r in rows if not is_val(r["id"], fraction)]
    tok = write_tokenizer(root / "data" / "tokenizer", train_texts, vocab_size)
    write_shards(root / "data" / "shards", tok, rows, fraction, root / "data" / "tokenizer" / "tokenizer.json")
    return [f"paths.root={root}", f"shard.val_fraction={fraction}", *MICRO]
