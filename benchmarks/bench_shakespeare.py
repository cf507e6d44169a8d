"""The shakespeare recipe against nanoGPT's own CPU quick start, in the same wall time.

Usage: python benchmarks/bench_shakespeare.py --text input.txt [--threads 2] [--iters 2000]
       [--order base,ours] [--set KEY=VALUE ...] [--keep DIR]

Text: one file (tinyshakespeare's input.txt, 1,115,394 bytes; not shipped, pass its path).
As nanoGPT's `data/shakespeare_char/prepare.py` does, the first 90 % is training text and
the last 10 % is held out; both sides are scored on the same held-out bytes.

Baseline: nanoGPT's `train_shakespeare_char` at the CPU line of its README (4 layers, 4
heads, 128 dims, context 64, batch 12, 2000 iterations, dropout 0, no biases, character
vocabulary, AdamW lr 1e-3 betas 0.9/0.99 weight decay 0.1 on matrices, 100 warm-up
iterations, cosine to 1e-4 over 2000, clip 1.0, uniformly random windows), as a plain
PyTorch loop. Its training wall time T (periodic evaluation not counted) is the budget.

Ours: the whole pipeline, `python -m pipeline run --stages ingest,clean,tokenizer,shard,pretrain
recipe=shakespeare source.paths=[train part]` in a subprocess with `pretrain.max_time`
capped at T (the recipe's own step count is sized to about that on 2 cores; whichever
comes first stops it). Its exported model scores the held-out text as one token stream.

Both score bits per byte over the held-out bytes in non-overlapping windows of their own
context. Prints both, the wall times and the ratio ours / baseline (goal <= 0.72).
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


class Attention(nn.Module):
    def __init__(self, d: int, h: int) -> None:
        super().__init__()
        self.c_attn, self.c_proj, self.h = nn.Linear(d, 3 * d, bias=False), nn.Linear(d, d, bias=False), h

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.h, C // self.h).transpose(1, 2) for t in self.c_attn(x).split(C, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class Block(nn.Module):
    def __init__(self, d: int, h: int) -> None:
        super().__init__()
        self.ln_1, self.attn = nn.LayerNorm(d, bias=False), Attention(d, h)
        self.ln_2 = nn.LayerNorm(d, bias=False)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d, bias=False), nn.GELU(), nn.Linear(4 * d, d, bias=False))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class NanoGPT(nn.Module):
    """nanoGPT's model at bias=False, dropout 0 (tied embeddings, scaled c_proj init)."""

    def __init__(self, vocab: int, block: int = 64, n_layer: int = 4, n_head: int = 4, d: int = 128) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(block, d)
        self.h = nn.ModuleList(Block(d, n_head) for _ in range(n_layer))
        self.ln_f, self.lm_head = nn.LayerNorm(d, bias=False), nn.Linear(d, vocab, bias=False)
        self.wte.weight = self.lm_head.weight
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * n_layer) if name.endswith("c_proj.weight") or name.endswith("mlp.2.weight") else 0.02
                nn.init.normal_(p, std=std)

    def forward(self, idx):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for b in self.h:
            x = b(x)
        return self.lm_head(self.ln_f(x))


def nanogpt_lr(it: int, iters: int, warm: int = 100, lr: float = 1e-3, min_lr: float = 1e-4) -> float:
    if it < warm:
        return lr * (it + 1) / (warm + 1)
    ratio = min(1.0, (it - warm) / max(1, iters - warm))
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)


def train_baseline(train: np.ndarray, vocab: int, iters: int, seed: int) -> tuple[nn.Module, float]:
    torch.manual_seed(seed)
    model = NanoGPT(vocab)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
                             {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                            lr=1e-3, betas=(0.9, 0.99))
    data = torch.from_numpy(train.astype(np.int64))
    gen = torch.Generator().manual_seed(seed)
    B, T = 12, 64
    t0 = time.perf_counter()
    for it in range(iters):
        for g in opt.param_groups:
            g["lr"] = nanogpt_lr(it, iters)
        ix = torch.randint(len(data) - T, (B,), generator=gen)
        x = torch.stack([data[i : i + T] for i in ix])
        y = torch.stack([data[i + 1 : i + 1 + T] for i in ix])
        loss = F.cross_entropy(model(x).view(-1, vocab), y.view(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model, time.perf_counter() - t0


@torch.no_grad()
def windows_bpb(model, ids: np.ndarray, context: int, n_bytes: int) -> float:
    """Bits per byte of ``ids`` read in non-overlapping windows of ``context`` (each window's
    first token predicted from nothing, as nanoGPT's evaluation does)."""
    model.eval()
    data = torch.from_numpy(ids.astype(np.int64))
    nats, scored = 0.0, 0
    starts = list(range(0, len(data) - 1, context))
    for i in range(0, len(starts), 32):
        rows = [data[s : s + context + 1] for s in starts[i : i + 32]]
        for r in rows:
            logits = model(r[None, :-1])
            nats += float(F.cross_entropy(logits[0].float(), r[1:], reduction="sum"))
            scored += len(r) - 1
    assert scored == len(ids) - 1
    return nats / n_bytes / math.log(2)


def run_ours(train_text: str, budget_s: float, threads: int, extra: list[str], work: Path) -> dict:
    src = work / "input.txt"
    src.write_text(train_text, encoding="utf-8")
    secs = int(math.ceil(budget_s))
    cmd = [sys.executable, "-m", "pipeline", "run", "--stages", "ingest,clean,tokenizer,shard,pretrain",
           "recipe=shakespeare", f"source.paths=[{src}]", f"paths.root={work}",
           f"pretrain.max_time=00:00:{secs // 60:02d}:{secs % 60:02d}", "pretrain.progress_bar=false",
           f"hardware.num_threads={threads}", *extra]
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    return {"pipeline_s": round(time.perf_counter() - t0, 1)}


def score_ours(work: Path, val_text: str) -> tuple[float, dict]:
    import json

    from pipeline.model.runs import load_trained
    from pipeline.tokenize.bpe import encode_plain, load
    from pipeline.tokenize.special import EOT

    tok = load(work / "data" / "tokenizer" / "tokenizer.json")
    ids = np.asarray([tok.token_to_id(EOT), *encode_plain(tok, [val_text])[0]], dtype=np.int64)
    model, meta = load_trained(work / "models" / "pretrain")
    summary = json.loads((work / "models" / "pretrain" / "_summary.json").read_text())
    block = int(model.cfg.block_size) if hasattr(model, "cfg") else int(meta["model"]["block_size"])
    bpb = windows_bpb(model, ids, block, len(val_text.encode("utf-8")))
    info = {k: summary.get(k) for k in ("steps", "train_seconds", "tokens_seen", "val_bpb") if k in summary}
    info.update(block=block, val_tokens=len(ids) - 1, bytes_per_token=round(len(val_text.encode()) / (len(ids) - 1), 3))
    return bpb, info


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--text", required=True, help="the text file (tinyshakespeare's input.txt)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=2000, help="nanoGPT's max_iters (the README's CPU line: 2000)")
    ap.add_argument("--order", default="base,ours", help="which side runs first (ours' budget needs base first)")
    ap.add_argument("--budget", type=float, default=None, help="ours' training seconds if ours runs first")
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--set", nargs="*", default=[], metavar="OVERRIDE", help="extra overrides for our run")
    ap.add_argument("--keep", default=None, help="keep our run's files here (default: a temp dir)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    text = Path(args.text).read_text(encoding="utf-8")
    cut = int(len(text) * 0.9)
    train_text, val_text = text[:cut], text[cut:]
    n_val_bytes = len(val_text.encode("utf-8"))
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    print(f"text: {len(text):,} chars, vocab {len(chars)}; train {len(train_text):,}, val {len(val_text):,} "
          f"({n_val_bytes:,} bytes); {args.threads} threads", flush=True)
    res: dict[str, dict] = {}
    budget = args.budget
    for side in args.order.split(","):
        if side == "base":
            train = np.asarray([stoi[c] for c in train_text], dtype=np.int64)
            val = np.asarray([stoi[c] for c in val_text], dtype=np.int64)
            model, secs = train_baseline(train, len(chars), args.iters, args.seed)
            res["base"] = {"bpb": windows_bpb(model, val, 64, n_val_bytes), "train_s": round(secs, 1)}
            budget = budget or secs
        else:
            if budget is None:
                raise SystemExit("--order ours,base needs --budget (the baseline's training seconds)")
            with tempfile.TemporaryDirectory() as tmp:
                work = Path(args.keep or tmp)
                work.mkdir(parents=True, exist_ok=True)
                info = run_ours(train_text, budget, args.threads, args.set, work)
                bpb, more = score_ours(work, val_text)
            res["ours"] = {"bpb": bpb, **info, **more}
        print(f"{side}: {res[side]}", flush=True)
    if len(res) < 2:
        return
    base, ours = res["base"], res["ours"]
    print("\n| side | held-out bpb | training s | detail |\n| --- | --- | --- | --- |")
    print(f"| nanoGPT CPU quick start ({args.iters} iters) | {base['bpb']:.4f} | {base['train_s']} | |")
    print(f"| ours, recipe=shakespeare | {ours['bpb']:.4f} | {ours.get('train_seconds')} | "
          f"{ours.get('steps')} steps, {ours['bytes_per_token']} bytes/token, pipeline {ours['pipeline_s']} s |")
    print(f"\nratio ours / baseline: {ours['bpb'] / base['bpb']:.3f} (goal <= 0.72)")


if __name__ == "__main__":
    main()
