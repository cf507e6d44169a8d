"""Quality per CPU-minute: val bits per byte after the same wall time on the same byte-level
text, our best CPU config (trained by our Lightning stack: pipeline.training.trainer.fit) vs a
nanoGPT-shaped baseline written as a plain PyTorch loop.

Usage: python benchmarks/bench_quality_per_minute.py [--budget 150] [--threads 2] [--order ours,base]
       [--model gpt_tiny] [--pretrain default] [--block 128] [--batch N] [--seed 0] [--set KEY=VALUE ...]

Text: pydoc pages of 84 stdlib modules (the kind of text the default pipeline trains on),
UTF-8 bytes, vocabulary 256; every 10th module is held out for validation. Baseline:
nanoGPT's shakespeare_char shape scaled as the issue fixes it: 4 layers, 4 heads, 128 dims,
context 64, batch 12, learned positions, LayerNorm, GELU, AdamW lr 1e-3 (betas 0.9/0.99,
warmup 100, cosine to 1e-4), uniformly random windows. Ours: the shipped CPU defaults, read
from conf/model/gpt_tiny.yaml and conf/pretrain/default.yaml (RoPE, RMSNorm, SwiGLU, tied
embeddings; Muon with its schedule, batch size and sampling), at a context of 128 bytes,
trained by our Lightning `fit()`. Each side gets `--budget` seconds of training (its
schedule is sized from a short timed calibration with its own optimizer, and training stops
at the budget either way); then both score the first `--val-bytes` held-out bytes in
non-overlapping windows of their own context. Prints both bpb values and the ratio
ours / baseline (goal <= 0.90).
"""

from __future__ import annotations

import argparse
import importlib
import math
import pydoc
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_lightning_overhead import ArrayData

from pipeline.model.runs import build_model
from pipeline.training.lightning import LitGPT, WindowBatches
from pipeline.training.trainer import fit

MODULES = sorted(["abc", "argparse", "ast", "asyncio", "base64", "bisect", "calendar", "cmd", "code", "codecs", "collections", "colorsys", "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "dis", "email", "enum", "filecmp", "fnmatch", "fractions", "functools", "getopt", "gettext", "glob", "gzip", "hashlib", "heapq", "hmac", "html", "http", "inspect", "io", "ipaddress", "itertools", "json", "keyword", "locale", "logging", "mailbox", "math", "mimetypes", "numbers", "operator", "optparse", "os", "pathlib", "pickle", "platform", "pprint", "queue", "random", "re", "sched", "secrets", "selectors", "shlex", "shutil", "signal", "socket", "sqlite3", "statistics", "string", "struct", "subprocess", "tarfile", "tempfile", "textwrap", "threading", "timeit", "tokenize", "traceback", "typing", "unittest", "urllib", "uuid", "warnings", "weakref", "zipfile"])

ROOT = Path(__file__).resolve().parent.parent
TRAIN_KEYS = ("batch_size", "optimizer", "lr", "min_lr", "warmup_steps", "weight_decay", "betas", "grad_clip",
              "schedule", "decay_frac", "sampling")


def shipped(model: str = "gpt_tiny", pretrain: str = "default", block: int = 128, batch: int | None = None):
    """Our side's model and training settings, read from the shipped conf files (nothing is
    tuned here that a user of `hardware=cpu model=gpt_tiny` would not get), with the context
    set in bytes: the shipped 256 is in BPE tokens (~2.6 bytes each); at one byte per token,
    128 keeps the steps short enough for ~1,500 optimizer steps in 150 s on 2 cores."""
    m = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "model" / f"{model}.yaml"))
    t = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "pretrain" / f"{pretrain}.yaml"))
    m["block_size"] = block
    train = {k: t[k] for k in TRAIN_KEYS}
    train["betas"] = tuple(train["betas"])
    if batch:
        train["batch_size"] = batch
    return m, train


def corpus() -> tuple[np.ndarray, np.ndarray]:
    train, val = [], []
    for i, name in enumerate(MODULES):
        try:
            text = pydoc.plain(pydoc.render_doc(importlib.import_module(name), renderer=pydoc.plaintext))
        except ImportError:  # a module this Python build lacks
            continue
        (val if i % 10 == 5 else train).append(np.frombuffer(text.encode("utf-8"), dtype=np.uint8))
    return np.concatenate(train).astype(np.uint16), np.concatenate(val).astype(np.uint16)


# ---------------------------------------------------------------- nanoGPT-shaped baseline


class CausalSelfAttention(nn.Module):
    def __init__(self, d: int, h: int) -> None:
        super().__init__()
        self.c_attn, self.c_proj, self.h = nn.Linear(d, 3 * d), nn.Linear(d, d), h

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.h, C // self.h).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class NanoBlock(nn.Module):
    def __init__(self, d: int, h: int) -> None:
        super().__init__()
        self.ln_1, self.attn, self.ln_2 = nn.LayerNorm(d), CausalSelfAttention(d, h), nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class NanoGPT(nn.Module):
    def __init__(self, vocab=256, block=64, n_layer=4, n_head=4, d=128) -> None:
        super().__init__()
        self.block_size = block
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(block, d)
        self.h = nn.ModuleList(NanoBlock(d, n_head) for _ in range(n_layer))
        self.ln_f, self.lm_head = nn.LayerNorm(d), nn.Linear(d, vocab, bias=False)
        self.wte.weight = self.lm_head.weight
        for n, p in self.named_parameters():
            if p.dim() >= 2:
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * n_layer) if n.endswith("c_proj.weight") else 0.02)
            elif n.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, idx):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for b in self.h:
            x = b(x)
        return self.lm_head(self.ln_f(x))


def train_baseline(train: np.ndarray, budget: float, seed: int = 0) -> tuple[nn.Module, dict]:
    torch.manual_seed(seed)
    model = NanoGPT()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
                            lr=1e-3, betas=(0.9, 0.99))
    rng = np.random.default_rng(seed)
    data = torch.from_numpy(train.astype(np.int64))
    B, T = 12, 64

    def step(i: int, total: int) -> float:
        warm = 100
        lr = 1e-3 * (i + 1) / warm if i < warm else 1e-4 + 0.5 * (1 + math.cos(math.pi * min(1.0, (i - warm) / max(1, total - warm)))) * (1e-3 - 1e-4)
        for g in opt.param_groups:
            g["lr"] = lr
        ix = torch.from_numpy(rng.integers(0, len(data) - T - 1, B))
        x = torch.stack([data[i : i + T] for i in ix])
        y = torch.stack([data[i + 1 : i + 1 + T] for i in ix])
        loss = F.cross_entropy(model(x).view(-1, 256), y.view(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    t0 = time.perf_counter()
    times = []
    for i in range(10):  # calibration steps count towards the budget; the first two (allocation) are not timed
        t = time.perf_counter()
        step(i, 10**9)
        times.append(time.perf_counter() - t)
    per_step = float(np.median(times[2:]))
    total = max(20, int(budget / per_step))
    i = 10
    while time.perf_counter() - t0 < budget and i < total:
        step(i, total)
        i += 1
    return model, {"steps": i, "tokens": i * B * T, "seconds": round(time.perf_counter() - t0, 1)}


def train_ours(train: np.ndarray, budget: float, model_cfg: dict, tc: dict, seed: int = 0) -> tuple[nn.Module, dict]:
    import lightning as L

    from pipeline.training.optim import build_optimizer

    t0 = time.perf_counter()  # the calibration counts towards the budget, as for the baseline
    torch.manual_seed(seed)
    probe = build_model(model_cfg, 256)
    opt = build_optimizer(probe, tc["optimizer"], tc["lr"], tc["betas"], tc["weight_decay"])
    batches = WindowBatches([train], model_cfg["block_size"], tc["batch_size"], seed)
    times = []
    for s in range(12):  # the real optimizer; the first four steps (allocation, warm-up) are not timed
        t = time.perf_counter()
        x, y = batches[s]
        F.cross_entropy(probe(x).view(-1, 256), y.view(-1)).backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t)
    per_step = float(np.median(times[4:])) * 1.05  # + the Lightning loop and data path at ~90 ms steps
    left = budget - (time.perf_counter() - t0) - 2.0  # - Trainer setup
    total = max(20, int(left / per_step))
    L.seed_everything(seed, verbose=False)
    module = LitGPT(model=model_cfg, vocab_size=256, lr=tc["lr"], min_lr=tc["min_lr"],
                    warmup_steps=tc["warmup_steps"], max_steps=total, weight_decay=tc["weight_decay"],
                    betas=tc["betas"], optimizer=tc["optimizer"], schedule=tc["schedule"], decay_frac=tc["decay_frac"])
    dm = ArrayData([train], model_cfg["block_size"], tc["batch_size"], total, tc["sampling"], seed)
    secs = max(1, int(budget - (time.perf_counter() - t0)))
    with tempfile.TemporaryDirectory() as work:
        res = fit(module, dm, Path(work), {**tc, "val_every": 10**6, "log_every": 50, "progress_bar": False,
                                          "tensorboard": False, "max_time": f"00:00:{secs // 60:02d}:{secs % 60:02d}"},
                  max_steps=total)
    return module.model, {"steps": res["steps"], "planned_steps": total,
                          "tokens": res["steps"] * tc["batch_size"] * model_cfg["block_size"],
                          "seconds": round(time.perf_counter() - t0, 1)}


@torch.no_grad()
def val_bpb(model: nn.Module, val: np.ndarray, context: int, n_bytes: int) -> float:
    model.eval()
    data = torch.from_numpy(val[: n_bytes + 1].astype(np.int64))
    nats, count = 0.0, 0
    starts = list(range(0, len(data) - 1, context))
    for i in range(0, len(starts), 32):
        rows = [data[s : s + context + 1] for s in starts[i : i + 32]]
        rows = [r for r in rows if len(r) == context + 1]
        if not rows:
            continue
        t = torch.stack(rows)
        logits = model(t[:, :-1])
        nats += float(F.cross_entropy(logits.view(-1, logits.size(-1)), t[:, 1:].reshape(-1), reduction="sum"))
        count += t[:, 1:].numel()
    return nats / count / math.log(2)  # one token = one byte


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", type=float, default=60.0, help="training seconds per side")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--val-bytes", type=int, default=65536)
    ap.add_argument("--order", default="ours,base", help="which side trains first (alternate between runs)")
    ap.add_argument("--model", default="gpt_tiny", help="our model: a conf/model file")
    ap.add_argument("--pretrain", default="default", help="our training settings: a conf/pretrain file")
    ap.add_argument("--block", type=int, default=128, help="our context length in bytes")
    ap.add_argument("--batch", type=int, default=None, help="our batch size (default: the conf/pretrain file's)")
    ap.add_argument("--seed", type=int, default=0, help="both sides' init and data order")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="override our training settings as `pretrain.KEY=VALUE` would, e.g. lr=2e-2 min_lr=2e-3")
    args = ap.parse_args()
    model_cfg, tc = shipped(args.model, args.pretrain, args.block, args.batch)
    for item in args.set:
        key, value = item.split("=", 1)
        if key not in tc:
            raise SystemExit(f"--set {item}: {key} is not one of {', '.join(tc)}")
        tc[key] = OmegaConf.to_container(OmegaConf.create(f"v: {value}"))["v"]  # parsed as the conf file is
    tc["betas"] = tuple(tc["betas"])
    print(f"ours: {model_cfg} {tc}", flush=True)
    torch.set_num_threads(args.threads)
    train, val = corpus()
    print(f"text: {len(train):,} train bytes, {len(val):,} val bytes; budget {args.budget:.0f} s per side, "
          f"{args.threads} threads", flush=True)
    results = {}
    for side in args.order.split(","):
        if side == "ours":
            model, info = train_ours(train, args.budget, model_cfg, tc, args.seed)
            bpb = val_bpb(model, val, model_cfg["block_size"], args.val_bytes)
        else:
            model, info = train_baseline(train, args.budget, args.seed)
            bpb = val_bpb(model, val, 64, args.val_bytes)
        params = sum(p.numel() for p in model.parameters())
        results[side] = bpb
        print(f"{side}: val bpb {bpb:.4f}  ({params:,} params, {info})", flush=True)
    print(f"\nratio ours/baseline: {results['ours'] / results['base']:.3f} "
          f"({(1 - results['ours'] / results['base']) * 100:+.1f} % lower bpb for ours; goal >= 10 %)")


if __name__ == "__main__":
    main()
