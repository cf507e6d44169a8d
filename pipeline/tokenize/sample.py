"""The tokenizer's training sample: training documents (never validation ones) whose seeded
id hash is smallest, up to a byte cap, streamed from the clean shards.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.core.artifacts import (
    require_dir,
)
from pipeline.core.parquet import parquet_files
from pipeline.core.errors import PipelineError
from pipeline.core.splits import is_val

log = logging.getLogger(__name__)


def valid_id(doc_id) -> bool:
    """Document ids are hex content hashes; the split and sample keys need at least 16 digits."""
    if not isinstance(doc_id, str) or len(doc_id) < 16:
        return False
    try:
        int(doc_id[:16], 16)
    except ValueError:
        return False
    return True


def _sample_key(seed: int, doc_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed}:{doc_id}".encode(), digest_size=8).digest(), "big")


def _train_ids_and_sizes(clean_dir: Path, val_fraction: float, seed: int):
    """Sample keys and UTF-8 sizes of the training documents (text is read, never kept),
    the readable shards, and the unreadable ones (named, counted, skipped)."""
    keys, sizes, good, bad = [], [], [], []
    for f in parquet_files(clean_dir):
        k0 = len(keys)
        try:
            for batch in pq.ParquetFile(f).iter_batches(columns=["id", "text"], batch_size=2048):
                lengths = pc.binary_length(batch.column(1)).to_pylist()
                for doc_id, n in zip(batch.column(0).to_pylist(), lengths):
                    if n is None or not valid_id(doc_id) or is_val(doc_id, val_fraction):
                        continue
                    keys.append(_sample_key(seed, doc_id))
                    sizes.append(n)
        except (OSError, ValueError, KeyError) as e:  # unreadable or malformed Parquet
            del keys[k0:], sizes[k0:]
            bad.append(f"{f.name}: {type(e).__name__}: {e}")
            log.warning("skipped unreadable clean shard %s", bad[-1])
            continue
        good.append(f)
    return np.asarray(keys, dtype=np.uint64), np.asarray(sizes, dtype=np.int64), good, bad


def sample_threshold(keys: np.ndarray, sizes: np.ndarray, max_bytes: int) -> int | None:
    """Largest sample key to keep so the kept documents total at most `max_bytes` (None: all)."""
    if int(sizes.sum()) <= max_bytes:
        return None
    order = np.argsort(keys, kind="stable")
    within = np.cumsum(sizes[order]) <= max_bytes
    n = max(1, int(within.sum()) if within.all() else int(np.argmin(within)))
    return int(keys[order[n - 1]])


def train_texts(files, val_fraction: float, seed: int, threshold: int | None, seen: dict,
                batched: bool = False) -> Iterator:
    """The training sample, streamed in shard order: training documents whose key <= threshold.

    Filtering happens on the id column, so only the kept texts become Python strings. With
    ``batched``, yields lists of up to 256 texts: the trainer then pulls one Python object per
    batch instead of per document, which is most of what it costs over a list in memory."""
    for f in [files] if isinstance(files, (str, Path)) else files:
        for batch in pq.ParquetFile(f).iter_batches(columns=["id", "text"], batch_size=256):
            keep = [
                valid_id(i) and not is_val(i, val_fraction) and (threshold is None or _sample_key(seed, i) <= threshold)
                for i in batch.column(0).to_pylist()
            ]
            texts = batch.filter(pa.array(keep)).column(1).drop_null()
            seen["bytes"] += int(pc.sum(pc.binary_length(texts)).as_py() or 0)
            seen["docs"] += len(texts)
            if batched:
                if len(texts):
                    yield texts.to_pylist()
            else:
                yield from texts.to_pylist()


def training_sample(cfg) -> tuple[list[Path], int | None, dict]:
    """(readable clean shards, sample threshold, plan) for the stage's config; benchmarks reuse it."""
    clean_dir = require_dir(cfg.paths.clean, "clean documents", "clean")
    seed = int(cfg.tokenizer.get("sample_seed", cfg.get("seed", 0)))
    keys, sizes, files, bad = _train_ids_and_sizes(clean_dir, float(cfg.shard.val_fraction), seed)
    if not files:
        raise PipelineError(f"no readable clean shards (*.parquet) in {clean_dir}" + (f": {bad[0]}" if bad else ""))
    threshold = sample_threshold(keys, sizes, int(cfg.tokenizer.max_train_bytes))
    plan = {
        "rule": "training documents (not is_val) whose blake2b-64(f'{seed}:{doc_id}') is among the smallest "
        "keys that fit in max_train_bytes; all of them when they fit",
        "seed": seed,
        "max_train_bytes": int(cfg.tokenizer.max_train_bytes),
        "available_docs": len(keys),
        "available_bytes": int(sizes.sum()),
        "bad_files": bad,
    }
    return files, threshold, plan
