"""Shard stage throughput against a bare `tokenizers` encode_batch loop over the same documents.

Usage: python benchmarks/bench_shard.py [--root DIR] [--copies N]
With no --root, a corpus is built from the pydoc text of the standard library (repeated
--copies times with distinct ids). Prints tokens/s for both and the ratio (stage / bare).
"""

from __future__ import annotations

import argparse
import os
import pkgutil
import pydoc
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


def build_corpus(root: Path, copies: int) -> None:
    out = root / "data" / "clean"
    out.mkdir(parents=True, exist_ok=True)
    texts = []
    warnings.simplefilter("ignore")
    for m in sorted(m.name for m in pkgutil.iter_modules() if not m.name.startswith("_"))[:200]:
        if m in {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo"}:
            continue
        try:
            texts.append(pydoc.render_doc(__import__(m), renderer=pydoc.plaintext))
        except Exception:  # noqa: BLE001 - some modules do not import here; skip them
            continue
    rows = [
        {"id": doc_id(f"{c}:{t}"), "text": t, "url": f"bench:{c}", "source": "bench", "raw_id": ""}
        for c in range(copies) for t in texts
    ]
    for i in range(0, len(rows), 200):
        pq.write_table(pa.Table.from_pylist(rows[i : i + 200]), out / f"part-{i // 200:05d}.parquet")


def bare(root: Path, tok_path: Path) -> int:
    tok = tokenizer.load(tok_path)
    texts = [r["text"] for r in iter_rows(root / "data" / "clean", columns=["text"])]
    encs = tok.encode_batch(texts, add_special_tokens=False)
    arr = np.concatenate([np.asarray(e.ids + [0], dtype=np.uint16) for e in encs])
    with open(root / "bare.bin", "wb") as f:
        f.write(arr.tobytes())
    return len(arr)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root")
    ap.add_argument("--copies", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    root = Path(args.root or tempfile.mkdtemp(prefix="bench-shard-"))
    if not (root / "data" / "clean").is_dir():
        build_corpus(root, args.copies)
    cfg = config.load([f"paths.root={root}", f"executor.workers={args.workers}"])
    if not (root / "data" / "tokenizer" / "tokenizer.json").is_file():
        tokenizer.run(cfg)
    t = time.perf_counter()
    summary = shard.run(cfg)
    stage_s = time.perf_counter() - t
    stage_tokens = summary["train_tokens"] + summary["val_tokens"]
    t = time.perf_counter()
    bare_tokens = bare(root, root / "data" / "tokenizer")
    bare_s = time.perf_counter() - t
    assert bare_tokens == stage_tokens, (bare_tokens, stage_tokens)
    print(f"corpus: {summary['train_docs'] + summary['val_docs']} docs, {stage_tokens} tokens, cpus={os.cpu_count()}")
    print(f"shard stage     : {stage_tokens / stage_s:12,.0f} tokens/s ({stage_s:.2f} s, workers={args.workers})")
    print(f"bare encode_batch: {bare_tokens / bare_s:12,.0f} tokens/s ({bare_s:.2f} s)")
    print(f"ratio (stage/bare): {bare_s / stage_s:.2f}x")


if __name__ == "__main__":
    main()
