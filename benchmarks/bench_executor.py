"""executor=dask (a LocalCluster) against the local process pool, on the clean and shard stages.

Usage: python benchmarks/bench_executor.py [--modules N] [--rows-per-shard R] [--workers W]

The reference is `concurrent.futures.ProcessPoolExecutor` (executor=local), which is what a
single machine should use; Dask earns its overhead only across machines. This measures
that overhead on one machine: a LocalCluster of W single-threaded worker processes started
per stage (as `executor=dask` with no address does) against a pool of W processes, same
shards, and checks that both write byte-identical outputs. The corpus is the pydoc text of
up to N standard-library modules, ingested by the real `files` source.
"""

from __future__ import annotations

import argparse
import pkgutil
import pydoc
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.core.config import load  # noqa: E402


def corpus(dst: Path, n: int) -> int:
    dst.mkdir(parents=True)
    written = 0
    for mod in sorted(m.name for m in pkgutil.iter_modules() if not m.name.startswith("_")):
        if written >= n or mod in ("antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo"):
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                text = pydoc.render_doc(__import__(mod), renderer=pydoc.plaintext)
        except BaseException:  # noqa: BLE001 - some modules refuse to import here; skip them
            continue
        (dst / f"{mod}.txt").write_text(text)
        written += 1
    return written


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name not in ("_summary.json", "index.json")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--modules", type=int, default=200)
    ap.add_argument("--rows-per-shard", type=int, default=25)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    from pipeline.stages import clean, ingest, shard, tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        n = corpus(base / "corpus", args.modules)
        common = ["source=files", f"source.paths=[{base / 'corpus'}]", f"source.rows_per_shard={args.rows_per_shard}",
                  f"paths.raw={base / 'raw'}", f"paths.tokenizer={base / 'tok'}", "tokenizer.vocab_size=4096"]
        ingest.run(load([f"paths.root={base}", *common]))
        shards = len(list((base / "raw").glob("*.parquet")))
        print(f"corpus: {n} modules, {shards} raw shards, workers={args.workers}")
        results = {}
        for name, ex in (("local", ["executor=local"]), ("dask", ["executor=dask"])):
            cfg = load([f"paths.root={base / name}", *common, *ex, f"executor.workers={args.workers}"])
            t0 = time.perf_counter()
            clean.run(cfg)
            t_clean = time.perf_counter() - t0
            if name == "local":
                tokenizer.run(cfg)
            t0 = time.perf_counter()
            shard.run(cfg)
            t_shard = time.perf_counter() - t0
            results[name] = (t_clean, t_shard)
            print(f"{name:>5}: clean {t_clean:6.2f} s   shard {t_shard:6.2f} s")
        same = all(tree(base / "local" / "data" / d) == tree(base / "dask" / "data" / d) for d in ("clean", "shards"))
        print(f"byte-identical outputs: {same}")
        (lc, ls), (dc, ds) = results["local"], results["dask"]
        print(f"ratio dask/local: clean {dc / lc:.2f}x   shard {ds / ls:.2f}x")


if __name__ == "__main__":
    main()
