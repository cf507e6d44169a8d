"""Finishing a training run: meta.json, the tokenizer, the `hf/` export and the summary,
shared by pretraining and fine-tuning.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from pipeline.core.artifacts import write_summary
from pipeline.model.gpt import GPTConfig
from pipeline.model.hf import export_hf
from pipeline.training.trainer import (
    write_meta,
)


def not_exportable(model) -> str | None:
    """Why `hf/` cannot hold this model (None: it can): only a causal transformer without
    QK-norm has a `transformers` twin (Llama or GPT-2)."""
    cfg = model.cfg
    if not isinstance(cfg, GPTConfig):
        return "the LSTM baseline has no transformers architecture"
    if not cfg.causal:
        return "a masked-LM (bidirectional) model is not a causal LM"
    if cfg.qk_norm:
        return "Llama and GPT-2 have no QK-norm"
    return None


def finish_run(work, model, tokenizer, tokenizer_file, stage, cfg, timer, result, inputs, batch_size, extra=None,
               block_size=None):
    """meta.json, tokenizer.json, hf/ export and _summary.json for a finished training run."""
    work = Path(work)
    shutil.copyfile(tokenizer_file, work / "tokenizer.json")
    model = model.float().cpu().eval()
    block = int(block_size or model.cfg.block_size)
    write_meta(work, model, stage, result["steps"], **({} if getattr(model.cfg, "block_size", None) else
                                                        {"block_size": block}))
    skip = not_exportable(model)
    if skip is None:
        export_hf(model, tokenizer, work / "hf")
    per_step = batch_size * block * result["world_size"] * int(result.get("accumulate", 1))
    tokens = result["steps"] * per_step
    run_tokens = result["steps_this_run"] * per_step
    secs = result["train_seconds"] or float("nan")
    fields = {
        **result,
        "params": model.num_params(),
        "block_size": block,
        "batch_size": batch_size,
        "tokens_seen": tokens,
        "hf_export": None if skip else "hf",
        **({"hf_export_skipped": skip} if skip else {}),
        "tokens_per_s": round(run_tokens / secs, 1) if result["steps_this_run"] else None,
        "steps_per_s": round(result["steps_this_run"] / secs, 3) if result["steps_this_run"] else None,
        **(extra or {}),
    }
    return write_summary(work, stage, cfg, inputs, timer, **fields)
