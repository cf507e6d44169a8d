"""The held-out text every model is scored on: the val token stream and the held-out
fine-tuning pairs.

Tokens 1..N-1 of the first N val tokens are scored by every model (t[0] has no context);
their UTF-8 byte count is the denominator of bits per byte.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.core.errors import PipelineError
from pipeline.evaluation.ngram import stream_chunks
from pipeline.tokenize.bpe import token_byte_lengths
from pipeline.tokenize.shards import open_split


@dataclass(frozen=True)
class HeldOut:
    tokens: np.ndarray  # int64, the first N val tokens; tokens[1:] are scored
    n_bytes: int  # UTF-8 bytes of the scored tokens

    @property
    def n_tokens(self) -> int:
        """How many tokens every model scores: N - 1."""
        return len(self.tokens) - 1

    @property
    def sha256(self) -> str:
        """What the numbers were measured on: a parent run on other held-out text is flagged."""
        return hashlib.sha256(np.ascontiguousarray(self.tokens, dtype="<i8").tobytes()).hexdigest()


def read_tokens(arrays: list[np.ndarray], max_tokens: int) -> np.ndarray:
    """The first ``max_tokens`` tokens of a split (all of it when max_tokens <= 0), as int64."""
    pieces = list(stream_chunks(arrays, max_tokens if max_tokens > 0 else None))
    return np.concatenate(pieces).astype(np.int64) if pieces else np.zeros(0, np.int64)


def load_heldout(shards_dir: Path, index: dict, tokenizer, max_tokens: int) -> HeldOut:
    """The first ``max_tokens`` val tokens, checked against the tokenizer, with their byte count."""
    byte_len = np.asarray(token_byte_lengths(tokenizer), dtype=np.int64)
    val = read_tokens(open_split(shards_dir, "val", index), max_tokens)
    if len(val) < 2:
        raise PipelineError(f"the val split in {shards_dir} has {len(val)} tokens; need at least 2 to evaluate")
    if int(val.max()) >= len(byte_len):
        raise PipelineError(
            f"val token id {int(val.max())} is outside the tokenizer's vocabulary ({len(byte_len)}): "
            f"the shards and tokenizer disagree; rerun `python -m pipeline shard`"
        )
    n_bytes = int(byte_len[val[1:]].sum())
    if n_bytes <= 0:
        raise PipelineError(f"the scored val tokens in {shards_dir} decode to 0 bytes")
    return HeldOut(val, n_bytes)


def read_pairs(path: Path, limit: int) -> list[dict]:
    """The first ``limit`` held-out {question, answer} pairs with both sides non-empty; [] when
    there is no file."""
    pairs: list[dict] = []
    if not Path(path).is_file():
        return pairs
    with open(path, encoding="utf-8") as f:
        for line in f:
            if len(pairs) >= limit:
                break
            if not line.strip():
                continue
            row = json.loads(line)
            if str(row.get("question", "")).strip() and str(row.get("answer", "")).strip():
                pairs.append({"question": str(row["question"]), "answer": str(row["answer"])})
    return pairs


def pairs_sha256(pairs: list[dict]) -> str:
    return hashlib.sha256(json.dumps(pairs, sort_keys=True).encode()).hexdigest()
