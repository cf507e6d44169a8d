"""Greedy generations for the report: continuations of the configured prompts, and answers
to the held-out fine-tuning questions (scored with BLEU / ROUGE by ``metrics.generation_scores``).

``pipeline.model.sampling`` (torch) is imported lazily, so this module imports without it.
"""

from __future__ import annotations

from pipeline.tokenize.special import STOP_STRINGS, chat_prompt


def generate(model, tokenizer, prompt: str, max_new_tokens: int, seed: int) -> str:
    """The greedy continuation of ``prompt``."""
    from pipeline.model.sampling import generate as sample

    return sample(model, tokenizer, prompt, max_new_tokens, temperature=0.0, top_k=None, seed=seed)


def clean_answer(text: str) -> str:
    """A generated answer up to the first chat/end marker."""
    cut = len(text)
    for s in STOP_STRINGS:
        i = text.find(s)
        if i >= 0:
            cut = min(cut, i)
    return text[:cut].strip()


def continuations(model, tokenizer, prompts: list[str], max_new_tokens: int, seed: int) -> list[str]:
    """One greedy continuation per prompt."""
    return [generate(model, tokenizer, p, max_new_tokens, seed) for p in prompts]


def answers(model, tokenizer, pairs: list[dict], max_new_tokens: int, seed: int) -> list[str]:
    """The model's answer to each held-out question, asked in the chat format and cut at the
    first end marker."""
    return [clean_answer(generate(model, tokenizer, chat_prompt(p["question"]), max_new_tokens, seed)) for p in pairs]
