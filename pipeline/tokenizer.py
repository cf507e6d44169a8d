"""Tokenizer stage: train a byte-level BPE on the cleaned training documents.

Byte-level BPE (GPT-2 style) never meets an unknown character, and every token maps to a
fixed byte string, which is what makes bits-per-byte exact downstream. Validation documents
are left out of training so held-out scores are not flattered by the vocabulary.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from pipeline.artifacts import Timer, atomic_dir, iter_rows, require_dir, sha256_file, write_json, write_summary
from pipeline.errors import PipelineError
from pipeline.splits import is_val

EOT = "<|endoftext|>"


def load(path: Path) -> Tokenizer:
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise PipelineError(f"tokenizer not found at {path}: run `python -m pipeline tokenizer` first")
    return Tokenizer.from_file(str(path))


def _train_texts(clean_dir: Path, val_fraction: float, max_bytes: int, seen: dict) -> Iterator[str]:
    for row in iter_rows(clean_dir, columns=["id", "text"]):
        if is_val(row["id"], val_fraction):
            continue
        text = row["text"]
        n = len(text.encode("utf-8"))
        if seen["bytes"] + n > max_bytes and seen["docs"] > 0:
            return
        seen["bytes"] += n
        seen["docs"] += 1
        yield text


def build(cfg_tok) -> tuple[Tokenizer, trainers.BpeTrainer]:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=int(cfg_tok.vocab_size),
        min_frequency=int(cfg_tok.min_frequency),
        special_tokens=list(cfg_tok.special_tokens),
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
    """The exact byte string of every token id (special tokens: empty)."""
    table = _unicode_to_byte()
    special = {t.content for t in tok.get_added_tokens_decoder().values()}
    out = []
    for i in range(tok.get_vocab_size()):
        s = tok.id_to_token(i)
        out.append(b"" if s is None or s in special else bytes(table[c] for c in s))
    return out


def token_byte_lengths(tok: Tokenizer) -> np.ndarray:
    """UTF-8 byte length per token id; summing it over a token stream gives its byte count."""
    return np.array([len(b) for b in token_bytes(tok)], dtype=np.int64)


def run(cfg) -> dict:
    timer = Timer()
    clean_dir = require_dir(cfg.paths.clean, "clean documents", "clean")
    seen = {"docs": 0, "bytes": 0}
    tok, trainer = build(cfg.tokenizer)
    tok.train_from_iterator(
        _train_texts(clean_dir, cfg.shard.val_fraction, int(cfg.tokenizer.max_train_bytes), seen), trainer=trainer
    )
    if seen["docs"] == 0:
        raise PipelineError(f"no training documents in {clean_dir} (all held out or empty)")

    # bytes per token on (up to) the first 2 MB of the training text: how well it compresses
    sample, sample_bytes = [], 0
    for text in _train_texts(clean_dir, cfg.shard.val_fraction, 2_000_000, {"docs": 0, "bytes": 0}):
        sample.append(text)
        sample_bytes += len(text.encode("utf-8"))
    sample_tokens = sum(len(e.ids) for e in tok.encode_batch(sample))
    specials = {t: tok.token_to_id(t) for t in cfg.tokenizer.special_tokens}
    stats = {
        "vocab_size": tok.get_vocab_size(),
        "special_tokens": specials,
        "train_docs": seen["docs"],
        "train_bytes": seen["bytes"],
        "sample_bytes": sample_bytes,
        "sample_tokens": sample_tokens,
        "bytes_per_token": round(sample_bytes / max(1, sample_tokens), 4),
    }
    out = Path(cfg.paths.tokenizer)
    with atomic_dir(out) as tmp:
        tok.save(str(tmp / "tokenizer.json"))
        write_json(tmp / "stats.json", stats)
        summary = write_summary(
            tmp, "tokenizer", cfg, {"clean": clean_dir}, timer,
            tokenizer_sha256=sha256_file(tmp / "tokenizer.json"), **stats,
        )
    return summary
