"""Text generation from a trained run: greedy, temperature, top-k and top-p sampling.

Prompts are preceded by `<|endoftext|>`, the way every training document is, and
generation stops at `<|endoftext|>` or `<|end|>`; only the continuation is returned.
Decoding keeps a KV cache (one forward of a single token per new token) unless
`use_cache=False`, which recomputes the whole context every step (the baseline that
`benchmarks/bench_generate.py` compares against). Sampling draws from a generator seeded
by `seed`, so a (prompt, settings, seed) triple always gives the same text. Text can be
streamed as it is produced (`on_text`), and `chat()` runs a multi-turn conversation with
the fine-tuned model in the chat format it was trained on.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch

from pipeline.errors import PipelineError
from pipeline.sft_data import END, EOT, USER, chat_prompt, render_chat

WHICH = ("latest", "pretrain", "finetune")


def _token_id(tokenizer, token: str) -> int | None:
    if hasattr(tokenizer, "token_to_id"):
        return tokenizer.token_to_id(token)
    tid = tokenizer.convert_tokens_to_ids(token)
    return None if tid == getattr(tokenizer, "unk_token_id", None) else tid


def _encode(tokenizer, text: str) -> list[int]:
    enc = tokenizer.encode(text, add_special_tokens=False)
    return list(enc.ids) if hasattr(enc, "ids") else list(enc)


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> int:
    """One token id from a [vocab] logits vector (temperature <= 0: argmax)."""
    if temperature <= 0:
        return int(torch.argmax(logits))
    logits = logits.float() / float(temperature)
    if top_k and int(top_k) < logits.numel():
        kth = torch.topk(logits, int(top_k)).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, -1)
    if top_p is not None and 0 < float(top_p) < 1:
        sorted_p, order = torch.sort(probs, descending=True)
        # drop a token when the ones before it already reach top_p (the top token always stays)
        drop = (torch.cumsum(sorted_p, -1) - sorted_p) >= float(top_p)
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.no_grad()
def iter_ids(
    model, ids: list[int], max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
    seed: int = 0, stop_ids=(), top_p: float | None = None, use_cache: bool = True,
) -> Iterator[int]:
    """New token ids after `ids`, one at a time (stop token excluded); context cropped to block_size."""
    block = model.cfg.block_size
    device = next(model.parameters()).device
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    stop = {int(s) for s in stop_ids}
    context = list(ids)[-block:] or [0]
    caches: list[dict] | None = None
    pos = 0
    was_training = model.training
    model.eval()
    try:
        for _ in range(int(max_new_tokens)):
            if not use_cache:
                logits = model(torch.tensor([context[-block:]], device=device))
            elif caches is None or pos >= block:  # (re)fill the cache from the cropped context
                context = context[-(block - 1):] if pos >= block else context
                caches = [{} for _ in model.blocks]
                logits = model(torch.tensor([context], device=device), caches=caches)
                pos = len(context)
            else:
                logits = model(torch.tensor([[context[-1]]], device=device), caches=caches, offset=pos)
                pos += 1
            nxt = sample_next(logits[0, -1].float().cpu(), temperature, top_k, top_p, gen)
            if nxt in stop:
                return
            context.append(nxt)
            yield nxt
    finally:
        model.train(was_training)


def generate_ids(
    model, ids: list[int], max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
    seed: int = 0, stop_ids=(), top_p: float | None = None, use_cache: bool = True,
) -> list[int]:
    """New token ids after `ids` (stop token excluded). Context is cropped to block_size."""
    return list(iter_ids(model, ids, max_new_tokens, temperature, top_k, seed, stop_ids, top_p, use_cache))


def stream_text(tokenizer, ids: Iterable[int]) -> Iterator[str]:
    """Text pieces as tokens arrive; a piece is held back while it ends inside a UTF-8 character
    (byte-level tokens can split one), so the pieces join to exactly the final decode."""
    out: list[int] = []
    shown = ""
    for i in ids:
        out.append(i)
        text = tokenizer.decode(out, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            continue
        if text.startswith(shown):
            piece, shown = text[len(shown):], text
            if piece:
                yield piece
    text = tokenizer.decode(out, skip_special_tokens=True)
    if text != shown and text.startswith(shown):
        yield text[len(shown):]


def generate(
    model, tokenizer, prompt: str, max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
    seed: int = 0, stop_ids=(), top_p: float | None = None, use_cache: bool = True,
    on_text: Callable[[str], None] | None = None,
) -> str:
    """The continuation of `prompt` (temperature 0 = greedy, deterministic).

    Stops at `<|endoftext|>`, `<|end|>` or any of `stop_ids`. `tokenizer` is a
    `tokenizers.Tokenizer` or a `transformers` tokenizer. `on_text` receives the text
    as it is generated (streaming); the return value is the whole continuation.
    """
    eot, end = _token_id(tokenizer, EOT), _token_id(tokenizer, END)
    stops = {i for i in (eot, end) if i is not None} | {int(s) for s in stop_ids}
    ids = ([eot] if eot is not None else []) + _encode(tokenizer, prompt)
    new = iter_ids(model, ids, max_new_tokens, temperature, top_k, seed, stops, top_p, use_cache)
    if on_text is None:
        return tokenizer.decode(list(new), skip_special_tokens=True)
    pieces = []
    for piece in stream_text(tokenizer, new):
        pieces.append(piece)
        on_text(piece)
    return "".join(pieces)


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


def load_run(cfg, which: str = "latest"):
    """(model, tokenizer, meta) of a run."""
    from pipeline.model import load_trained, require_causal_gpt

    run_dir = run_dir_for(cfg, which)
    model, meta = load_trained(run_dir)
    require_causal_gpt(model, run_dir, "generation")
    return model, load_run_tokenizer(run_dir, meta, cfg), meta


def generate_from_run(
    cfg, prompt: str, which: str = "latest", max_new_tokens: int = 64, temperature: float = 0.8,
    top_k: int | None = 40, seed: int | None = None, chat: bool | None = None, top_p: float | None = None,
    use_cache: bool = True, on_text: Callable[[str], None] | None = None,
) -> str:
    """Generate from the trained model of a run. A fine-tuned model gets the prompt wrapped
    in the chat template (`chat=None` decides by the model's stage)."""
    model, tokenizer, meta = load_run(cfg, which)
    if chat is None:
        chat = meta.get("stage") == "finetune" and USER not in prompt
    text = chat_prompt(prompt) if chat else prompt
    return generate(model, tokenizer, text, max_new_tokens, temperature, top_k,
                    seed=int(cfg.seed) if seed is None else seed, top_p=top_p, use_cache=use_cache, on_text=on_text)


def chat(
    model, tokenizer, lines: Iterable[str], write: Callable[[str], None] = sys.stdout.write,
    max_new_tokens: int = 128, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
    seed: int = 0, system: str | None = None, prompt: Callable[[], None] | None = None,
) -> list[dict]:
    """A multi-turn conversation: each line is a user turn, answered (streamed to `write`)
    with the whole conversation as context; the oldest turns are dropped when it outgrows
    the context window. `/reset` starts over, `/exit` (or end of input) stops. Returns the
    conversation as chat messages."""
    messages: list[dict] = [{"role": "system", "content": system}] if system else []
    block = model.cfg.block_size
    if prompt:
        prompt()
    for k, line in enumerate(lines):
        text = line.rstrip("\n")
        if text.strip() in ("/exit", "/quit"):
            break
        if text.strip() == "/reset":
            messages = messages[:1] if system else []
            write("(conversation reset)\n")
        elif text.strip():
            turn = [*messages, {"role": "user", "content": text}]
            while True:  # keep room for the answer: drop the oldest user/assistant exchange
                n = len(_encode(tokenizer, render_chat(turn, add_generation_prompt=True))) + 1
                olds = [i for i, m in enumerate(turn[:-1]) if m["role"] != "system"]
                if n + max_new_tokens <= block or len(olds) < 2:
                    break
                turn = [m for i, m in enumerate(turn) if i not in olds[:2]]
            answer = generate(model, tokenizer, render_chat(turn, add_generation_prompt=True), max_new_tokens,
                              temperature, top_k, seed=seed + k, top_p=top_p, on_text=write)
            write("\n")
            messages = [*turn, {"role": "assistant", "content": answer.strip()}]
        if prompt:
            prompt()
    return messages
