"""Shard stage throughput against bare `tokenizers` encode_batch and bare tiktoken, same text.

Usage: python benchmarks/bench_shard.py [--root DIR] [--copies N] [--workers W] [--memory]

With no --root, a corpus is built from the pydoc text of up to 200 standard-library modules
(about 13 MB per copy, --copies times with distinct ids). The tokenizer is the project's
default recipe trained by the tokenizer stage. Three encoders over the same documents:

- the shard stage (`python -m pipeline shard`'s code: Parquet in, .bin + index.json out,
  every document's ids checked to cover its bytes, a 2% sample re-encoded by tokenizers);
- bare `Tokenizer.encode_batch` on the texts already in memory (all cores);
- bare tiktoken `encode_ordinary_batch` with ranks converted from the same tokenizer.json
  and the same split regex, on the texts in memory (--workers threads).

The ids of all three must be identical. --memory also runs the stage on a corpus 10x
larger in a subprocess each and compares their peak RSS (largest process).
"""

from __future__ import annotations

import argparse
import os
import pkgutil
import pydoc
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline import config, shard, tokenizer  # noqa: E402
from pipeline.artifacts import doc_id, iter_rows  # noqa: E402

SKIP = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo"}


def pydoc_texts(limit: int = 200) -> list[str]:
    texts = []
    warnings.simplefilter("ignore")
    for m in sorted(m.name for m in pkgutil.iter_modules() if not m.name.startswith("_"))[:limit]:
        if m in SKIP:
            continue
        try:
            texts.append(pydoc.render_doc(__import__(m), renderer=pydoc.plaintext))
        except Exception:  # noqa: BLE001 - some modules do not import here; skip them
            continue
    return texts


def build_corpus(root: Path, copies: int, texts: list[str] | None = None) -> None:
    out = root / "data" / "clean"
    out.mkdir(parents=True, exist_ok=True)
    texts = texts if texts is not None else pydoc_texts()
    n = 0
    for c in range(copies):  # written copy by copy: a 10x corpus never sits in memory
        rows = [{"id": doc_id(f"{c}:{t}"), "text": t, "url": f"bench:{c}", "source": "bench", "raw_id": ""} for t in texts]
        for i in range(0, len(rows), 200):
            pq.write_table(pa.Table.from_pylist(rows[i : i + 200]), out / f"part-{n:05d}.parquet")
            n += 1


def _rss_of_stage(root: Path, tok_dir: Path, workers: int) -> tuple[float, float]:
    """(seconds, peak RSS MiB of the largest process) of the shard stage in a fresh interpreter."""
    code = (
        "import resource, sys, time; sys.path.insert(0, %r)\n"
        "from pipeline import config, shard\n"
        "cfg = config.load(['paths.root=%s', 'paths.tokenizer=%s', 'executor.workers=%d'])\n"
        "t = time.perf_counter(); shard.run(cfg); s = time.perf_counter() - t\n"
        "me = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss\n"
        "print(s, max(me, kids) / 1024)\n"
    ) % (str(Path(__file__).resolve().parent.parent), root, tok_dir, workers)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    return float(out[0]), float(out[1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root")
    ap.add_argument("--copies", type=int, default=1)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--memory", action="store_true", help="also compare peak RSS on a corpus 10x larger")
    args = ap.parse_args()
    root = Path(args.root or tempfile.mkdtemp(prefix="bench-shard-"))
    if not (root / "data" / "clean").is_dir():
        build_corpus(root, args.copies)
    cfg = config.load([f"paths.root={root}", f"executor.workers={args.workers}"])
    if not (root / "data" / "tokenizer" / "tokenizer.json").is_file():
        tokenizer.run(cfg)
    texts = [r["text"] for r in iter_rows(root / "data" / "clean", columns=["text"])]
    mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
    tok = tokenizer.load(root / "data" / "tokenizer")

    t = time.perf_counter()
    summary = shard.run(cfg)
    stage_s = time.perf_counter() - t

    t = time.perf_counter()
    tok.encode_special_tokens = True  # documents are plain text, as in the stage
    hf = tok.encode_batch(texts, add_special_tokens=False)
    bare_s = time.perf_counter() - t

    fast = tokenizer.FastEncoder(tok)
    t = time.perf_counter()
    tk = fast.enc.encode_ordinary_batch(texts, num_threads=args.workers)
    tk_s = time.perf_counter() - t

    # identical ids: tiktoken (ranks mapped to ids) == tokenizers == what the stage wrote
    assert all(fast.rank_to_id[np.asarray(a, dtype=np.int64)].tolist() == b.ids for a, b in zip(tk, hf)), "tiktoken ids differ"
    stage_ids = np.concatenate(shard.open_split(root / "data" / "shards", "train") + shard.open_split(root / "data" / "shards", "val"))
    bare_tokens = sum(len(e.ids) + 1 for e in hf)
    assert len(stage_ids) == bare_tokens, (len(stage_ids), bare_tokens)
    cut = np.flatnonzero(stage_ids == 0)
    starts = np.concatenate([[0], cut[:-1] + 1])
    stage_docs = sorted(tuple(stage_ids[s:e].tolist()) for s, e in zip(starts, cut))
    assert stage_docs == sorted(tuple(e.ids) for e in hf), "stage ids differ from tokenizers"

    print(f"corpus: {len(texts)} docs, {mb:.1f} MB, {bare_tokens} tokens, vocab {tok.get_vocab_size()}, cpus={os.cpu_count()}")
    print(f"shard stage ({summary['encoder']}, workers={args.workers}): {mb / stage_s:7.2f} MB/s ({stage_s:.2f} s, "
          f"fallback docs {summary['fallback_docs']}, verified docs {summary['verified_docs']})")
    print(f"bare tokenizers encode_batch  : {mb / bare_s:7.2f} MB/s ({bare_s:.2f} s)")
    print(f"bare tiktoken, same vocab ({args.workers} thr): {mb / tk_s:7.2f} MB/s ({tk_s:.2f} s), ids identical")
    print(f"ratio stage / encode_batch    : {bare_s / stage_s:.2f}x  (goal >= 3x)")
    print(f"ratio stage / bare tiktoken   : {tk_s / stage_s:.2f}x")

    if args.memory:
        big = Path(tempfile.mkdtemp(prefix="bench-shard-10x-"))
        small = Path(tempfile.mkdtemp(prefix="bench-shard-1x-"))
        base = pydoc_texts()
        build_corpus(small, 1, base)
        build_corpus(big, 10, base)
        tok_dir = root / "data" / "tokenizer"
        s1, m1 = _rss_of_stage(small, tok_dir, args.workers)
        s10, m10 = _rss_of_stage(big, tok_dir, args.workers)
        print(f"peak RSS 1x corpus : {m1:7.1f} MiB ({s1:.1f} s)")
        print(f"peak RSS 10x corpus: {m10:7.1f} MiB ({s10:.1f} s), ratio {m10 / m1:.2f}")


if __name__ == "__main__":
    main()
