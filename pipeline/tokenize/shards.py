"""The token shard format: flat little-endian `.bin` files (uint16 or uint32) listed with
their sha256 and token counts in `index.json`; reading, memory-mapping and verifying them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pipeline.core.artifacts import (
    sha256_file,
)
from pipeline.core.errors import PipelineError

SPLITS = ("train", "val")


SPLIT_RULE = "val when int(doc_id[:8], 16) / 2**32 < val_fraction, else train (pipeline.core.splits.is_val)"


ORDER_RULE = "documents sorted by blake2b-64(f'{seed}:{doc_id}'), ties by source shard and row; each followed by eot_id"


def dtype_for(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 65536 else np.dtype("<u4")


def read_index(shards_dir: Path) -> dict:
    path = Path(shards_dir) / "index.json"
    if not path.is_file():
        raise PipelineError(f"token shard index not found at {path}: run `python -m pipeline shard` first")
    index = json.loads(path.read_text())
    for split in SPLITS:
        if split not in index.get("splits", {}):
            raise PipelineError(f"{path} has no {split!r} split: rerun `python -m pipeline shard`")
    return index


def open_split(shards_dir: Path, split: str, index: dict | None = None) -> list[np.memmap]:
    """Memory-map every (non-empty) token file of a split, in order."""
    index = index or read_index(shards_dir)
    dtype = np.dtype(index["dtype"]).newbyteorder("<")
    arrays = []
    for f in index["splits"][split]["files"]:
        path = Path(shards_dir) / f["name"]
        if not path.is_file():
            raise PipelineError(f"token file {path} listed in index.json is missing: rerun `python -m pipeline shard`")
        if path.stat().st_size:
            arrays.append(np.memmap(path, dtype=dtype, mode="r"))
    return arrays


def verify(shards_dir: Path, tokenizer_dir: Path | None = None) -> dict:
    """Check every token file against index.json (size, sha256) and the tokenizer's hash.

    Returns {"ok": bool, "checked": n, "problems": ["<file>: <what>", ...]}.
    """
    shards_dir = Path(shards_dir)
    index = read_index(shards_dir)
    itemsize = np.dtype(index["dtype"]).itemsize
    problems, checked, listed = [], 0, set()
    for split in SPLITS:
        for f in index["splits"][split]["files"]:
            name, path = f["name"], shards_dir / f["name"]
            listed.add(name)
            checked += 1
            if not path.is_file():
                problems.append(f"{name}: missing")
                continue
            size = path.stat().st_size
            if size != int(f["tokens"]) * itemsize:
                problems.append(f"{name}: corrupt: {size} bytes, index.json says {f['tokens']} tokens ({int(f['tokens']) * itemsize} bytes)")
                continue
            digest = sha256_file(path)
            if digest != f.get("sha256"):
                problems.append(f"{name}: corrupt: sha256 {digest[:16]}... != index.json {str(f.get('sha256'))[:16]}...")
    for split in SPLITS:
        for path in sorted((shards_dir / split).glob("*.bin")) if (shards_dir / split).is_dir() else []:
            name = f"{split}/{path.name}"
            if name not in listed:
                problems.append(f"{name}: not listed in index.json")
    if tokenizer_dir is not None:
        tok_file = Path(tokenizer_dir) / "tokenizer.json"
        if not tok_file.is_file():
            problems.append(f"{tok_file}: missing (index.json expects tokenizer sha256 {index.get('tokenizer_sha256', '?')[:16]}...)")
        elif sha256_file(tok_file) != index.get("tokenizer_sha256"):
            problems.append(f"{tok_file}: tokenizer changed since the shards were made (sha256 differs): rerun `python -m pipeline shard`")
    return {"ok": not problems, "checked": checked, "problems": problems}
