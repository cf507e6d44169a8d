"""Export a trained model to a Hugging Face `transformers` directory (safetensors only).

`arch=llama` models become `LlamaForCausalLM`: our model is Llama at toy scale, so the
export is a renaming of tensors (the fused q/k/v and gate/up projections are split). The
tokenizer goes along as a `PreTrainedTokenizerFast` that prepends `<|endoftext|>` (our
document separator, used as BOS, as training windows see it before each document).

`arch=gpt2` models become `GPT2LMHeadModel` (Conv1D weights are our Linear weights
transposed) with a `GPT2Tokenizer` written as `vocab.json` + `merges.txt`: our byte-level
BPE is GPT-2's scheme, so `GPT2Tokenizer.from_pretrained(path)` gives the same ids as ours
and code written for GPT-2 runs unchanged.

Both carry a chat template for the fine-tuned model's `<|user|>...<|end|><|assistant|>`
turns (the format of `pipeline.tokenize.special.chat_prompt`) and a `generation_config.json` that
stops at `<|endoftext|>`/`<|end|>`. Weights are written with safetensors and the directory
is checked for pickle files, so loading an export never unpickles anything.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from pipeline.model.hf import export_hf

log = logging.getLogger("pipeline.apps.export")


# ---------------------------------------------------------------- writing


def export_run(run_dir: Path, out_dir: Path | None = None, cfg=None) -> dict:
    """Re-export a training run (`models/pretrain`, `models/finetune`) to `out_dir`
    (default `<run>/hf`), atomically; a LoRA run is exported with its update merged."""
    from pipeline.core.artifacts import atomic_dir
    from pipeline.model.runs import load_run_tokenizer, load_trained

    t0 = time.perf_counter()
    run_dir = Path(run_dir)
    model, meta = load_trained(run_dir)
    tokenizer = load_run_tokenizer(run_dir, meta, cfg)
    out = Path(out_dir) if out_dir else run_dir / "hf"
    with atomic_dir(out) as work:
        export_hf(model, tokenizer, work)
    config = json.loads((out / "config.json").read_text())
    return {
        "run": str(run_dir),
        "out": str(out),
        "stage": meta.get("stage"),
        "architecture": (config.get("architectures") or [None])[0],
        "params": model.num_params(),
        "files": sorted(p.name for p in out.iterdir()),
        "seconds": round(time.perf_counter() - t0, 3),
    }


def run(cfg, which: str = "latest", out: str | Path | None = None) -> dict:
    """`python -m pipeline export`: the latest (fine-tuned, else pretrained) or a named run."""
    from pipeline.model.runs import run_dir_for

    return export_run(run_dir_for(cfg, which), Path(out) if out else None, cfg)
