"""Tokenizer stage time against a bare `tokenizers` BPE trainer on the same sample.

Usage: python benchmarks/bench_tokenizer.py [--root DIR] [--copies N] [--repeat R] [--without-stats] [overrides ...]

With no --root, the corpus is the pydoc text of up to 200 standard-library modules (about
13 MB per copy, see bench_shard.py). The bare trainer gets the stage's exact training sample
as a list already in memory and the same recipe (`bpe.build`), so it is the floor;
the stage also streams the sample from Parquet (twice: sizes, then text), computes
stats.json (validation bytes per token overall and per language, round-trip and tiktoken
checks) and writes its files. Both must produce the same tokenizer.json. Best of --repeat.
Goal: stage time at most 1.10x the bare trainer's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_shard import build_corpus

from pipeline.core import config

from pipeline.stages import tokenizer
from pipeline.tokenize import bpe
from pipeline.tokenize import sample as tsample


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root")
    ap.add_argument("--copies", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--without-stats", action="store_true",
                    help="also time the stage with its stats.json work stubbed out (what the statistics cost)")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    root = Path(args.root or tempfile.mkdtemp(prefix="bench-tok-"))
    if not (root / "data" / "clean").is_dir():
        build_corpus(root, args.copies)
    cfg = config.load([f"paths.root={root}", *args.overrides])

    files, threshold, plan = tsample.training_sample(cfg)
    seen = {"docs": 0, "bytes": 0}
    texts = list(tsample.train_texts(files, float(cfg.shard.val_fraction), plan["seed"], threshold, seen))

    bare_times, stage_times, no_stats_times = [], [], []
    bare_json = None
    for _ in range(args.repeat):
        tok, trainer = bpe.build(cfg.tokenizer)
        t = time.perf_counter()
        tok.train_from_iterator(texts, trainer=trainer)
        bare_times.append(time.perf_counter() - t)
        bare_json = tok.to_str()
        t = time.perf_counter()
        summary = tokenizer.run(cfg)
        stage_times.append(time.perf_counter() - t)
        if args.without_stats:
            real, tokenizer.compute_stats = tokenizer.compute_stats, lambda *a, **k: {"bytes_per_token": 0.0}
            try:
                t = time.perf_counter()
                tokenizer.run(cfg)
                no_stats_times.append(time.perf_counter() - t)
            finally:
                tokenizer.compute_stats = real
    stage_json = bpe.load(cfg.paths.tokenizer).to_str()
    assert json.loads(stage_json)["model"] == json.loads(bare_json)["model"], "stage and bare trainer disagree"
    bare, stage = min(bare_times), min(stage_times)
    mb = seen["bytes"] / 1e6
    print(f"sample: {seen['docs']} docs, {mb:.1f} MB (of {plan['available_bytes'] / 1e6:.1f} MB of training text), "
          f"vocab {cfg.tokenizer.vocab_size}, pattern {cfg.tokenizer.pattern}, cpus={os.cpu_count()}")
    print(f"bare tokenizers trainer: {bare:6.2f} s  (runs: {', '.join(f'{x:.2f}' for x in bare_times)})")
    print(f"tokenizer stage        : {stage:6.2f} s  (runs: {', '.join(f'{x:.2f}' for x in stage_times)}; "
          f"training inside it {summary['train_seconds']:.2f} s)")
    print(f"ratio stage / bare     : {stage / bare:.3f}x  (goal <= 1.10x); same merges: yes")
    if no_stats_times:
        print(f"stage without stats.json work: {min(no_stats_times):6.2f} s, {min(no_stats_times) / bare:.3f}x bare")


if __name__ == "__main__":
    main()
