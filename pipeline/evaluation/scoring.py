"""Bits per byte and perplexity of a model over the held-out tokens.

Model code (``pipeline.model.runs``, torch) is imported lazily, so this module imports
without torch models being importable.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.evaluation import metrics as M
from pipeline.evaluation.heldout import HeldOut


def load_model(run_dir: Path, seed: int):
    """(model in eval mode, meta) from a training run directory, torch seeded first."""
    import torch

    from pipeline.model.runs import load_trained, require_causal_gpt

    torch.manual_seed(seed)
    model, meta = load_trained(run_dir)
    require_causal_gpt(model, run_dir, "the evaluation report")
    model.eval()
    return model, meta


def scores(nats: float, count: int, heldout: HeldOut) -> dict:
    """{"val_bpb", "val_ppl"} (rounded to 6 places) of ``nats`` over the held-out tokens."""
    assert count == heldout.n_tokens, f"scored {count} tokens, expected {heldout.n_tokens}"
    return {"val_bpb": round(M.bits_per_byte(nats, heldout.n_bytes), 6), "val_ppl": round(M.perplexity(nats, count), 6)}


def score(model, heldout: HeldOut, block_size: int, batch_size: int, stride: int | None) -> dict:
    """{"val_bpb", "val_ppl"} of a torch model (idx [B,T] -> logits) read in windows of ``block_size``."""
    nats, count = M.score_model(model, heldout.tokens, block_size, batch_size, stride=stride)
    return scores(nats, count, heldout)
