"""Pretrain stage: train the decoder-only transformer on the token shards with Lightning.

Reads `paths.shards/index.json` (+ the .bin files, memory-mapped) and
`paths.tokenizer/tokenizer.json`; writes `paths.pretrain/` atomically:
`checkpoints/last.ckpt` and `checkpoints/best.ckpt` (lowest val loss), `metrics.csv`
(step, train_loss, val_loss, val_bpb, lr, tokens_per_s, mfu), `tensorboard/` event files,
`meta.json`, `tokenizer.json`, `hf/` (LlamaForCausalLM / GPT2LMHeadModel export) and
`_summary.json`. An interrupted run with the same config resumes from its last checkpoint.

`model=lstm` trains the recurrent baseline on the same data and loop; `pretrain.objective=mlm`
trains the transformer BERT-style (bidirectional, 15 % of tokens corrupted) for comparing the
two families. Neither is a causal transformer, so neither gets an `hf/` export.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch

from pipeline.core.artifacts import Timer
from pipeline.core.config import config_hash, to_container, train_settings
from pipeline.core.errors import PipelineError
from pipeline.model.runs import build_model
from pipeline.tokenize.bpe import load as load_tokenizer
from pipeline.tokenize.bpe import token_byte_lengths
from pipeline.tokenize.shards import read_index
from pipeline.training.lightning import LitGPT, ShardDataModule
from pipeline.training.runs import finish_run, train_and_publish
from pipeline.training.trainer import (
    setup_torch,
)

# keys that change how long, how loudly or in how much memory a run goes, not what it computes
_VOLATILE = ("max_time", "progress_bar", "num_threads", "resume", "ckpt_every", "log_every", "tensorboard",
             "peak_flops", "ckpt_every_minutes", "keep_checkpoints", "slurm_requeue", "loss_chunk_tokens", "loggers")


def fingerprint(cfg, index: dict) -> str:
    """Identifies a run for resuming: model, optimisation, seed and the exact data."""
    pc = {k: v for k, v in train_settings(cfg, "pretrain").items() if k not in _VOLATILE}
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
    tc = train_settings(cfg, "pretrain")
    setup_torch(tc)
    L.seed_everything(int(cfg.seed), verbose=False)

    max_steps = int(pc.max_steps)
    objective = str(pc.get("objective", "clm"))
    model_dict = {**to_container(cfg.model)}
    kind = str(model_dict.get("kind", "gpt"))
    if objective == "mlm":
        if kind != "gpt":
            raise PipelineError(f"pretrain.objective=mlm needs the transformer (model.kind=gpt), not {kind!r}")
        model_dict["causal"] = False
        vocab += 1  # the mask token: one id past the tokenizer's vocabulary
    model = build_model(model_dict, vocab)  # validates the model config before anything is written
    block_size = int(getattr(model.cfg, "block_size", 0) or model_dict.get("block_size") or 0)
    if block_size <= 0:
        raise PipelineError(f"model.block_size must be set (the training context) for model.kind={kind}")
    fp = fingerprint(cfg, index)
    dm = ShardDataModule(shards_dir, block_size, int(pc.batch_size), int(cfg.seed), max_steps, int(pc.val_batches),
                         str(pc.get("sampling", "epoch")))
    module = LitGPT(
        model={"kind": kind, **model.cfg.to_dict()},
        vocab_size=vocab,
        lr=float(pc.lr),
        min_lr=float(pc.min_lr),
        warmup_steps=int(pc.warmup_steps),
        max_steps=max_steps,
        weight_decay=float(pc.weight_decay),
        betas=tuple(pc.betas),
        compile=bool(tc.get("compile", False)),
        optimizer=str(pc.get("optimizer", "adamw")),
        fingerprint=fp,
        stage="pretrain",
        schedule=str(pc.get("schedule", "cosine")),
        decay_frac=float(pc.get("decay_frac", 0.2)),
        objective=objective,
        seed=int(cfg.seed),
        token_bytes=_token_bytes(tokenizer, vocab),
        loss_chunk_tokens=int(tc.get("loss_chunk_tokens", 0) or 0),
    )
    module.model.load_state_dict(model.state_dict())

    def publish(work: Path, result: dict) -> dict:
        return finish_run(
            work, module.model, tokenizer, tok_dir / "tokenizer.json", "pretrain", cfg, timer, result,
            inputs={"shards": shards_dir, "tokenizer": tok_dir},
            batch_size=int(pc.batch_size), block_size=block_size,
            extra={"objective": objective, "model_kind": kind,
                   "train_tokens": int(index["splits"]["train"].get("tokens", 0)),
                   "val_tokens": int(index["splits"].get("val", {}).get("tokens", 0))},
        )

    return train_and_publish("pretrain", cfg.paths.runs, out, fp, module, dm, tc, max_steps, publish, callbacks)


def _token_bytes(tokenizer, vocab: int) -> torch.Tensor:
    """UTF-8 bytes per token id (0 for special tokens and ids past the tokenizer), for val bits per byte."""
    lengths = torch.zeros(vocab, dtype=torch.long)
    tb = torch.as_tensor(token_byte_lengths(tokenizer), dtype=torch.long)[:vocab]
    lengths[: len(tb)] = tb
    return lengths


