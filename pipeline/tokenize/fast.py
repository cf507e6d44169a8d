"""tiktoken running our BPE: ranks converted from the merges, the same split regex, and a
flag on every token whose merges could differ, so its ids equal `tokenizers`' exactly.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

import numpy as np
from tokenizers import (
    Tokenizer,
)

from pipeline.tokenize.bpe import PATTERNS, _unicode_to_byte, encode_plain


class Unconvertible(Exception):
    """The tokenizer uses a feature tiktoken cannot reproduce; callers use `tokenizers` alone."""


def split_pattern(spec: dict) -> str:
    """The split regex of a byte-level tokenizer.json, or Unconvertible."""
    pre = spec.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space"):
        return PATTERNS["gpt2"]
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
    if (
        len(steps) == 2
        and steps[0].get("type") == "Split"
        and "Regex" in steps[0].get("pattern", {})
        and steps[0].get("behavior") == "Isolated"
        and not steps[0].get("invert")
        and steps[1].get("type") == "ByteLevel"
        and not steps[1].get("use_regex", True)
        and not steps[1].get("add_prefix_space")
    ):
        return steps[0]["pattern"]["Regex"]
    raise Unconvertible(f"pre-tokenizer {pre.get('type')!r} is not a byte-level regex split")


class FastEncoder:
    """`tiktoken` over the ranks of a trained byte-level BPE, returning `tokenizers` ids.

    tiktoken merges the adjacent pair whose concatenation has the lowest rank; `tokenizers`
    merges the adjacent pair that comes first in the merge list. With rank = merge position
    they agree at every step unless tiktoken merges a pair that is *not* in the merge list
    (its concatenation being a token made from a different split). Within one output token
    tiktoken's merges are exactly those it makes on that token's bytes alone, so each token
    is simulated once here: a token reached through an unlisted merge is `unsafe`, and any
    document whose tiktoken ids contain one is re-encoded by `tokenizers`. What remains
    unproved is the regex engines agreeing (onig vs fancy-regex, same pattern), which the
    callers check by re-encoding a sample.
    """

    def __init__(self, tok: Tokenizer) -> None:
        try:
            import tiktoken
        except ImportError as e:
            raise Unconvertible("tiktoken is not installed (`pip install tiktoken`)") from e
        spec = json.loads(tok.to_str())
        model = spec["model"]
        if model.get("type") != "BPE":
            raise Unconvertible(f"model is {model.get('type')}, not BPE")
        if spec.get("normalizer") or model.get("dropout") or model.get("byte_fallback") or model.get(
            "continuing_subword_prefix"
        ) or model.get("end_of_word_suffix"):
            raise Unconvertible("normalizer, dropout, byte fallback or subword affixes are set")
        if (spec.get("decoder") or {}).get("type") != "ByteLevel":
            raise Unconvertible("decoder is not ByteLevel")
        if any(not t.special for t in tok.get_added_tokens_decoder().values()):
            raise Unconvertible("added non-special tokens are matched before BPE")
        pattern = split_pattern(spec)
        table = _unicode_to_byte()
        vocab: dict[str, int] = model["vocab"]

        def raw(s: str) -> bytes:
            try:
                return bytes(table[c] for c in s)
            except KeyError as e:
                raise Unconvertible(f"token {s!r} is not byte-level") from e

        ranks: dict[bytes, int] = {}
        rank_to_id: list[int] = []
        for b in range(256):
            s = "".join(c for c, v in table.items() if v == b)
            if s not in vocab:
                raise Unconvertible(f"byte {b} has no token (alphabet incomplete)")
            ranks[bytes([b])] = b
            rank_to_id.append(vocab[s])
        pair: list[tuple[bytes, bytes]] = []
        for m in model["merges"]:
            a, c = m if isinstance(m, list) else m.split(" ", 1)
            x, y = raw(a), raw(c)
            if x + y in ranks:
                raise Unconvertible(f"two merges make the token {a + c!r}")
            if a + c not in vocab:
                raise Unconvertible(f"merge result {a + c!r} is not in the vocabulary")
            ranks[x + y] = len(rank_to_id)
            rank_to_id.append(vocab[a + c])
            pair.append((x, y))
        if model.get("ignore_merges"):
            made = set(rank_to_id)
            special = {t.content for t in tok.get_added_tokens_decoder().values()}
            if any(i not in made for s, i in vocab.items() if s not in special):
                raise Unconvertible("ignore_merges with tokens no merge makes")
        self.unsafe = np.zeros(len(rank_to_id), dtype=bool)
        for data, r in ranks.items():
            if r >= 256 and not _merges_only_listed(data, ranks, pair):
                self.unsafe[r] = True
        self.rank_to_id = np.asarray(rank_to_id, dtype=np.uint32)
        self.id_to_rank = np.full(tok.get_vocab_size(), -1, dtype=np.int64)
        self.id_to_rank[self.rank_to_id] = np.arange(len(rank_to_id))
        self.pattern = pattern
        self.tok = tok
        name = hashlib.sha256(tok.to_str().encode()).hexdigest()[:16]
        self.enc = tiktoken.Encoding(name=f"pipeline-{name}", pat_str=pattern, mergeable_ranks=ranks, special_tokens={})
        self.fallback_docs = 0

    def ranks(self, text: str) -> np.ndarray:
        return self.enc.encode_to_numpy(text, disallowed_special=())

    def encode(self, texts: Sequence[str], threads: int = 1) -> list[np.ndarray]:
        """`tokenizers` ids (uint32) of each document, as plain text."""
        out: list[np.ndarray | None] = []
        redo = []
        if threads > 1:  # tiktoken's batch call releases the GIL per document
            all_ranks = [np.asarray(r, dtype=np.uint32) for r in self.enc.encode_ordinary_batch(list(texts), num_threads=threads)]
        else:
            all_ranks = [self.ranks(t) for t in texts]
        for i, r in enumerate(all_ranks):
            if self.unsafe[r].any():
                out.append(None)
                redo.append(i)
            else:
                out.append(self.rank_to_id[r])
        if redo:
            self.fallback_docs += len(redo)
            for i, ids in zip(redo, encode_plain(self.tok, [texts[i] for i in redo])):
                out[i] = np.asarray(ids, dtype=np.uint32)
        return out  # type: ignore[return-value]

    def decode_bytes(self, ids: np.ndarray) -> bytes:
        ranks = self.id_to_rank[np.asarray(ids, dtype=np.int64)]
        if (ranks < 0).any():
            raise ValueError("special or unknown token id in a plain-text stream")
        return self.enc.decode_bytes(ranks.tolist())


def _merges_only_listed(data: bytes, ranks: dict[bytes, int], pair: list[tuple[bytes, bytes]]) -> bool:
    """Does tiktoken's BPE on `data` alone end in `data` as one token, via listed merges only?"""
    parts = [data[i : i + 1] for i in range(len(data))]
    while len(parts) > 1:
        best, at = None, -1
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and (best is None or r < best):
                best, at = r, i
        if best is None:
            return False
        if pair[best - 256] != (parts[at], parts[at + 1]):
            return False
        parts[at : at + 2] = [parts[at] + parts[at + 1]]
    return True


def fast_encoder(tok: Tokenizer) -> tuple[FastEncoder | None, str]:
    """A FastEncoder when the tokenizer converts exactly, else None and why."""
    try:
        return FastEncoder(tok), "tiktoken"
    except Unconvertible as e:
        return None, str(e)
