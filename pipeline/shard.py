"""Shard stage: encode clean documents into flat, memory-mappable token files.

Each clean Parquet shard is encoded by one worker (through the executor) into per-shard
train/val pieces plus a list of (order key, token count) per document. The pieces are then
copied, document by document in order-key order, into `.bin` files of at most
`tokens_per_file` tokens. The order key is a seeded hash of the document id, so the
shuffle, like the train/val split (`splits.is_val(doc_id)`), depends only on document
content: not on worker count, shard layout or encoder.

Encoding goes through `tokenizer.FastEncoder` (tiktoken with the trained ranks) when the
tokenizer converts, and re-encodes a hash-chosen sample of documents with `tokenizers` to
compare; one difference makes the whole stage rerun with `tokenizers`, whose file stays the
single source of truth. Memory is bounded by one batch of documents per worker and one
document's tokens in the copy, whatever the corpus size (plus 24 bytes of order key and
length per document).
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.artifacts import (
    Timer,
    atomic_dir,
    parquet_files,
    require_dir,
    sha256_file,
    write_json,
    write_summary,
)
from pipeline.errors import PipelineError
from pipeline.executor import map_ordered
from pipeline.splits import is_val
from pipeline.tokenizer import (
    EOT,
    encode_plain,
    fast_encoder,
    token_byte_lengths,
    valid_id,
)
from pipeline.tokenizer import load as load_tokenizer

log = logging.getLogger(__name__)

try:
    _LIBC = ctypes.CDLL("libc.so.6")
    _LIBC.malloc_trim  # noqa: B018 - glibc only
except (OSError, AttributeError):
    _LIBC = None

SPLITS = ("train", "val")
SPLIT_RULE = "val when int(doc_id[:8], 16) / 2**32 < val_fraction, else train (pipeline.splits.is_val)"
ORDER_RULE = "documents sorted by blake2b-64(f'{seed}:{doc_id}'), ties by source shard and row; each followed by eot_id"


def dtype_for(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 65536 else np.dtype("<u4")


def _order_key(seed: int, doc_id: str) -> int:
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


def _encode_shard(job: dict) -> dict:
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
                m["key"].append(_order_key(seed, doc_id) if job["shuffle"] else 0)
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


def _merge_split(tmp: Path, work: Path, split: str, results: list[dict], itemsize: int, limit: int) -> list[dict]:
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


def _choose_encoder(want: str, tok) -> tuple[str, str]:
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
    sc = cfg.shard
    encoder, encoder_note = _choose_encoder(str(sc.get("encoder", "auto")), tok)
    seed = int(sc.get("shuffle_seed", cfg.get("seed", 0)))
    shuffle = bool(sc.get("shuffle", True))
    out = Path(cfg.paths.shards)
    shards_per_worker = 1
    if str(cfg.executor.get("kind", "local")) == "local":
        busy = max(1, min(int(cfg.executor.get("workers", 1) or 1), len(shards)))
        shards_per_worker = busy
    # cores left idle by fewer shards than workers go to tiktoken threads inside each worker
    threads = int(sc.get("threads", 0) or 0) or max(1, (os.cpu_count() or 1) // shards_per_worker)
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
                "val_fraction": float(sc.val_fraction),
                "batch_docs": int(sc.batch_docs),
                "batch_chars": int(sc.get("batch_chars", 4_000_000)),
                "encoder": encoder,
                "verify_fraction": float(sc.get("verify_fraction", 0.05)),
                "verify_chars": int(sc.get("verify_chars", 4000)),
                "threads": threads,
                "seed": seed,
                "shuffle": shuffle,
            }
            for i, p in enumerate(shards)
        ]
        results = map_ordered(_encode_shard, jobs, cfg.executor, fresh_workers=True)
        mismatch = [r["mismatch"] for r in results if "mismatch" in r]
        if mismatch:
            log.warning("tiktoken ids differ from tokenizers at %s: re-encoding everything with tokenizers", mismatch[0])
            encoder, encoder_note = "tokenizers", f"tiktoken differed from tokenizers at {mismatch[0]}; fell back"
            for f in work.iterdir():
                f.unlink()
            results = map_ordered(_encode_shard, [{**j, "encoder": encoder} for j in jobs], cfg.executor, fresh_workers=True)
        errors = [r["error"] for r in results if "error" in r]
        for e in errors:
            log.warning("skipped unreadable clean shard: %s", e)
        results = [r for r in results if "error" not in r]
        if not results:
            raise PipelineError(f"no readable clean shard in {clean_dir}: {'; '.join(errors[:3])}")
        index: dict = {
            "dtype": dtype.name,
            "eot_id": tok.token_to_id(EOT),
            "vocab_size": vocab,
            "tokenizer_sha256": sha256_file(tok_dir / "tokenizer.json"),
            "tokens_per_file": int(sc.tokens_per_file),
            "split": {"rule": SPLIT_RULE, "val_fraction": float(sc.val_fraction)},
            "order": {"rule": ORDER_RULE if shuffle else "source shard and row order; each followed by eot_id",
                      "shuffle": shuffle, "seed": seed if shuffle else None},
            "splits": {},
        }
        for split in SPLITS:
            files = _merge_split(tmp, work, split, results, dtype.itemsize, int(sc.tokens_per_file))
            totals = {k: sum(r["counts"][split][k] for r in results) for k in ("tokens", "docs", "bytes")}
            index["splits"][split] = {"files": files, **totals}
        shutil.rmtree(work)
        train, val = index["splits"]["train"], index["splits"]["val"]
        if train["docs"] == 0:
            raise PipelineError(f"no training documents after the split of {clean_dir}")
        if val["docs"] == 0:
            raise PipelineError(
                f"no validation documents: {train['docs']} documents and shard.val_fraction="
                f"{sc.val_fraction} held none out; raise shard.val_fraction or add documents"
            )
        write_json(tmp / "index.json", index)
        bad_docs: dict[str, int] = {}
        for r in results:
            for k, v in r["bad_docs"].items():
                bad_docs[k] = bad_docs.get(k, 0) + v
        total_bytes = train["bytes"] + val["bytes"]
        summary = write_summary(
            tmp, "shard", cfg, {"clean": clean_dir, "tokenizer": tok_dir}, timer,
            dtype=dtype.name,
            vocab_size=vocab,
            encoder=encoder,
            encoder_note=encoder_note,
            verified_docs=sum(r["verified"] for r in results),
            fallback_docs=sum(r["fallback_docs"] for r in results),
            bad_docs=bad_docs,
            bad_files=errors,
            train_tokens=train["tokens"], train_docs=train["docs"], train_bytes=train["bytes"],
            val_tokens=val["tokens"], val_docs=val["docs"], val_bytes=val["bytes"],
            bytes_per_token=round(total_bytes / max(1, train["tokens"] + val["tokens"]), 4),
            mb_per_s=round(total_bytes / 1e6 / max(1e-9, timer.seconds), 3),
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


def verify_command(cfg) -> int:
    """`python -m pipeline shard --verify`: one line per problem, exit status 1 if any."""
    report = verify(Path(cfg.paths.shards), Path(cfg.paths.tokenizer))
    for p in report["problems"]:
        print(p)
    status = "ok" if report["ok"] else f"{len(report['problems'])} problem(s)"
    print(f"verified {report['checked']} token files in {cfg.paths.shards}: {status}")
    return 0 if report["ok"] else 1
