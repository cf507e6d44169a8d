"""Encoding one clean shard into token pieces (per split, with order keys), and merging the
pieces into `.bin` files: the per-shard work of the shard stage, run through the executor.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core.errors import PipelineError
from pipeline.core.splits import is_val
from pipeline.tokenize.bpe import encode_plain, token_byte_lengths
from pipeline.tokenize.bpe import load as load_tokenizer
from pipeline.tokenize.fast import fast_encoder
from pipeline.tokenize.sample import valid_id
from pipeline.tokenize.shards import SPLITS
from pipeline.tokenize.special import EOT

log = logging.getLogger(__name__)

try:
    _LIBC = ctypes.CDLL("libc.so.6")
    _LIBC.malloc_trim  # noqa: B018 - glibc only
except (OSError, AttributeError):
    _LIBC = None


def order_key(seed: int, doc_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed}:{doc_id}".encode(), digest_size=8).digest(), "big")


def _verify_pick(doc_id: str, fraction: float) -> bool:
    """A document-content choice of which documents to re-encode with `tokenizers`."""
    return fraction > 0 and int(doc_id[8:16], 16) / 0x1_0000_0000 < fraction


_NON_ASCII = re.compile(r"[^\x00-\x7f]")


def _verify_window(text: str, chars: int) -> str:
    """The part of a document the two encoders are compared on: all of it when short, else
    `chars` characters from its first non-ASCII one (where regex engines could disagree)."""
    if len(text) <= chars:
        return text
    m = _NON_ASCII.search(text)
    start = m.start() if m else 0
    start = max(0, min(start - chars // 4, len(text) - chars))
    return text[start : start + chars]


def _release_memory() -> None:
    """Hand freed batch memory back to the OS, so a worker's peak does not creep up with the
    number of batches it has seen (glibc keeps freed blocks of varying sizes otherwise)."""
    pa.default_memory_pool().release_unused()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


class _Mismatch(Exception):
    pass


def encode_shard(job: dict) -> dict:
    """Encode one clean shard into `<work>/<i>.train.bin` and `<i>.val.bin` (worker process)."""
    parquet = Path(job["parquet"])
    try:
        return _encode_shard_inner(job)
    except _Mismatch as e:
        return {"index": job["index"], "parquet": parquet.name, "mismatch": str(e)}
    except (OSError, ValueError, KeyError) as e:  # unreadable or malformed Parquet: count it, go on
        return {"index": job["index"], "parquet": parquet.name, "error": f"{parquet}: {type(e).__name__}: {e}"}


def _encode_shard_inner(job: dict) -> dict:
    parquet = Path(job["parquet"])
    tok = load_tokenizer(job["tokenizer"])
    eot = np.asarray([tok.token_to_id(EOT)], dtype=np.uint32)
    lengths = token_byte_lengths(tok)
    fast = None
    if job["encoder"] == "tiktoken":
        fast, why = fast_encoder(tok)
        if fast is None:
            raise PipelineError(f"shard.encoder=tiktoken but the tokenizer does not convert: {why}")
    dtype = np.dtype(job["dtype"])
    seed, val_fraction, verify_fraction = int(job["seed"]), float(job["val_fraction"]), float(job["verify_fraction"])
    counts = {s: {"tokens": 0, "docs": 0, "bytes": 0} for s in SPLITS}
    meta: dict[str, dict[str, list[int]]] = {s: {"key": [], "row": [], "len": []} for s in SPLITS}
    bad: dict[str, int] = {}
    verified = 0
    outs = {s: open(Path(job["work"]) / f"{job['index']:05d}.{s}.bin", "wb") for s in SPLITS}
    row = -1
    try:
        def encode(docs: list[tuple[int, str, str]]) -> None:
            nonlocal verified
            texts = [t for _, _, t in docs]
            if fast is not None:
                encoded = fast.encode(texts, int(job.get("threads", 1)))
                check = [i for i, (_, d, _) in enumerate(docs) if _verify_pick(d, verify_fraction)]
                if check:
                    windows = [_verify_window(texts[i], int(job["verify_chars"])) for i in check]
                    for i, ours, truth in zip(check, fast.encode(windows), encode_plain(tok, windows)):
                        if not np.array_equal(ours, np.asarray(truth, dtype=np.uint32)):
                            raise _Mismatch(f"{parquet} row {docs[i][0]} (id {docs[i][1]})")
                    verified += len(check)
            else:
                encoded = [np.asarray(ids, dtype=np.uint32) for ids in encode_plain(tok, texts)]
            for (r, doc_id, text), ids in zip(docs, encoded):
                nbytes = len(text.encode("utf-8"))
                if int(lengths[ids].sum()) != nbytes:  # every byte of the text is in exactly one token
                    raise PipelineError(f"{parquet} row {r}: tokens cover {int(lengths[ids].sum())} of {nbytes} bytes")
                split = "val" if is_val(doc_id, val_fraction) else "train"
                out = np.concatenate([ids, eot]).astype(dtype)
                outs[split].write(out.tobytes())
                c = counts[split]
                c["tokens"] += len(out)
                c["docs"] += 1
                c["bytes"] += nbytes
                m = meta[split]
                m["key"].append(order_key(seed, doc_id) if job["shuffle"] else 0)
                m["row"].append(r)
                m["len"].append(len(out))

        # batches bounded by bytes as well as documents, so memory does not depend on document sizes
        docs: list[tuple[int, str, str]] = []
        held = 0
        for batch in pq.ParquetFile(parquet).iter_batches(batch_size=64, columns=["id", "text"]):
            for doc_id, text in zip(batch.column(0).to_pylist(), batch.column(1).to_pylist()):
                row += 1
                reason = None if valid_id(doc_id) else "bad id"
                if reason is None and not isinstance(text, str):
                    reason = "no text"
                if reason:
                    bad[reason] = bad.get(reason, 0) + 1
                    log.warning("%s row %d: %s (%r): skipped", parquet, row, reason, doc_id)
                    continue
                docs.append((row, doc_id, text))
                held += len(text)
                if len(docs) >= int(job["batch_docs"]) or held >= int(job["batch_chars"]):
                    encode(docs)
                    docs, held = [], 0
                    _release_memory()
        if docs:
            encode(docs)
        _release_memory()
    finally:
        for f in outs.values():
            f.close()
    return {
        "index": job["index"],
        "parquet": parquet.name,
        "counts": counts,
        "docs": {
            s: {"key": np.asarray(m["key"], dtype=np.uint64), "row": np.asarray(m["row"], dtype=np.int64),
                "len": np.asarray(m["len"], dtype=np.int64)}
            for s, m in meta.items()
        },
        "bad_docs": bad,
        "verified": verified,
        "fallback_docs": fast.fallback_docs if fast is not None else 0,
    }


class _BinWriter:
    """Appends token bytes to `<split>/NNNNN.bin`, starting a new file every `limit` tokens."""

    def __init__(self, root: Path, split: str, itemsize: int, limit: int) -> None:
        self.root, self.split, self.itemsize, self.limit = root, split, itemsize, max(1, limit)
        (root / split).mkdir(parents=True, exist_ok=True)
        self.files: list[dict] = []
        self.f = None
        self.n = 0
        self.sha = hashlib.sha256()
        self.sources: set[str] = set()

    def _open(self) -> None:
        name = f"{self.split}/{len(self.files):05d}.bin"
        self.files.append({"name": name, "tokens": 0})
        self.f = open(self.root / name, "wb")
        self.n = 0
        self.sha = hashlib.sha256()
        self.sources = set()

    def _close(self) -> None:
        if self.f is not None:
            self.f.close()
            entry = self.files[-1]
            entry["tokens"] = self.n
            entry["sha256"] = self.sha.hexdigest()
            entry["from"] = sorted(self.sources)
            self.f = None

    def write(self, data: bytes, source: str) -> None:
        """Append whole tokens, splitting at the file-size boundary (a document may span two files)."""
        view = memoryview(data)
        while len(view):
            if self.f is None or self.n >= self.limit:
                self._close()
                self._open()
            room = (self.limit - self.n) * self.itemsize
            chunk = view[:room]
            self.f.write(chunk)
            self.sha.update(chunk)
            self.n += len(chunk) // self.itemsize
            self.sources.add(source)
            view = view[room:]

    def append(self, path: Path, source: str) -> None:
        """Copy a whole piece file in (in chunks)."""
        with open(path, "rb") as src:
            while chunk := src.read(1 << 24):
                self.write(chunk, source)

    def close(self) -> list[dict]:
        self._close()
        return [f for f in self.files if f["tokens"] > 0]


def merge_split(tmp: Path, work: Path, split: str, results: list[dict], itemsize: int, limit: int) -> list[dict]:
    """Copy every document of `split` from the work pieces into the output files, in key order."""
    keys = np.concatenate([r["docs"][split]["key"] for r in results] or [np.zeros(0, np.uint64)])
    rows = np.concatenate([r["docs"][split]["row"] for r in results] or [np.zeros(0, np.int64)])
    lens = np.concatenate([r["docs"][split]["len"] for r in results] or [np.zeros(0, np.int64)])
    piece = np.concatenate(
        [np.full(len(r["docs"][split]["len"]), n, dtype=np.int64) for n, r in enumerate(results)]
        or [np.zeros(0, np.int64)]
    )
    offsets = np.concatenate(  # byte offset of each document in its piece file
        [np.cumsum(r["docs"][split]["len"]) - r["docs"][split]["len"] for r in results] or [np.zeros(0, np.int64)]
    ).astype(np.int64) * itemsize
    order = np.lexsort((rows, piece, keys))
    writer = _BinWriter(tmp, split, itemsize, limit)
    fds = [os.open(work / f"{r['index']:05d}.{split}.bin", os.O_RDONLY) for r in results]
    try:
        for i in order:
            p = int(piece[i])
            data = os.pread(fds[p], int(lens[i]) * itemsize, int(offsets[i]))
            writer.write(data, results[p]["parquet"])
    finally:
        for fd in fds:
            os.close(fd)
    return writer.close()


def choose_encoder(want: str, tok) -> tuple[str, str]:
    if want not in ("auto", "tiktoken", "tokenizers"):
        raise PipelineError(f"unknown shard.encoder {want!r}: expected auto, tiktoken or tokenizers")
    if want == "tokenizers":
        return "tokenizers", "shard.encoder=tokenizers"
    fast, why = fast_encoder(tok)
    if fast is not None:
        return "tiktoken", f"tokenizer converts to tiktoken ranks ({int(fast.unsafe.sum())} unsafe tokens)"
    if want == "tiktoken":
        raise PipelineError(f"shard.encoder=tiktoken but the tokenizer does not convert: {why}")
    return "tokenizers", why
