"""Interpolated Kneser-Ney n-gram language model over token ids: the floor every report shows.

Counting is vectorised: an n-gram is packed into one int64 (``bits`` per token), counted
with ``np.unique`` chunk by chunk and merged; lookups are ``np.searchsorted`` on the
sorted key tables. No Python loop ever runs per token.

Estimator (Chen & Goodman's interpolated KN with one discount D, 0 < D <= 1):

- highest order n, raw counts c:
  ``P(w|h) = (max(c(hw) - D, 0) + D * N1+(h.) * P_lower(w|h')) / c(h.)``
- lower orders 1 < k < n, continuation counts N1+(.hw) (distinct left neighbours):
  the same formula with c replaced by N1+(.hw), c(h.) by sum_w N1+(.hw) and N1+(h.) by
  the number of distinct w with N1+(.hw) > 0;
- order 1 is interpolated the same way with the uniform 1/V, so nothing gets zero mass;
- a context never seen at some order backs off fully to the next lower order.

Every per-context denominator is the sum of the very numerators it normalises, so each
order is an exact probability distribution over the vocabulary.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np

from pipeline.core.errors import PipelineError


def _merge(keys: list[np.ndarray], counts: list[np.ndarray] | None = None):
    """Union of sorted unique key arrays (summing counts when given)."""
    if len(keys) == 1:
        return (keys[0], counts[0]) if counts is not None else keys[0]
    allk = np.concatenate(keys)
    if counts is None:
        return np.unique(allk)
    uniq, inv = np.unique(allk, return_inverse=True)
    summed = np.bincount(inv, weights=np.concatenate(counts), minlength=len(uniq))
    return uniq, np.rint(summed).astype(np.int64)


def _group(keys: np.ndarray, values: np.ndarray, bits: int):
    """Per-context totals for sorted n-gram ``keys``: (contexts, sum of values, distinct followers)."""
    ctx = keys >> bits
    if len(ctx) == 0:
        empty = np.zeros(0, np.int64)
        return empty, empty, empty
    starts = np.flatnonzero(np.r_[True, ctx[1:] != ctx[:-1]])
    totals = np.add.reduceat(values, starts)
    types = np.diff(np.r_[starts, len(ctx)])
    return ctx[starts], totals.astype(np.int64), types.astype(np.int64)


class KneserNey:
    """Token-level interpolated Kneser-Ney LM; fit with :meth:`fit`, score with :meth:`nats`."""

    def __init__(self, order: int = 3, discount: float = 0.75, vocab_size: int | None = None) -> None:
        if int(order) < 1:
            raise PipelineError(f"eval.ngram_order must be >= 1, got {order}")
        if not 0.0 < float(discount) <= 1.0:
            raise PipelineError(f"eval.ngram_discount must be in (0, 1], got {discount}")
        self.order = int(order)
        self.discount = float(discount)
        self.vocab_size = int(vocab_size) if vocab_size else None
        self.train_tokens = 0
        # per order k (1..n): sorted gram keys, their counts (raw at n, continuation below),
        # and per-context tables: context keys, totals, distinct followers
        self.grams: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self.contexts: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    # ------------------------------------------------------------------ fitting

    def _setup_bits(self, vocab_size: int) -> None:
        self.vocab_size = int(vocab_size)
        self.bits = max(1, int(self.vocab_size - 1).bit_length())
        if self.bits * self.order > 63:
            raise PipelineError(
                f"an order-{self.order} n-gram over a {self.vocab_size}-token vocabulary does not fit in 64 bits; "
                f"lower eval.ngram_order"
            )

    def _pack(self, toks: np.ndarray, k: int) -> np.ndarray:
        """int64 keys of every k-gram in ``toks`` (length len(toks) - k + 1)."""
        key = toks[: len(toks) - k + 1].astype(np.int64)
        for j in range(1, k):
            key = (key << self.bits) | toks[j : len(toks) - k + 1 + j]
        return key

    def fit(self, chunks: Iterable[np.ndarray], vocab_size: int | None = None) -> KneserNey:
        """Count n-grams over a token stream given as consecutive chunks (memmaps are fine)."""
        V = vocab_size or self.vocab_size
        if not V:
            raise PipelineError("KneserNey needs vocab_size")
        self._setup_bits(V)
        n = self.order
        types: dict[int, list[np.ndarray]] = {k: [] for k in range(2, n + 1)}  # distinct k-grams, k >= 2
        top_keys: list[np.ndarray] = []
        top_counts: list[np.ndarray] = []
        carry = np.zeros(0, np.int64)
        for chunk in chunks:
            chunk = np.asarray(chunk).astype(np.int64)
            if chunk.size and (chunk.min() < 0 or chunk.max() >= V):
                raise PipelineError(f"token id outside the vocabulary (0..{V - 1}) in n-gram training data")
            self.train_tokens += len(chunk)
            toks = np.concatenate([carry, chunk])
            # k-grams ending in this chunk only (the carry holds the previous n-1 tokens)
            for k in range(2, n + 1):
                start = max(0, len(carry) - k + 1)
                if len(toks) - start >= k:
                    keys = self._pack(toks[start:], k)
                    if k == n:
                        u, c = np.unique(keys, return_counts=True)
                        top_keys.append(u)
                        top_counts.append(c.astype(np.int64))
                    else:
                        types[k].append(np.unique(keys))
            if n == 1 and len(chunk):
                u, c = np.unique(chunk, return_counts=True)
                top_keys.append(u)
                top_counts.append(c.astype(np.int64))
            carry = toks[len(toks) - (n - 1) :] if n > 1 else carry
            # keep memory bounded by distinct n-grams, not by stream length
            if len(top_keys) > 8:
                merged_keys, merged_counts = _merge(top_keys, top_counts)
                top_keys, top_counts = [merged_keys], [merged_counts]
                for k in types:
                    types[k] = [_merge(types[k])] if types[k] else []
        if not top_keys:
            raise PipelineError(f"too few training tokens for an order-{n} n-gram model ({self.train_tokens})")
        keys, counts = _merge(top_keys, top_counts)
        self.grams[n] = (keys, counts)
        self.contexts[n] = _group(keys, counts, self.bits)
        # continuation counts for order k come from the distinct (k+1)-grams
        for k in range(n - 1, 0, -1):
            higher = self.grams[n][0] if k + 1 == n else _merge(types[k + 1])
            suffix = higher & ((1 << (k * self.bits)) - 1)
            u, c = np.unique(suffix, return_counts=True)
            self.grams[k] = (u, c.astype(np.int64))
            self.contexts[k] = _group(u, c.astype(np.int64), self.bits)
        return self

    # ------------------------------------------------------------------ scoring

    @staticmethod
    def _lookup(table: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Positions of ``keys`` in sorted ``table`` and whether each was found."""
        if len(table) == 0:
            return np.zeros(len(keys), np.int64), np.zeros(len(keys), bool)
        pos = np.searchsorted(table, keys)
        pos = np.minimum(pos, len(table) - 1)
        return pos, table[pos] == keys

    def prob(self, contexts: np.ndarray, targets: np.ndarray) -> np.ndarray:
        """P(target | context) for rows of ``contexts`` [M, order-1]; -1 marks missing left context."""
        if not self.grams:
            raise PipelineError("the n-gram model is not fitted")
        n, D, bits = self.order, self.discount, self.bits
        targets = np.asarray(targets, np.int64)
        contexts = np.asarray(contexts, np.int64).reshape(len(targets), n - 1)
        p = np.full(len(targets), 1.0 / self.vocab_size)
        gram = targets.copy()  # the k-gram key, grown leftwards one token per order
        valid = np.ones(len(targets), bool)  # is the k-1 token context available?
        for k in range(1, n + 1):
            if k > 1:
                left = contexts[:, n - k]  # the token k-1 places back
                valid &= left >= 0
                gram = (np.maximum(left, 0) << ((k - 1) * bits)) | gram
            ckeys, ctotal, ctypes = self.contexts[k]
            gkeys, gcounts = self.grams[k]
            cpos, cfound = self._lookup(ckeys, gram >> bits)
            gpos, gfound = self._lookup(gkeys, gram)
            use = valid & cfound
            c = np.where(gfound, gcounts[gpos], 0)
            new = (np.maximum(c - D, 0.0) + D * ctypes[cpos] * p) / np.maximum(ctotal[cpos], 1)
            p = np.where(use, new, p)
        return p

    def nats(self, tokens: np.ndarray, start: int = 1, chunk: int = 1 << 20) -> tuple[float, int]:
        """Total -ln p of tokens[start:], each given up to order-1 preceding tokens of ``tokens``."""
        tokens = np.asarray(tokens).astype(np.int64)
        total, count = 0.0, 0
        n = self.order
        for lo in range(start, len(tokens), chunk):
            hi = min(lo + chunk, len(tokens))
            idx = np.arange(lo, hi)
            ctx = np.full((hi - lo, max(n - 1, 0)), -1, np.int64)
            for j in range(1, n):  # column n-1-j holds the token j places back
                src = idx - j
                ok = src >= 0
                ctx[ok, n - 1 - j] = tokens[src[ok]]
            p = self.prob(ctx, tokens[lo:hi])
            total += float(-np.log(p).sum())
            count += hi - lo
        return total, count


def stream_chunks(arrays: Iterable[np.ndarray], max_tokens: int | None, chunk: int = 1 << 22) -> Iterator[np.ndarray]:
    """Consecutive slices of a list of (memory-mapped) token arrays, capped at ``max_tokens``."""
    left = max_tokens if max_tokens and max_tokens > 0 else None
    for arr in arrays:
        for lo in range(0, len(arr), chunk):
            piece = arr[lo : lo + chunk]
            if left is not None:
                piece = piece[:left]
                left -= len(piece)
            if len(piece):
                yield np.asarray(piece)
            if left == 0:
                return
