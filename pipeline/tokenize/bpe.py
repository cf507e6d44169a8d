"""Byte-level BPE with Hugging Face `tokenizers`: the trainer's recipe, loading, exact byte
strings per token id (what bits per byte rests on), and `tokenizer_config.json`.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
from tokenizers import (
    Regex,
    Tokenizer,
    decoders,
    models,
    pre_tokenizers,
    processors,
    trainers,
)

from pipeline.core.errors import PipelineError
from pipeline.tokenize.special import (
    ASSISTANT,
    CHAT_TEMPLATE,
    END,
    EOT,
    PAD,
    SPECIAL_TOKENS,
    SYSTEM,
    USER,
)

# Pre-tokenisation (split) regexes. `gpt2` is what `ByteLevel(use_regex=True)` applies; `gpt4`
# is cl100k's (digits in groups of up to 3, case-insensitive contractions, newlines kept apart).
PATTERNS = {
    "gpt2": r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""",
    "gpt4": r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+""",
}


def load(path: Path) -> Tokenizer:
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise PipelineError(f"tokenizer not found at {path}: run `python -m pipeline tokenizer` first")
    return Tokenizer.from_file(str(path))


def build(cfg_tok) -> tuple[Tokenizer, trainers.BpeTrainer]:
    pattern = str(cfg_tok.get("pattern", "gpt2"))
    tok = Tokenizer(models.BPE())
    if pattern == "gpt2":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    elif pattern == "gpt4":
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(PATTERNS["gpt4"]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    else:
        raise PipelineError(f"unknown tokenizer.pattern {pattern!r}: expected one of {', '.join(PATTERNS)}")
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=int(cfg_tok.vocab_size),
        min_frequency=int(cfg_tok.min_frequency),
        special_tokens=list(SPECIAL_TOKENS),  # pipeline.tokenize.special: the chat format relies on them
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    return tok, trainer


@lru_cache(maxsize=1)
def _unicode_to_byte() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode table used by the ByteLevel pre-tokenizer."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def token_bytes(tok: Tokenizer) -> list[bytes]:
    """The exact byte string of every token id (special tokens: empty; other added tokens:
    their text, which decoding emits as is)."""
    table = _unicode_to_byte()
    added = {i: t for i, t in tok.get_added_tokens_decoder().items()}
    out = []
    for i in range(tok.get_vocab_size()):
        s = tok.id_to_token(i)
        if i in added:
            out.append(b"" if added[i].special else added[i].content.encode("utf-8"))
        else:
            out.append(b"" if s is None else bytes(table[c] for c in s))
    return out


def token_byte_lengths(tok: Tokenizer) -> np.ndarray:
    """UTF-8 byte length per token id; summing it over a token stream gives its byte count."""
    return np.array([len(b) for b in token_bytes(tok)], dtype=np.int64)


def encode_plain(tok: Tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Ids of documents as plain text: a literal "<|endoftext|>" inside a document is text,
    not a boundary token (the way tiktoken's encode_ordinary treats it)."""
    before = tok.encode_special_tokens
    tok.encode_special_tokens = True
    try:
        return [e.ids for e in tok.encode_batch(list(texts), add_special_tokens=False)]
    finally:
        tok.encode_special_tokens = before


def tokenizer_config(tok: Tokenizer) -> dict:
    """`tokenizer_config.json` for transformers: special tokens named, chat template, no cleanup."""
    added = {
        str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized, "rstrip": t.rstrip,
                 "single_word": t.single_word, "special": t.special}
        for i, t in sorted(tok.get_added_tokens_decoder().items())
    }
    names = [t["content"] for t in added.values()]
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    if EOT in names:
        cfg.update(bos_token=EOT, eos_token=EOT)
    if PAD in names:
        cfg["pad_token"] = PAD
    roles = [t for t in (SYSTEM, USER, ASSISTANT, END) if t in names]
    if roles:
        cfg["additional_special_tokens"] = roles
    return cfg
