"""Finetune stage: supervised fine-tuning of the pretrained model on question/answer pairs.

Starts from `paths.pretrain` (its weights, model config and tokenizer), trains on the
train pairs with the loss on answer tokens only, validates on the held-out pairs, and
writes `paths.finetune/` in the pretrain layout plus `sft/train.jsonl` and
`sft/heldout.jsonl` (one {"question", "answer", "doc_id"} per line, `messages` for
conversations of several turns).

`finetune.method`: `full` (every weight trained) or `lora` (`finetune=lora`: low-rank
updates on the blocks' matrices, base frozen; `load_trained` and the `hf/` export see the
update merged into the weights). `finetune.packing`: whole examples packed into
block_size rows with attention kept inside each example, or one padded example per row.
`finetune.overlong`: examples longer than the context are `truncate`d or `drop`ped;
both are counted in the summary, as are skipped malformed records of user data.
The machine comes from the `hardware` group, as for pretraining.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import lightning as L

from pipeline.core.artifacts import Timer, atomic_dir, sha256_file, write_summary
from pipeline.core.config import config_hash, train_settings
from pipeline.core.errors import PipelineError
from pipeline.model.lora import apply_lora, merged, trainable_params
from pipeline.model.runs import (
    CKPT,
    load_run_tokenizer,
    load_trained,
    require_causal_gpt,
)
from pipeline.tokenize.special import PAD
from pipeline.training import sft_data
from pipeline.training.lightning import LitGPT, RowsDataModule
from pipeline.training.runs import finish_run, train_and_publish
from pipeline.training.trainer import (
    setup_torch,
)

log = logging.getLogger(__name__)
METHODS = ("full", "lora")
_VOLATILE = ("max_time", "progress_bar", "num_threads", "resume", "ckpt_every", "log_every", "tensorboard", "peak_flops",
             "ckpt_every_minutes", "keep_checkpoints", "slurm_requeue", "loss_chunk_tokens", "loggers")


def run(cfg, callbacks: tuple = ()) -> dict:
    """`callbacks`: extra Lightning callbacks (tests use them to interrupt a run)."""
    timer = Timer()
    fc = cfg.finetune
    pre_dir, out = Path(cfg.paths.pretrain), Path(cfg.paths.finetune)
    if not (pre_dir / CKPT).is_file():
        raise PipelineError(f"no pretrained model at {pre_dir}: run `python -m pipeline pretrain` first")
    tc = train_settings(cfg, "finetune")
    setup_torch(tc)
    L.seed_everything(int(cfg.seed), verbose=False)

    method = str(fc.get("method", "full"))
    if method not in METHODS:
        raise PipelineError(f"finetune.method={method!r}; expected one of {', '.join(METHODS)}")
    overlong = str(fc.get("overlong", "truncate"))
    base, meta = load_trained(pre_dir)
    require_causal_gpt(base, pre_dir, "fine-tuning")
    tokenizer = load_run_tokenizer(pre_dir, meta, cfg)
    try:
        train_pairs, held_pairs, info = sft_data.build_pairs(cfg)
    except sft_data.NoPairs as e:
        return _skip(cfg, out, timer, pre_dir, str(e))
    block = base.cfg.block_size
    packing = bool(fc.get("packing", True))
    length = {"train": {}, "heldout": {}}
    train_rows = sft_data.build_rows(tokenizer, train_pairs, block, packing, overlong, length["train"])
    val_rows = sft_data.build_rows(tokenizer, held_pairs, block, packing, overlong, length["heldout"])
    if not train_rows:
        raise PipelineError(
            f"all {len(train_pairs)} training examples were dropped as longer than the context ({block + 1} tokens, "
            f"finetune.overlong={overlong}): use finetune.overlong=truncate or a model with a larger block_size"
        )

    max_steps = int(fc.max_steps)
    fp = config_hash({
        "finetune": {k: v for k, v in tc.items() if k not in _VOLATILE},
        "seed": int(cfg.seed),
        "base": sha256_file(pre_dir / CKPT),
        "pairs": sft_data._qhash(json.dumps(train_pairs, sort_keys=True, ensure_ascii=False)),
    })
    module = LitGPT(
        model=base.cfg.to_dict(),
        vocab_size=base.cfg.vocab_size,
        lr=float(fc.lr),
        min_lr=float(fc.min_lr),
        warmup_steps=int(fc.warmup_steps),
        max_steps=max_steps,
        weight_decay=float(fc.weight_decay),
        betas=tuple(fc.get("betas", (0.9, 0.95))),
        compile=bool(tc.get("compile", False)),
        optimizer=str(tc.get("optimizer", "adamw")),
        fingerprint=fp,
        stage="finetune",
        loss_chunk_tokens=int(tc.get("loss_chunk_tokens", 0) or 0),
    )
    module.model.load_state_dict(base.state_dict())
    lora = None
    if method == "lora":
        lc = fc.lora
        adapted = apply_lora(module.model, int(lc.r), float(lc.alpha), list(lc.targets))
        lora = {"r": int(lc.r), "alpha": float(lc.alpha), "modules": len(adapted)}
    pad = tokenizer.token_to_id(PAD)
    dm = RowsDataModule(
        train_rows, val_rows, int(fc.batch_size), int(cfg.seed), max_steps, int(fc.get("val_batches", 8)),
        pad if pad is not None else 0,
    )

    def publish(work: Path, result: dict) -> dict:
        sft_data.write_jsonl(work / "sft" / "train.jsonl", train_pairs)
        sft_data.write_jsonl(work / "sft" / "heldout.jsonl", held_pairs)
        inputs = {"pretrain": pre_dir}
        if info["kind"] == "file":
            inputs["data"] = Path(info["path"])
        else:
            inputs["clean"] = Path(cfg.paths.clean)
        answer_tokens = sum(sum(1 for t in row[1] if t != sft_data.IGNORE) for row in train_rows)
        final = merged(module.model) if lora else module.model
        return finish_run(
            work, final, tokenizer, Path(meta["tokenizer"]), "finetune", cfg, timer, result,
            inputs=inputs, batch_size=int(fc.batch_size),
            extra={
                "pairs": info,
                "train_rows": len(train_rows),
                "heldout_rows": len(val_rows),
                "train_answer_tokens": answer_tokens,
                "packing": packing,
                "method": method,
                "lora": lora,
                "trainable_params": trainable_params(module.model),
                "overlong": overlong,
                "length": length,
                "base_steps": meta.get("steps"),
            },
        )

    return train_and_publish("finetune", cfg.paths.runs, out, fp, module, dm, tc, max_steps, publish, callbacks)


def _skip(cfg, out: Path, timer, pre_dir: Path, why: str) -> dict:
    """No fine-tuning data for this corpus: the output says so (and holds no model), so the
    flow goes on and evaluation reports the pretrained model."""
    log.warning("finetune skipped: %s", why)
    with atomic_dir(out) as work:
        return write_summary(work, "finetune", cfg, {"pretrain": pre_dir}, timer, skipped=why, steps=0)
