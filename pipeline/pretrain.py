"""Pretrain stage: train the decoder-only transformer on the token shards with Lightning.

Reads `paths.shards/index.json` (+ the .bin files, memory-mapped) and
`paths.tokenizer/tokenizer.json`; writes `paths.pretrain/` atomically:
`checkpoints/last.ckpt`, `metrics.csv` (step, epoch, train_loss, val_loss, lr),
`meta.json`, `tokenizer.json`, `hf/` (LlamaForCausalLM export) and `_summary.json`.
An interrupted run with the same config resumes from its last checkpoint.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import lightning as L

from pipeline.artifacts import Timer, write_summary
from pipeline.config import config_hash, to_container
from pipeline.errors import PipelineError
from pipeline.export import export_hf
from pipeline.model import build_model
from pipeline.model.lightning import LitGPT, ShardDataModule
from pipeline.shard import read_index
from pipeline.tokenizer import load as load_tokenizer
from pipeline.model.trainer import cleanup_stale, find_resume, fit, is_rank_zero, output_dir, setup_torch, write_meta

# keys that change how long or how loudly a run goes, not what it computes
_VOLATILE = ("max_time", "progress_bar", "num_threads", "resume", "ckpt_every", "log_every")


def fingerprint(cfg, index: dict) -> str:
    """Identifies a run for resuming: model, optimisation, seed and the exact data."""
    pc = {k: v for k, v in to_container(cfg.pretrain).items() if k not in _VOLATILE}
    data = {
        "tokenizer": index.get("tokenizer_sha256"),
        "files": [f.get("sha256") for s in ("train", "val") for f in index["splits"].get(s, {}).get("files", [])],
    }
    return config_hash({"model": to_container(cfg.model), "pretrain": pc, "seed": int(cfg.seed), "data": data})


def run(cfg, callbacks: tuple = ()) -> dict:
    """`callbacks`: extra Lightning callbacks (tests use them to interrupt a run)."""
    timer = Timer()
    pc = cfg.pretrain
    shards_dir, tok_dir, out = Path(cfg.paths.shards), Path(cfg.paths.tokenizer), Path(cfg.paths.pretrain)
    index = read_index(shards_dir)
    tokenizer = load_tokenizer(tok_dir)
    vocab = int(index.get("vocab_size") or tokenizer.get_vocab_size())
    if tokenizer.get_vocab_size() > vocab:
        raise PipelineError(
            f"tokenizer at {tok_dir} has {tokenizer.get_vocab_size()} tokens but the shards say vocab_size={vocab}: "
            "rerun `python -m pipeline shard`"
        )
    setup_torch(pc)
    L.seed_everything(int(cfg.seed), verbose=False)

    max_steps = int(pc.max_steps)
    model = build_model(cfg.model, vocab)  # validates the model config before anything is written
    block_size = model.cfg.block_size
    fp = fingerprint(cfg, index)
    dm = ShardDataModule(shards_dir, block_size, int(pc.batch_size), int(cfg.seed), max_steps, int(pc.val_batches),
                         str(pc.get("sampling", "epoch")))
    module = LitGPT(
        model=model.cfg.to_dict(),
        vocab_size=vocab,
        lr=float(pc.lr),
        min_lr=float(pc.min_lr),
        warmup_steps=int(pc.warmup_steps),
        max_steps=max_steps,
        weight_decay=float(pc.weight_decay),
        betas=tuple(pc.betas),
        compile=bool(pc.get("compile", False)),
        optimizer=str(pc.get("optimizer", "adamw")),
        fingerprint=fp,
        stage="pretrain",
    )
    module.model.load_state_dict(model.state_dict())

    summary: dict = {"stage": "pretrain"}
    with output_dir(out) as work:
        resume = find_resume(out, fp, max_steps) if pc.get("resume", True) else None
        result = fit(module, dm, work, pc, max_steps=max_steps, resume=resume, callbacks=tuple(callbacks))
        if is_rank_zero():
            summary = finish_run(
                work, module.model, tokenizer, tok_dir / "tokenizer.json", "pretrain", cfg, timer, result,
                inputs={"shards": shards_dir, "tokenizer": tok_dir},
                batch_size=int(pc.batch_size),
                extra={"train_tokens": int(index["splits"]["train"].get("tokens", 0)),
                       "val_tokens": int(index["splits"].get("val", {}).get("tokens", 0))},
            )
    if is_rank_zero():
        cleanup_stale(out)
    return summary


def finish_run(work, model, tokenizer, tokenizer_file, stage, cfg, timer, result, inputs, batch_size, extra=None):
    """meta.json, tokenizer.json, hf/ export and _summary.json for a finished training run."""
    work = Path(work)
    shutil.copyfile(tokenizer_file, work / "tokenizer.json")
    model = model.float().cpu().eval()
    write_meta(work, model, stage, result["steps"])
    export_hf(model, tokenizer, work / "hf")
    block = model.cfg.block_size
    tokens = result["steps"] * batch_size * block * result["world_size"]
    run_tokens = result["steps_this_run"] * batch_size * block * result["world_size"]
    secs = result["train_seconds"] or float("nan")
    fields = {
        **result,
        "params": model.num_params(),
        "block_size": block,
        "batch_size": batch_size,
        "tokens_seen": tokens,
        "tokens_per_s": round(run_tokens / secs, 1) if result["steps_this_run"] else None,
        "steps_per_s": round(result["steps_this_run"] / secs, 3) if result["steps_this_run"] else None,
        **(extra or {}),
    }
    return write_summary(work, stage, cfg, inputs, timer, **fields)
