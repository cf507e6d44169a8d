"""The learning-rate schedules, shared by the Lightning trainer and the LSTM baseline so both
decay the same way."""

from __future__ import annotations

import math

SCHEDULES = ("cosine", "wsd")


def lr_at(step: int, lr: float, min_lr: float, warmup: int, total: int, schedule: str = "cosine",
          decay_frac: float = 0.2) -> float:
    """Linear warmup to `lr`, then either cosine decay to `min_lr` at `total` steps, or
    warmup-stable-decay (`wsd`): constant `lr` until the last `decay_frac` of the run, then
    linear decay to `min_lr`. WSD keeps the LR high for longer, and a stable-phase
    checkpoint can be decayed later without retraining (MiniCPM, "Scaling Laws and
    Compute-Optimal Training Beyond Fixed Training Durations")."""
    if warmup > 0 and step < warmup:
        return lr * (step + 1) / warmup
    if step >= total:
        return min_lr
    if schedule == "wsd":
        decay = max(1, round(total * float(decay_frac)))
        start = max(warmup, total - decay)
        if step < start:
            return lr
        return lr + (min_lr - lr) * (step - start) / max(1, total - start)
    if schedule != "cosine":
        raise ValueError(f"unknown schedule {schedule!r}; expected one of {', '.join(SCHEDULES)}")
    progress = (step - warmup) / max(1, total - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)
