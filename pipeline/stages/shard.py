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

import hashlib
import logging
import os
import shutil
from pathlib import Path

from pipeline.core.artifacts import (
    Timer,
    atomic_dir,
    require_dir,
    sha256_file,
    write_json,
    write_summary,
)
from pipeline.core.errors import PipelineError
from pipeline.core.executor import map_ordered, worker_count
from pipeline.core.parquet import parquet_files
from pipeline.tokenize.bpe import load as load_tokenizer
from pipeline.tokenize.encode import choose_encoder, encode_shard, merge_split
from pipeline.tokenize.shards import ORDER_RULE, SPLIT_RULE, SPLITS, dtype_for, verify
from pipeline.tokenize.special import EOT

log = logging.getLogger(__name__)


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
    encoder, encoder_note = choose_encoder(str(sc.get("encoder", "auto")), tok)
    seed = int(sc.get("shuffle_seed", cfg.get("seed", 0)))
    shuffle = bool(sc.get("shuffle", True))
    out = Path(cfg.paths.shards)
    shards_per_worker = 1
    if str(cfg.executor.get("kind", "local")) == "local":
        busy = max(1, min(worker_count(cfg.executor), len(shards)))
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
        results = map_ordered(encode_shard, jobs, cfg.executor, fresh_workers=True)
        mismatch = [r["mismatch"] for r in results if "mismatch" in r]
        if mismatch:
            log.warning("tiktoken ids differ from tokenizers at %s: re-encoding everything with tokenizers", mismatch[0])
            encoder, encoder_note = "tokenizers", f"tiktoken differed from tokenizers at {mismatch[0]}; fell back"
            for f in work.iterdir():
                f.unlink()
            results = map_ordered(encode_shard, [{**j, "encoder": encoder} for j in jobs], cfg.executor, fresh_workers=True)
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
            files = merge_split(tmp, work, split, results, dtype.itemsize, int(sc.tokens_per_file))
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


def verify_command(cfg) -> int:
    """`python -m pipeline shard --verify`: one line per problem, exit status 1 if any."""
    report = verify(Path(cfg.paths.shards), Path(cfg.paths.tokenizer))
    for p in report["problems"]:
        print(p)
    status = "ok" if report["ok"] else f"{len(report['problems'])} problem(s)"
    print(f"verified {report['checked']} token files in {cfg.paths.shards}: {status}")
    return 0 if report["ok"] else 1
