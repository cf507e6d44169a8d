"""Text generation from a trained run: greedy or top-k sampling with a KV cache.

Prompts are preceded by `<|endoftext|>`, the way every training document is, and
generation stops at `<|endoftext|>` or `<|end|>`. Only the continuation is returned.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.errors import PipelineError
from pipeline.sft_data import END, EOT, USER, chat_prompt

WHICH = ("latest", "pretrain", "finetune")


def _token_id(tokenizer, token: str) -> int | None:
    if hasattr(tokenizer, "token_to_id"):
        return tokenizer.token_to_id(token)
    tid = tokenizer.convert_tokens_to_ids(token)
    return None if tid == getattr(tokenizer, "unk_token_id", None) else tid


def _encode(tokenizer, text: str) -> list[int]:
    enc = tokenizer.encode(text, add_special_tokens=False)
    return list(enc.ids) if hasattr(enc, "ids") else list(enc)


@torch.no_grad()
def generate_ids(
    model, ids: list[int], max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
    seed: int = 0, stop_ids=(),
) -> list[int]:
    """New token ids after `ids` (stop token excluded). Context is cropped to block_size."""
    block = model.cfg.block_size
    device = next(model.parameters()).device
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    stop = set(int(s) for s in stop_ids)
    out: list[int] = []
    context = list(ids)[-block:] or [0]
    caches: list[dict] | None = None
    pos = 0
    was_training = model.training
    model.eval()
    try:
        for _ in range(int(max_new_tokens)):
            if caches is None or pos >= block:  # (re)fill the cache from the cropped context
                context = context[-(block - 1):] if pos >= block else context
                caches = [{} for _ in model.blocks]
                logits = model(torch.tensor([context], device=device), caches=caches)
                pos = len(context)
            else:
                logits = model(torch.tensor([[context[-1]]], device=device), caches=caches, offset=pos)
                pos += 1
            logits = logits[0, -1].float().cpu()
            if temperature <= 0:
                nxt = int(torch.argmax(logits))
            else:
                logits = logits / float(temperature)
                if top_k:
                    kth = torch.topk(logits, min(int(top_k), logits.numel())).values[-1]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                nxt = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=gen))
            if nxt in stop:
                break
            out.append(nxt)
            context.append(nxt)
    finally:
        model.train(was_training)
    return out


def generate(
    model, tokenizer, prompt: str, max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
    seed: int = 0, stop_ids=(),
) -> str:
    """The continuation of `prompt` (temperature 0 = greedy, deterministic).

    Stops at `<|endoftext|>`, `<|end|>` or any of `stop_ids`. `tokenizer` is a
    `tokenizers.Tokenizer` or a `transformers` tokenizer.
    """
    eot, end = _token_id(tokenizer, EOT), _token_id(tokenizer, END)
    stops = {i for i in (eot, end) if i is not None} | {int(s) for s in stop_ids}
    ids = ([eot] if eot is not None else []) + _encode(tokenizer, prompt)
    new = generate_ids(model, ids, max_new_tokens, temperature, top_k, seed, stops)
    return tokenizer.decode(new, skip_special_tokens=True)


def run_dir_for(cfg, which: str = "latest") -> Path:
    """The run directory to use: latest = finetune when it exists, else pretrain."""
    from pipeline.model import CKPT

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
    from pipeline.tokenizer import load

    for cand in (meta.get("tokenizer"), Path(run_dir) / "tokenizer.json",
                 Path(cfg.paths.tokenizer) / "tokenizer.json" if cfg is not None else None):
        if cand and Path(cand).is_file():
            return load(cand)
    raise PipelineError(f"no tokenizer.json for the model at {run_dir}: run `python -m pipeline tokenizer` first")


def generate_from_run(
    cfg, prompt: str, which: str = "latest", max_new_tokens: int = 64, temperature: float = 0.8,
    top_k: int | None = 40, seed: int | None = None, chat: bool | None = None,
) -> str:
    """Generate from the trained model of a run. A fine-tuned model gets the prompt wrapped
    in the chat template (`chat=None` decides by the model's stage)."""
    from pipeline.model import load_trained

    run_dir = run_dir_for(cfg, which)
    model, meta = load_trained(run_dir)
    tokenizer = load_run_tokenizer(run_dir, meta, cfg)
    if chat is None:
        chat = meta.get("stage") == "finetune" and USER not in prompt
    text = chat_prompt(prompt) if chat else prompt
    return generate(model, tokenizer, text, max_new_tokens, temperature, top_k,
                    seed=int(cfg.seed) if seed is None else seed)
