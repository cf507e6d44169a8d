"""Special tokens and the chat format: the one definition that the tokenizer, fine-tuning,
generation, serving, export and evaluation share."""

from __future__ import annotations

EOT, PAD, SYSTEM, USER, ASSISTANT, END = (
    "<|endoftext|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>",
)
SPECIAL_TOKENS = (EOT, PAD, SYSTEM, USER, ASSISTANT, END)
CHAT_ROLES = (SYSTEM, USER, ASSISTANT)
# where a generated answer ends: its own end, a document end, or the model starting another turn
STOP_STRINGS = (END, EOT, USER, SYSTEM)

# `<|endoftext|>` (bos) opens an example, each turn is `<|role|>content<|end|>`, and the prompt
# ends with `<|assistant|>`; `chat_prompt` and `render_chat` write the same text.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown chat role ' + m['role'] + ': expected system, user or assistant') }}{% endif %}"
    "<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def chat_prompt(question: str, system: str | None = None) -> str:
    """The text the model sees before its answer (the answer follows, then `<|end|>`)."""
    head = f"{SYSTEM}{system}{END}" if system else ""
    return f"{head}{USER}{question}{END}{ASSISTANT}"


def render_chat(messages: list[dict], add_generation_prompt: bool = False) -> str:
    """Chat messages as text in the training format (`chat_prompt` is the one-question case)."""
    text = "".join(f"<|{m['role']}|>{m['content']}{END}" for m in messages)
    return text + (ASSISTANT if add_generation_prompt else "")
