"""Shard stage: encode clean documents into flat, memory-mappable token files.

Each clean Parquet shard is encoded by one worker (through the executor) into per-shard
train/val pieces; the pieces are then concatenated in shard order into `.bin` files of at
most `tokens_per_file` tokens, so the result does not depend on how many workers ran.
Documents go to train or val by `splits.is_val(doc_id)`, never split across the two.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np

from pipeline.artifacts import (
    Timer,
    atomic_dir,
    iter_rows,
    parquet_files,
    require_dir,
    sha256_file,
    write_json,
    write_summary,
)
from pipeline.errors import PipelineError
from pipeline.executor import map_ordered
from pipeline.splits import is_val
from pipeline.tokenizer import EOT, load as load_tokenizer

SPLITS = ("train", "val")


def dtype_for(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 65536 else np.dtype("<u4")


def _encode_shard(job: dict) -> dict:
    """Encode one clean shard into `<work>/<i>.train.bin` and `<i>.val.bin` (worker process)."""
    tok = load_tokenizer(job["tokenizer"])
    eot = tok.token_to_id(EOT)
    dtype = np.dtype(job["dtype"])
    counts = {s: {"tokens": 0, "docs": 0, "bytes": 0} for s in SPLITS}
    outs = {s: open(Path(job["work"]) / f"{job['index']:05d}.{s}.bin", "wb") for s in SPLITS}
    try:
        batch: list[tuple[str, str]] = []

        def flush() -> None:
            encs = tok.encode_batch([t for _, t in batch], add_special_tokens=False)
            for (doc_id, text), enc in zip(batch, encs):
                split = "val" if is_val(doc_id, job["val_fraction"]) else "train"
                ids = np.asarray(enc.ids + [eot], dtype=dtype)
                outs[split].write(ids.tobytes())
                c = counts[split]
                c["tokens"] += len(ids)
                c["docs"] += 1
                c["bytes"] += len(text.encode("utf-8"))
            batch.clear()

        for row in iter_rows(job["parquet"], columns=["id", "text"]):
            batch.append((row["id"], row["text"]))
            if len(batch) >= job["batch_docs"]:
                flush()
        flush()
    finally:
        for f in outs.values():
            f.close()
    return {"index": job["index"], "parquet": Path(job["parquet"]).name, "counts": counts}


class _BinWriter:
    """Appends token bytes to `<split>/NNNNN.bin`, starting a new file every `limit` tokens."""

    def __init__(self, root: Path, split: str, itemsize: int, limit: int) -> None:
        self.root, self.split, self.itemsize, self.limit = root, split, itemsize, max(1, limit)
        (root / split).mkdir(parents=True, exist_ok=True)
        self.files: list[dict] = []
        self.f = None
        self.n = 0
        self.sources: set[str] = set()

    def _open(self) -> None:
        name = f"{self.split}/{len(self.files):05d}.bin"
        self.files.append({"name": name, "tokens": 0})
        self.f = open(self.root / name, "wb")
        self.n = 0
        self.sources = set()

    def _close(self) -> None:
        if self.f is not None:
            self.f.close()
            entry = self.files[-1]
            entry["tokens"] = self.n
            entry["sha256"] = sha256_file(self.root / entry["name"])
            entry["from"] = sorted(self.sources)
            self.f = None

    def append(self, path: Path, source: str) -> None:
        """Copy a piece in, splitting at the file-size boundary (a document may span two files)."""
        with open(path, "rb") as src:
            while True:
                if self.f is None or self.n >= self.limit:
                    self._close()
                    self._open()
                room = (self.limit - self.n) * self.itemsize
                chunk = src.read(min(room, 1 << 24))
                if not chunk:
                    break
                self.f.write(chunk)
                self.n += len(chunk) // self.itemsize
                self.sources.add(source)

    def close(self) -> list[dict]:
        self._close()
        return [f for f in self.files if f["tokens"] > 0]


def run(cfg) -> dict:
    timer = Timer()
    clean_dir = require_dir(cfg.paths.clean, "clean documents", "clean")
    tok_dir = require_dir(cfg.paths.tokenizer, "tokenizer", "tokenizer")
    tok = load_tokenizer(tok_dir)
    shards = parquet_files(clean_dir)
    if not shards:
        raise PipelineError(f"no clean shards (*.parquet) in {clean_dir}: run `python -m pipeline clean` first")
    vocab = tok.get_vocab_size()
    dtype = dtype_for(vocab)
    out = Path(cfg.paths.shards)
    with atomic_dir(out) as tmp:
        work = tmp / "_work"
        work.mkdir()
        jobs = [
            {
                "index": i,
                "parquet": str(p),
                "tokenizer": str(tok_dir / "tokenizer.json"),
                "work": str(work),
                "dtype": dtype.str,
                "val_fraction": float(cfg.shard.val_fraction),
                "batch_docs": int(cfg.shard.batch_docs),
            }
            for i, p in enumerate(shards)
        ]
        results = map_ordered(_encode_shard, jobs, cfg.executor)
        index: dict = {
            "dtype": dtype.name,
            "eot_id": tok.token_to_id(EOT),
            "vocab_size": vocab,
            "tokenizer_sha256": sha256_file(tok_dir / "tokenizer.json"),
            "splits": {},
        }
        for split in SPLITS:
            writer = _BinWriter(tmp, split, dtype.itemsize, int(cfg.shard.tokens_per_file))
            for r in results:
                writer.append(work / f"{r['index']:05d}.{split}.bin", r["parquet"])
            totals = {k: sum(r["counts"][split][k] for r in results) for k in ("tokens", "docs", "bytes")}
            index["splits"][split] = {"files": writer.close(), **totals}
        shutil.rmtree(work)
        train, val = index["splits"]["train"], index["splits"]["val"]
        if train["docs"] == 0:
            raise PipelineError(f"no training documents after the split of {clean_dir}")
        if val["docs"] == 0:
            raise PipelineError(
                f"no validation documents: {train['docs']} documents and shard.val_fraction="
                f"{cfg.shard.val_fraction} held none out; raise shard.val_fraction or add documents"
            )
        write_json(tmp / "index.json", index)
        summary = write_summary(
            tmp, "shard", cfg, {"clean": clean_dir, "tokenizer": tok_dir}, timer,
            dtype=dtype.name,
            vocab_size=vocab,
            train_tokens=train["tokens"], train_docs=train["docs"], train_bytes=train["bytes"],
            val_tokens=val["tokens"], val_docs=val["docs"], val_bytes=val["bytes"],
            bytes_per_token=round((train["bytes"] + val["bytes"]) / max(1, train["tokens"] + val["tokens"]), 4),
            lineage={r["parquet"]: {s: r["counts"][s]["docs"] for s in SPLITS} for r in results},
            index_sha256=hashlib.sha256((tmp / "index.json").read_bytes()).hexdigest(),
        )
    return summary


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
