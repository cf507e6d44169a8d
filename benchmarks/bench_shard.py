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

The ids of all three must be identical. --memory also runs the stage on 1 and 10 copies
of the corpus (--memory-copies) in a fresh interpreter each and compares their peak RSS.
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

from pipeline.core import config

from pipeline.stages import shard, tokenizer
from pipeline.core.artifacts import doc_id
from pipeline.core.parquet import iter_rows
from pipeline.tokenize import bpe
from pipeline.tokenize import fast as fastenc
from pipeline.tokenize import shards

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


def build_corpus(root: Path, copies: int, texts: list[str] | None = None, rows_per_file: int = 200) -> None:
    out = root / "data" / "clean"
    out.mkdir(parents=True, exist_ok=True)
    texts = texts if texts is not None else pydoc_texts()
    n = 0
    for c in range(copies):  # written copy by copy: a 10x corpus never sits in memory
        rows = [{"id": doc_id(f"{c}:{t}"), "text": t, "url": f"bench:{c}", "source": "bench", "raw_id": ""} for t in texts]
        for i in range(0, len(rows), rows_per_file):
            pq.write_table(pa.Table.from_pylist(rows[i : i + rows_per_file]), out / f"part-{n:05d}.parquet")
            n += 1


_MEASURE = """
import sys, threading, time
sys.path.insert(0, %r)
import psutil
from pipeline.core import config
from pipeline.stages import shard
me, peak, done = psutil.Process(), [0, 0], threading.Event()

def sample():  # current RSS of this process and its workers (ru_maxrss would inherit the parent's)
    while not done.is_set():
        try:
            rss = [p.memory_info().rss for p in [me, *me.children(recursive=True)]]
        except psutil.Error:
            continue
        peak[0], peak[1] = max(peak[0], max(rss)), max(peak[1], sum(rss))
        time.sleep(0.02)

threading.Thread(target=sample, daemon=True).start()
cfg = config.load(["paths.root=%s", "paths.tokenizer=%s", "executor.workers=%d", *sys.argv[1:]])
t = time.perf_counter(); shard.run(cfg); s = time.perf_counter() - t
done.set()
print(s, peak[0] / 2**20, peak[1] / 2**20)
"""


def _rss_of_stage(root: Path, tok_dir: Path, workers: int) -> tuple[float, float, float]:
    """(seconds, peak RSS MiB of the largest process, peak of the sum) of the shard stage."""
    code = _MEASURE % (str(Path(__file__).resolve().parent.parent), root, tok_dir, workers)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    return float(out[0]), float(out[1]), float(out[2])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root")
    ap.add_argument("--copies", type=int, default=1)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--memory", action="store_true", help="also compare peak RSS on a corpus 10x larger")
    ap.add_argument("--memory-only", action="store_true", help="only the memory comparison")
    ap.add_argument("--memory-copies", default="1,10", help="corpus sizes for --memory, in copies")
    args = ap.parse_args()
    root = Path(args.root or tempfile.mkdtemp(prefix="bench-shard-"))
    if not (root / "data" / "clean").is_dir():
        build_corpus(root, args.copies)
    cfg = config.load([f"paths.root={root}", f"executor.workers={args.workers}"])
    if not (root / "data" / "tokenizer" / "tokenizer.json").is_file():
        tokenizer.run(cfg)
    if not args.memory_only:
        speed(root, cfg, args.workers)
    if args.memory or args.memory_only:
        memory(root / "data" / "tokenizer", args.workers, [int(x) for x in args.memory_copies.split(",")])


def speed(root: Path, cfg, workers: int) -> None:
    texts = [r["text"] for r in iter_rows(root / "data" / "clean", columns=["text"])]
    mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
    tok = bpe.load(root / "data" / "tokenizer")
    t = time.perf_counter()
    summary = shard.run(cfg)
    stage_s = time.perf_counter() - t

    t = time.perf_counter()
    tok.encode_special_tokens = True  # documents are plain text, as in the stage
    hf = tok.encode_batch(texts, add_special_tokens=False)
    bare_s = time.perf_counter() - t

    fast = fastenc.FastEncoder(tok)
    t = time.perf_counter()
    tk = fast.enc.encode_ordinary_batch(texts, num_threads=workers)
    tk_s = time.perf_counter() - t

    # identical ids: tiktoken (ranks mapped to ids) == tokenizers == what the stage wrote
    assert all(fast.rank_to_id[np.asarray(a, dtype=np.int64)].tolist() == b.ids for a, b in zip(tk, hf)), "tiktoken ids differ"
    stage_ids = np.concatenate(shards.open_split(root / "data" / "shards", "train") + shards.open_split(root / "data" / "shards", "val"))
    bare_tokens = sum(len(e.ids) + 1 for e in hf)
    assert len(stage_ids) == bare_tokens, (len(stage_ids), bare_tokens)
    cut = np.flatnonzero(stage_ids == 0)
    starts = np.concatenate([[0], cut[:-1] + 1])
    stage_docs = sorted(tuple(stage_ids[s:e].tolist()) for s, e in zip(starts, cut))
    assert stage_docs == sorted(tuple(e.ids) for e in hf), "stage ids differ from tokenizers"

    print(f"corpus: {len(texts)} docs, {mb:.1f} MB, {bare_tokens} tokens, vocab {tok.get_vocab_size()}, cpus={os.cpu_count()}")
    print(f"shard stage ({summary['encoder']}, workers={workers}): {mb / stage_s:7.2f} MB/s ({stage_s:.2f} s, "
          f"fallback docs {summary['fallback_docs']}, verified docs {summary['verified_docs']})")
    print(f"bare tokenizers encode_batch  : {mb / bare_s:7.2f} MB/s ({bare_s:.2f} s)")
    print(f"bare tiktoken, same vocab ({workers} thr): {mb / tk_s:7.2f} MB/s ({tk_s:.2f} s), ids identical")
    print(f"ratio stage / encode_batch    : {bare_s / stage_s:.2f}x  (goal >= 3x)")
    print(f"ratio stage / bare tiktoken   : {tk_s / stage_s:.2f}x")


def memory(tok_dir: Path, workers: int, copies: list[int]) -> None:
    """Peak RSS of the stage on `copies` copies of the corpus (distinct ids), same tokenizer."""
    base = pydoc_texts()
    first = None
    for n in copies:
        root = Path(tempfile.mkdtemp(prefix=f"bench-shard-{n}x-"))
        build_corpus(root, n, base, rows_per_file=100)  # >= 2 files: every run uses every worker
        s, largest, total = _rss_of_stage(root, tok_dir, workers)
        first = first or (largest, total)
        print(f"peak RSS {n:>3}x corpus: {largest:7.1f} MiB largest process, {total:7.1f} MiB all processes "
              f"({s:.1f} s; vs {copies[0]}x: {largest / first[0]:.2f} / {total / first[1]:.2f})")


if __name__ == "__main__":
    main()
