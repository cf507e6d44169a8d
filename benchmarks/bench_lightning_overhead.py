"""Lightning overhead: median step time of our training step (pipeline.training.trainer.fit,
with the shipped callbacks, loggers, progress bar and checkpointing) vs a raw PyTorch loop
over the same model, optimizer, LR schedule, gradient clipping and batches.

Usage: python benchmarks/bench_lightning_overhead.py [--model gpt_tiny] [--pretrain default]
           [--steps 20] [--rounds 3] [--batch-size N] [--block-size N] [--accumulate N]

Both sides run in this process, interleaved (Lightning, raw, Lightning, raw, ...), so load
from other processes on a shared machine hits both alike. A "step" is one optimizer step
(data fetch included) timed from one step's end to the next; the first 3 steps of every run
are warm-up and not counted. Prints the medians and the ratio; the goal is <= 1.05.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.core.config import load
from pipeline.model.runs import build_model
from pipeline.training.lightning import LitGPT, WindowBatches, _StepDataModule, lr_at
from pipeline.training.optim import build_optimizer
from pipeline.training.trainer import fit

WARMUP = 3


class ArrayData(_StepDataModule):
    """The pretraining data path (step-indexed WindowBatches) over in-memory token arrays."""

    def __init__(self, arrays, block_size, batch_size, max_steps, sampling="epoch", seed=0):
        super().__init__()
        self.arrays, self.block_size, self.batch_size, self.max_steps = arrays, block_size, batch_size, max_steps
        self.sampling, self.seed = sampling, seed

    def _train_dataset(self, rank, world):
        return WindowBatches(self.arrays, self.block_size, self.batch_size, self.seed, rank, world, self.sampling)

    def _val_batches(self):
        return []

    def has_val(self):
        return False


class StepTimes(L.Callback):
    def __init__(self):
        self.ends: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if (batch_idx + 1) % trainer.accumulate_grad_batches == 0:
            self.ends.append(time.perf_counter())


def lightning_run(model_cfg, pc, vocab, arrays, steps, state) -> list[float]:
    module = LitGPT(model={"kind": "gpt", **model_cfg}, vocab_size=vocab, lr=float(pc.lr), min_lr=float(pc.min_lr),
                    warmup_steps=int(pc.warmup_steps), max_steps=steps, weight_decay=float(pc.weight_decay),
                    betas=tuple(pc.betas), optimizer=str(pc.optimizer), schedule=str(pc.schedule))
    module.model.load_state_dict(state)
    dm = ArrayData(arrays, model_cfg["block_size"], int(pc.batch_size), steps)
    timer = StepTimes()
    with tempfile.TemporaryDirectory() as work:
        tc = {**pc, "max_steps": steps, "val_every": 10**6, "ckpt_every": 10**6}
        fit(module, dm, Path(work), tc, max_steps=steps, callbacks=(timer,))
    return list(np.diff(timer.ends[WARMUP - 1:]))


def raw_run(model_cfg, pc, vocab, arrays, steps, state) -> list[float]:
    model = build_model({"kind": "gpt", **model_cfg}, vocab)
    model.load_state_dict(state)
    model.train()
    opt = build_optimizer(model, str(pc.optimizer), float(pc.lr), tuple(pc.betas), float(pc.weight_decay))
    ratio, warm = float(pc.min_lr) / float(pc.lr), int(pc.warmup_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, 1.0, ratio, warm, steps, str(pc.schedule)))
    data = WindowBatches(arrays, model_cfg["block_size"], int(pc.batch_size), 0)
    k, clip = int(pc.accumulate), float(pc.grad_clip or 0)
    ends = []
    for step in range(steps):
        for j in range(k):
            x, y = data[step * k + j]
            logits = model(x)
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1)) / k
            loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        ends.append(time.perf_counter())
    return list(np.diff(ends[WARMUP - 1:]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gpt_tiny")
    ap.add_argument("--pretrain", default="default")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=0, help="override pretrain.batch_size")
    ap.add_argument("--block-size", type=int, default=0, help="override model.block_size")
    ap.add_argument("--accumulate", type=int, default=0, help="override pretrain.accumulate")
    ap.add_argument("--vocab", type=int, default=512)
    args = ap.parse_args()
    extra = [f"model={args.model}", f"pretrain={args.pretrain}", "pretrain.progress_bar=true"]
    extra += [f"pretrain.batch_size={args.batch_size}"] * bool(args.batch_size)
    extra += [f"model.block_size={args.block_size}"] * bool(args.block_size)
    extra += [f"pretrain.accumulate={args.accumulate}"] * bool(args.accumulate)
    cfg = load(extra)
    pc = cfg.pretrain
    model_cfg = {k: v for k, v in dict(cfg.model).items() if k != "kind"}
    torch.manual_seed(0)
    state = build_model({"kind": "gpt", **model_cfg}, args.vocab).state_dict()
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, args.vocab, 2_000_000, dtype=np.uint16)]
    light, raw = [], []
    for r in range(args.rounds):
        light += lightning_run(model_cfg, pc, args.vocab, arrays, args.steps, state)
        raw += raw_run(model_cfg, pc, args.vocab, arrays, args.steps, state)
        print(f"round {r + 1}: lightning {statistics.median(light) * 1e3:.1f} ms, raw {statistics.median(raw) * 1e3:.1f} ms",
              flush=True)
    ml, mr = statistics.median(light), statistics.median(raw)
    tokens = int(pc.batch_size) * model_cfg["block_size"] * int(pc.accumulate)
    print(f"\nmodel={args.model} pretrain={args.pretrain} batch={pc.batch_size}x{model_cfg['block_size']} "
          f"accumulate={pc.accumulate} ({tokens} tokens/step), optimizer={pc.optimizer}, threads={torch.get_num_threads()}")
    print(f"median step: ours (Lightning) {ml * 1e3:.1f} ms, raw loop {mr * 1e3:.1f} ms "
          f"over {len(light)}/{len(raw)} steps; ratio {ml / mr:.3f} ({(ml - mr) * 1e3:+.1f} ms/step)")


if __name__ == "__main__":
    main()
