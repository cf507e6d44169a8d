"""Train the LSTM baseline of the report: a recurrent model on the same train tokens.

The n-gram model says what counting buys; the LSTM says what a neural model without
attention buys for a comparable budget, so a transformer that only matches the LSTM is
not worth its cost. It is trained here, inside the eval stage, with a plain PyTorch loop
on random windows read straight from the memory-mapped train shards (memory is bounded by
one batch), seeded from ``cfg.seed``: the same inputs give the same baseline every run.
"""

from __future__ import annotations

import time

import numpy as np

from pipeline.core.errors import PipelineError
from pipeline.training.schedule import lr_at


def _windows(arrays: list[np.ndarray], rng: np.random.Generator, batch: int, length: int) -> np.ndarray:
    """``batch`` windows of ``length + 1`` tokens, each from one file, files picked by size."""
    usable = [a for a in arrays if len(a) > length + 1]
    sizes = np.array([len(a) - length - 1 for a in usable], dtype=np.float64)
    files = rng.choice(len(usable), size=batch, p=sizes / sizes.sum())
    out = np.empty((batch, length + 1), dtype=np.int64)
    for i, f in enumerate(files):
        start = int(rng.integers(0, len(usable[f]) - length - 1))
        out[i] = usable[f][start : start + length + 1]
    return out


def train_lstm(train: list[np.ndarray], vocab_size: int, lc, seed: int, progress=None, device: str = "cpu"):
    """(trained LSTMLM in eval mode, on ``device``, info) after ``lc.steps`` AdamW steps on train
    windows. The weights are initialised on the CPU, so a seed gives the same start anywhere."""
    import torch
    import torch.nn.functional as F

    from pipeline.model.lstm import LSTMConfig, LSTMLM

    length, batch, steps = int(lc.seq_len), int(lc.batch_size), int(lc.steps)
    if not any(len(a) > length + 1 for a in train):
        raise PipelineError(
            f"the train split has no shard longer than eval.lstm.seq_len+1={length + 1} tokens: "
            f"lower eval.lstm.seq_len or set eval.lstm.enabled=false"
        )
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = LSTMLM(LSTMConfig.from_dict(dict(lc), vocab_size=int(vocab_size))).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=float(lc.lr), betas=(0.9, 0.99),
                            weight_decay=float(lc.get("weight_decay", 0.0)))
    base_lr, min_lr = float(lc.lr), float(lc.lr) * float(lc.get("min_lr_ratio", 0.1))
    warmup = int(lc.get("warmup_steps", 0))
    model.train()
    t0 = time.perf_counter()
    losses = []
    for step in range(steps):
        lr = lr_at(step, base_lr, min_lr, warmup, steps)
        for group in opt.param_groups:
            group["lr"] = lr
        xy = torch.from_numpy(_windows(train, rng, batch, length)).to(device)
        logits = model(xy[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), xy[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), float(lc.get("grad_clip", 1.0)))
        opt.step()
        losses.append(loss.item())
        if progress is not None:
            progress(step + 1, steps, losses[-1])
    model.eval()
    seconds = time.perf_counter() - t0
    tail = losses[-max(1, min(20, len(losses))) :]
    info = {
        "params": model.num_params(),
        "steps": steps,
        "tokens_seen": steps * batch * length,
        "seconds": round(seconds, 3),
        "final_train_loss": round(float(np.mean(tail)), 4) if losses else None,
        "config": model.cfg.to_dict(),
    }
    return model, info
