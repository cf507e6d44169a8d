"""A training stage's run from start to published output, shared by pretraining and
fine-tuning: train in the durable run directory, then publish checkpoints, metrics,
meta.json, the tokenizer, the `hf/` export and the summary atomically.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from pipeline.core.artifacts import atomic_dir, write_summary
from pipeline.core.errors import PipelineError, TrainingFailed
from pipeline.model.gpt import GPTConfig
from pipeline.model.hf import export_hf
from pipeline.model.runs import CKPT
from pipeline.training.checkpoints import (
    agreed_resume,
    find_resume,
    link_or_copy,
    newest_checkpoint,
    resume_command,
    run_dir,
)
from pipeline.training.trainer import BEST, TENSORBOARD, fit, is_rank_zero, write_meta


def train_and_publish(stage: str, runs_root, out: Path, fingerprint: str, module, datamodule, tc: dict,
                      max_steps: int, publish, callbacks: tuple = ()) -> dict:
    """Train `module` in its run directory under `<runs_root>/<stage>/`, resuming from its newest valid
    checkpoint, then (rank 0) publish `out` atomically with `publish(work, result) -> summary`
    writing what the stage adds. The run directory is removed only once `out` is published:
    a stop, a crash or a failing export leaves it, and the same command continues from it."""
    run = run_dir(runs_root, stage, fingerprint, out)
    rank_zero = is_rank_zero()
    if tc.get("resume", True):
        resume = find_resume(run, out, fingerprint, max_steps) if rank_zero else None
        resume = agreed_resume(resume, run, rank_zero, int(os.environ.get("WORLD_SIZE", "1") or 1))
    else:
        resume = None
        if rank_zero:
            shutil.rmtree(run, ignore_errors=True)
    try:
        result = fit(module, datamodule, run, tc, max_steps=max_steps, resume=resume, callbacks=tuple(callbacks))
    except PipelineError:  # TrainingStopped too: its own message and exit code
        raise
    except Exception as e:
        raise TrainingFailed(
            f"{stage} failed during training: {type(e).__name__}: {_first_line(e)}. Checkpoints are kept in "
            f"{run / 'checkpoints'}; resume with: {resume_command()}") from e
    if not rank_zero:
        return {"stage": stage}
    try:
        with atomic_dir(out) as work:
            _publish_training(run, work)
            summary = publish(work, result)
    except PipelineError:  # TrainingStopped too: its own message and exit code
        raise
    except Exception as e:
        raise TrainingFailed(
            f"{stage} trained to step {result['steps']} but publishing {out} failed: {type(e).__name__}: "
            f"{_first_line(e)}. The run is kept in {run}; resume with: {resume_command()}") from e
    shutil.rmtree(run, ignore_errors=True)
    return summary


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else "(no message)"


def _publish_training(run: Path, work: Path) -> None:
    """The finished state as `checkpoints/last.ckpt`, the best one, the metrics and the
    TensorBoard events, linked (not copied) where the filesystem allows."""
    newest = newest_checkpoint(run)
    if newest is None:
        raise TrainingFailed(f"no checkpoint in {run / 'checkpoints'} to publish")
    link_or_copy(newest, work / CKPT)
    if (run / BEST).is_file():
        link_or_copy(run / BEST, work / BEST)
    if (run / "metrics.csv").is_file():
        shutil.copyfile(run / "metrics.csv", work / "metrics.csv")
    if (run / TENSORBOARD).is_dir():
        shutil.copytree(run / TENSORBOARD, work / TENSORBOARD, copy_function=_link_or_copy_str)


def _link_or_copy_str(src: str, dst: str) -> None:
    link_or_copy(Path(src), Path(dst))


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
