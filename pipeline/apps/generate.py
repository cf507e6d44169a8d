"""`python -m pipeline generate`: text from a trained run, streamed to the terminal, and an
interactive chat with the fine-tuned model in the format it was trained on (decoding itself
is `pipeline.model.sampling`)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable

from pipeline.model.runs import load_run, resolve_device
from pipeline.model.sampling import encode_prompt, generate
from pipeline.tokenize.special import USER, chat_prompt, render_chat


def generate_from_run(
    cfg, prompt: str, which: str = "latest", max_new_tokens: int = 64, temperature: float = 0.8,
    top_k: int | None = 40, seed: int | None = None, chat: bool | None = None, top_p: float | None = None,
    use_cache: bool = True, on_text: Callable[[str], None] | None = None, device: str = "auto",
) -> str:
    """Generate from the trained model of a run, on `device` (`auto`: CUDA when present, see
    `resolve_device`). A fine-tuned model gets the prompt wrapped in the chat template
    (`chat=None` decides by the model's stage)."""
    model, tokenizer, meta = load_run(cfg, which, resolve_device(device, "--device"))
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
                n = len(encode_prompt(tokenizer, render_chat(turn, add_generation_prompt=True))) + 1
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
