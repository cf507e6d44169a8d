"""The decoder-only transformer and how to get a trained one back from a run directory.

A run directory (`models/pretrain/`, `models/finetune/`) holds `checkpoints/last.ckpt`
(Lightning), `meta.json` (model config, vocab and block size), `tokenizer.json` (the
tokenizer it was trained with), `metrics.csv`, `hf/` and `_summary.json`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pipeline.core.errors import PipelineError
from pipeline.model.gpt import GPT, GPTConfig

META = "meta.json"
CKPT = "checkpoints/last.ckpt"


def build_model(model_cfg, vocab_size: int) -> GPT:
    """A freshly initialised model from the `model` config group (a DictConfig or dict):
    the GPT (`kind: gpt`) or the LSTM baseline (`kind: lstm`, same `model(idx) -> logits`)."""
    d = dict(model_cfg)
    kind = d.get("kind", "gpt")
    if kind == "lstm":
        from pipeline.model.lstm import LSTMLM, LSTMConfig

        return LSTMLM(LSTMConfig.from_dict(d, vocab_size=int(vocab_size)))
    if kind != "gpt":
        raise PipelineError(f"model.kind={kind!r} is not supported by pipeline.model.runs (expected 'gpt' or 'lstm')")
    return GPT(GPTConfig.from_dict(d, vocab_size=int(vocab_size)))


def resolve_device(spec, key: str = "device") -> str:
    """The torch device a config's `device` names: `auto` = the first CUDA GPU when there is
    one, else the CPU; `cpu`, `cuda`, `cuda:N` and `mps` are taken as given, after checking
    the machine has them (a clear error, not a failure deep inside the first `.to()`).
    `key` names the setting in the error."""
    want = str(spec if spec is not None else "auto").strip().lower()
    if want in ("", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(want)
    except (RuntimeError, ValueError) as e:
        raise PipelineError(f"{key}={spec!r} is not a device: use auto, cpu, cuda, cuda:N or mps") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise PipelineError(f"{key}={spec} but this machine has no usable CUDA device (torch {torch.__version__}, "
                                f"built with CUDA {torch.version.cuda}): use {key}=auto or {key}=cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise PipelineError(f"{key}={spec} but this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise PipelineError(f"{key}={spec} but MPS is not available here: use {key}=auto or {key}=cpu")
    elif dev.type != "cpu":
        raise PipelineError(f"{key}={spec}: unsupported device type {dev.type!r}; use auto, cpu, cuda, cuda:N or mps")
    return str(dev)


def _load_ckpt(path: Path, device) -> dict:
    """Tensors and plain containers only (`weights_only=True`): a checkpoint never runs code."""
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        raise PipelineError(f"{path} is not a loadable checkpoint ({type(e).__name__}: {str(e).splitlines()[0]})") from e


def model_state(ckpt: dict) -> dict[str, torch.Tensor]:
    """The GPT's own state dict out of a LightningModule checkpoint (`model.` prefix removed,
    LoRA updates merged into the weights)."""
    from pipeline.model.lora import merge_state_dict

    sd = ckpt["state_dict"]
    return merge_state_dict({k[len("model.") :]: v for k, v in sd.items() if k.startswith("model.")})


def load_trained(run_dir, device: str | torch.device = "cpu") -> tuple[GPT, dict]:
    """(model in eval mode, meta) from a pretrain/finetune run directory.

    meta has `model` (GPTConfig fields), `vocab_size`, `block_size`, `stage`, `steps`,
    `tokenizer` (path of the tokenizer.json the model was trained with) and `run_dir`.
    """
    run_dir = Path(run_dir)
    ckpt_path = run_dir / CKPT
    if not ckpt_path.is_file():
        raise PipelineError(f"no trained model at {run_dir} (missing {CKPT})")
    ckpt = _load_ckpt(ckpt_path, device)
    meta_path = run_dir / META
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
    else:  # a bare checkpoint directory: rebuild meta from the module's hyperparameters
        hp = ckpt.get("hyper_parameters", {})
        cfg = GPTConfig.from_dict(hp["model"], vocab_size=hp["vocab_size"])
        meta = {"model": cfg.to_dict(), "vocab_size": cfg.vocab_size, "block_size": cfg.block_size,
                "stage": hp.get("stage"), "steps": ckpt.get("global_step")}
    model = build_model({"kind": meta.get("kind", "gpt"), **meta["model"]}, int(meta["vocab_size"]))
    model.load_state_dict(model_state(ckpt))
    model.to(device).eval()
    tok = run_dir / "tokenizer.json"
    meta = {**meta, "run_dir": str(run_dir), "tokenizer": str(tok) if tok.is_file() else meta.get("tokenizer")}
    return model, meta


def require_causal_gpt(model, run_dir, what: str) -> None:
    """Fine-tuning, generation, serving and the eval report need a causal transformer: an LSTM
    baseline run or a masked-LM run (`pretrain.objective=mlm`) gets a clear error instead."""
    cfg = getattr(model, "cfg", None)
    if not isinstance(cfg, GPTConfig):
        raise PipelineError(f"{what} needs the transformer, but {run_dir} holds a {type(model).__name__} "
                            f"(model.kind=lstm): pretrain with model=gpt_tiny (or another GPT config) first")
    if not cfg.causal:
        raise PipelineError(f"{what} needs a causal language model, but {run_dir} was trained with "
                            f"pretrain.objective=mlm (bidirectional): pretrain with pretrain.objective=clm first")


__all__ = ["GPT", "GPTConfig", "build_model", "load_trained", "model_state", "require_causal_gpt", "resolve_device"]


WHICH = ("latest", "pretrain", "finetune")


def run_dir_for(cfg, which: str = "latest") -> Path:
    """The run directory to use: latest = finetune when it exists, else pretrain."""
    from pipeline.model.runs import CKPT

    if which not in WHICH:
        raise PipelineError(f"unknown model {which!r}; expected one of {', '.join(WHICH)}")
    pre, fin = Path(cfg.paths.pretrain), Path(cfg.paths.finetune)
    if which == "finetune" or (which == "latest" and (fin / CKPT).is_file()):
        if not (fin / CKPT).is_file():
            raise PipelineError(f"no fine-tuned model at {fin}: run `python -m pipeline finetune` first")
        return fin
    if not (pre / CKPT).is_file():
        raise PipelineError(f"no trained model at {pre}: run `python -m pipeline pretrain` first")
    return pre


def load_run_tokenizer(run_dir: Path, meta: dict, cfg=None):
    from pipeline.tokenize.bpe import load

    for cand in (meta.get("tokenizer"), Path(run_dir) / "tokenizer.json",
                 Path(cfg.paths.tokenizer) / "tokenizer.json" if cfg is not None else None):
        if cand and Path(cand).is_file():
            return load(cand)
    raise PipelineError(f"no tokenizer.json for the model at {run_dir}: run `python -m pipeline tokenizer` first")


def load_run(cfg, which: str = "latest", device: str = "cpu"):
    """(model on `device`, tokenizer, meta) of a run."""
    from pipeline.model.runs import load_trained, require_causal_gpt

    run_dir = run_dir_for(cfg, which)
    model, meta = load_trained(run_dir, device)
    require_causal_gpt(model, run_dir, "generation")
    return model, load_run_tokenizer(run_dir, meta, cfg), meta
