"""Decoding from a trained model: greedy, temperature, top-k and top-p sampling, streamed.

Prompts are preceded by `<|endoftext|>`, the way every training document is, and decoding
stops at `<|endoftext|>`, `<|end|>` or a stop id; a KV cache is kept unless `use_cache=False`
(the baseline `benchmarks/bench_generate.py` compares against). A (prompt, settings, seed)
triple always gives the same text. Used by evaluation, `generate` and `serve`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch

from pipeline.tokenize.special import END, EOT


def token_id(tokenizer, token: str) -> int | None:
    if hasattr(tokenizer, "token_to_id"):
        return tokenizer.token_to_id(token)
    tid = tokenizer.convert_tokens_to_ids(token)
    return None if tid == getattr(tokenizer, "unk_token_id", None) else tid


def encode_prompt(tokenizer, text: str) -> list[int]:
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
    eot, end = token_id(tokenizer, EOT), token_id(tokenizer, END)
    stops = {i for i in (eot, end) if i is not None} | {int(s) for s in stop_ids}
    ids = ([eot] if eot is not None else []) + encode_prompt(tokenizer, prompt)
    new = iter_ids(model, ids, max_new_tokens, temperature, top_k, seed, stops, top_p, use_cache)
    if on_text is None:
        return tokenizer.decode(list(new), skip_special_tokens=True)
    pieces = []
    for piece in stream_text(tokenizer, new):
        pieces.append(piece)
        on_text(piece)
    return "".join(pieces)
