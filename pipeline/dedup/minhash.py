"""Exact and MinHash-LSH near-duplicate detection that scales past memory.

The same four stages as datatrove's MinHash dedup, with the work vectorised in numpy:

1. **Signatures** (per shard, in the filtering worker, while the text is in memory): each
   document's tokens (pipeline.filters.text.dedup_text: lowercased, digits as 0, no
   punctuation, CJK characters one by one) are hashed in numpy straight from the bytes, word
   n-grams (``ngram`` = 5) are combined into 64-bit shingle hashes, and a signature of
   ``bands * rows`` values is taken with *one-permutation hashing* (Li, Owen & Zhang 2012):
   each shingle's hash picks a bin and its value competes for that bin's minimum, with
   empty bins filled by optimal densification (Shrivastava 2017). Per bin, two
   documents collide with probability equal to their Jaccard similarity, as with
   ``bands * rows`` independent permutations, but a document costs one hash per shingle
   instead of 100, and a whole shard is one ``np.minimum.at`` call. Every band's rows are
   then hashed to one 64-bit bucket id, and the shard writes, per band, a file of
   ``(bucket, key)`` sorted by bucket (plus one for the exact hash of the normalised text).
2. **Buckets** (fan-out over band x hash-range partitions): a task reads only its hash
   range from every shard's sorted file (binary search on a memory map), so memory is
   bounded by the partition, never the corpus; within a bucket every member is linked to
   the bucket's smallest key. Only these links (proportional to the duplicates) come back.
3. **Clusters** (driver): union-find over the links.
4. **Filter**: in each cluster the smallest key survives: keys are document positions
   (shard, row), so the first occurrence wins, the same on every backend and worker count.
   Keys of documents kept by an earlier run (the persisted index) carry a smaller run
   number than any new document's, so an incremental run never drops what was kept
   before, and drops what duplicates it.

The index persists as the kept documents' sorted ``(bucket, key)`` files, per band and
shard, in ``index/``; ``clean.incremental=true`` reads it back (see pipeline.dedup.index).
"""

from __future__ import annotations

import hashlib
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.filters.text import dedup_text
from pipeline.core.errors import PipelineError

M32 = np.uint64(0xFFFFFFFF)
GOLDEN = np.uint64(0x9E3779B97F4A7C15)
MAX_RUNS = 127  # key = run << 56 | shard << 32 | row: earlier runs sort first, then shard, then row
EXACT = "exact"


@dataclass(frozen=True)
class DedupParams:
    exact: bool = True
    near: bool = True
    ngram: int = 5
    bands: int = 20  # as conf/clean: recall ~0.98 on copies with 3 % of words edited (14 x 8: ~0.77)
    rows: int = 5
    seed: int = 1
    # Links whose signatures agree on fewer than this fraction of rows are dropped as chance
    # band collisions (an estimate of Jaccard; 0 keeps every LSH candidate, as datatrove does).
    min_similarity: float = 0.0
    partition_rows: int = 4_000_000  # bucket entries a band task holds at once

    @classmethod
    def from_cfg(cls, d) -> DedupParams:
        if d is None or isinstance(d, bool):
            return cls(exact=bool(d) if d is not None else True, near=False)
        d = dict(d)
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise PipelineError(
                f"clean.dedup: unknown keys {sorted(unknown)} (known: {sorted(cls.__dataclass_fields__)})"
            )
        conv = {"exact": bool, "near": bool, "min_similarity": float}
        p = cls(**{k: conv.get(k, int)(v) for k, v in d.items()})
        if p.near and (p.ngram < 1 or p.bands < 1 or p.rows < 1):
            raise PipelineError(f"clean.dedup: ngram, bands and rows must be >= 1 (got {p})")
        return p

    @property
    def band_names(self) -> list[str]:
        return ([EXACT] if self.exact else []) + ([f"b{b:03d}" for b in range(self.bands)] if self.near else [])

    def index_meta(self) -> dict:
        return {"exact": self.exact, "near": self.near, "ngram": self.ngram, "bands": self.bands, "rows": self.rows,
                "seed": self.seed, "min_similarity": self.min_similarity}  # fmt: skip


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: spreads every input bit over the output (vectorised, wrapping)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class Signer:
    """Shingles and one-permutation MinHash signatures for batches of documents."""

    def __init__(self, p: DedupParams) -> None:
        self.p = p
        self.k = p.bands * p.rows
        self._seed = np.uint64(p.seed)
        self._pw = self._ipw = np.ones(1, dtype=np.uint64)
        rng = np.random.default_rng(p.seed)
        self.row_mult = rng.integers(1, 2**63, size=p.rows, dtype=np.uint64) | np.uint64(1)
        self.probe = rng.integers(0, self.k, size=(64, self.k))  # densification probe sequences

    def _powers(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """P^i and P^-i mod 2^64 for i < n (cached, grown by doubling)."""
        if len(self._pw) < n + 1:
            m = max(n + 1, 2 * len(self._pw))
            p = np.uint64(0x100000001B3)  # odd, so invertible mod 2^64
            inv = np.uint64(pow(int(p), -1, 2**64))
            one = np.ones(1, dtype=np.uint64)
            self._pw = np.concatenate([one, np.cumprod(np.full(m - 1, p, dtype=np.uint64), dtype=np.uint64)])
            self._ipw = np.concatenate([one, np.cumprod(np.full(m - 1, inv, dtype=np.uint64), dtype=np.uint64)])
        return self._pw, self._ipw

    def word_hashes(self, text: str) -> np.ndarray:
        """A 64-bit hash per dedup token, computed on the UTF-8 bytes in numpy: a polynomial
        prefix sum over the whole text, differenced at token boundaries and shifted back to
        power 0, so equal tokens hash equally wherever they stand (no Python loop per word)."""
        b = np.frombuffer(dedup_text(text).encode("utf-8", "surrogatepass"), dtype=np.uint8)
        if not len(b):
            return np.zeros(0, dtype=np.uint64)
        edges = np.diff(np.concatenate(([0], (b > 32).view(np.int8), [0])))
        starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
        pw, ipw = self._powers(len(b))
        terms = (b.astype(np.uint64) + np.uint64(1)) * pw[: len(b)]
        pre = np.concatenate([np.zeros(1, dtype=np.uint64), np.cumsum(terms, dtype=np.uint64)])
        return mix64(((pre[ends] - pre[starts]) * ipw[starts]) ^ self._seed)

    def shingles(self, text: str) -> np.ndarray:
        """Unique-ish 64-bit hashes of the text's word n-grams (a shorter text is one shingle)."""
        w = self.word_hashes(text)
        n = min(self.p.ngram, len(w))
        if n == 0:
            return w
        h = np.zeros(len(w) - n + 1, dtype=np.uint64)
        for k in range(n):
            h = h * GOLDEN + w[k : k + len(h)]
        return mix64(h)

    def signatures(self, shingle_sets: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """(signatures uint32 [docs, bands*rows], has_signature bool [docs]) for a batch."""
        n_docs, k = len(shingle_sets), self.k
        lens = np.fromiter((len(s) for s in shingle_sets), dtype=np.int64, count=n_docs)
        has = lens > 0
        sig = np.full(n_docs * k, 1 << 32, dtype=np.uint64)
        if lens.sum():
            h = np.concatenate(shingle_sets)
            doc = np.repeat(np.arange(n_docs, dtype=np.uint64), lens)
            bins = ((h >> np.uint64(32)) * np.uint64(k)) >> np.uint64(32)
            np.minimum.at(sig, doc * np.uint64(k) + bins, h & M32)
        sig = sig.reshape(n_docs, k)
        empty = (sig > M32) & has[:, None]
        if empty.any():
            sig = self._densify(sig, empty)
        sig[~has] = 0
        return sig.astype(np.uint32), has

    def _densify(self, sig: np.ndarray, empty: np.ndarray) -> np.ndarray:
        """Optimal densification (Shrivastava 2017): an empty bin j takes the value of the first
        non-empty bin in its own fixed random probe sequence ``probe[0, j], probe[1, j], ...``.

        Every document uses the same sequences, so two documents' bin j agree with probability
        equal to their Jaccard similarity, and, unlike rotation (borrow from the next bin to
        the right), neighbouring empty bins of a band borrow from unrelated bins, which keeps
        the rows of a band independent for short documents too.
        """
        rows, cols = np.nonzero(empty)
        filled = ~empty
        out = sig.copy()
        for t in range(len(self.probe)):
            if not len(rows):
                break
            src = self.probe[t, cols]
            ok = filled[rows, src]
            out[rows[ok], cols[ok]] = sig[rows[ok], src[ok]]
            rows, cols = rows[~ok], cols[~ok]
        if len(rows):  # a handful of shingles and unlucky probes: the first non-empty bin
            first = np.argmax(filled, axis=1)
            out[rows, cols] = sig[rows, first[rows]]
        return out

    def band_hashes(self, sig: np.ndarray) -> np.ndarray:
        """[docs, bands] uint64 bucket ids: each band's ``rows`` values hashed together."""
        s = sig.astype(np.uint64).reshape(len(sig), self.p.bands, self.p.rows)
        h = (s * self.row_mult).sum(axis=2, dtype=np.uint64) + np.arange(self.p.bands, dtype=np.uint64) * GOLDEN
        return mix64(h)


def normalized_hash(text: str) -> str:
    """Hash of the text as exact dedup sees it: NFKC, lowercase, whitespace runs collapsed."""
    norm = " ".join(unicodedata.normalize("NFKC", text).lower().split())
    return hashlib.sha256(norm.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def exact_hash(norm_hash_hex: str) -> int:
    """64 bits of the normalised-text sha256 (collision odds ~N^2/2^65: 3e-4 at 10^8 documents)."""
    return int(norm_hash_hex[:16], 16)


def write_band_files(out: Path, shard: int, keys: np.ndarray, columns: dict[str, np.ndarray]) -> None:
    """Per band, ``(bucket, key)`` rows sorted by bucket then key: ``<out>/<band>/<shard>.npy``."""
    for band, buckets in columns.items():
        arr = np.stack([buckets.astype(np.uint64), keys.astype(np.uint64)], axis=1)
        arr = arr[np.lexsort((arr[:, 1], arr[:, 0]))] if len(arr) else arr.reshape(0, 2)
        d = out / band
        d.mkdir(parents=True, exist_ok=True)
        np.save(d / f"{shard:05d}.npy", np.ascontiguousarray(arr), allow_pickle=False)


def make_key(run: int, shard: int, row: int) -> int:
    if not 0 <= run <= MAX_RUNS or shard >= 1 << 24 or row >= 1 << 32:
        raise PipelineError(f"dedup key out of range: run {run}, shard {shard}, row {row}")
    return (run << 56) | (shard << 32) | row


def band_files(d: Path) -> list[str]:
    return sorted(str(f) for f in d.glob("*.npy")) if d.is_dir() else []


def band_tasks(dirs: list[Path], p: DedupParams) -> list[dict]:
    """One task per (band, bucket-range partition), partitions sized by ``partition_rows``."""
    tasks = []
    for band in p.band_names:
        files = [f for d in dirs for f in band_files(d / band)]
        total = sum(np.load(f, mmap_mode="r").shape[0] for f in files)
        parts = max(1, -(-total // max(1, p.partition_rows)))
        bounds = [int(i * (2**64) // parts) for i in range(parts + 1)]
        for i in range(parts):
            tasks.append(
                {"band": band, "files": files, "lo": bounds[i], "hi": bounds[i + 1], "entries": total // parts}
            )
    return tasks


def band_links(task: dict) -> dict:
    """Worker: links ``(member, bucket's smallest key)`` for every bucket with 2+ documents in range."""
    lo, hi = np.uint64(task["lo"]), task["hi"]
    chunks = []
    for f in task["files"]:
        arr = np.load(f, mmap_mode="r")
        if not len(arr):
            continue
        col = arr[:, 0]
        a = int(np.searchsorted(col, lo, side="left"))
        b = len(col) if hi >= 2**64 else int(np.searchsorted(col, np.uint64(hi), side="left"))
        if b > a:
            chunks.append(np.array(arr[a:b]))
    if not chunks:
        return {"band": task["band"], "links": np.zeros((0, 2), dtype=np.uint64)}
    arr = np.concatenate(chunks)
    arr = arr[np.lexsort((arr[:, 1], arr[:, 0]))]
    bucket = arr[:, 0]
    start = np.ones(len(arr), dtype=bool)
    start[1:] = bucket[1:] != bucket[:-1]
    head = np.maximum.accumulate(np.where(start, np.arange(len(arr)), 0))  # index of each row's bucket start
    member = ~start
    links = np.stack([arr[member, 1], arr[head[member], 1]], axis=1)
    return {"band": task["band"], "links": links}


class UnionFind:
    """Union by smallest key, so every root is its cluster's survivor."""

    def __init__(self) -> None:
        self.parent: dict[int, int] = {}

    def find(self, x: int) -> int:
        parent = self.parent
        root = x
        while parent.get(root, root) != root:
            root = parent[root]
        while parent.get(x, x) != root:  # path compression
            parent[x], x = root, parent[x]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            lo, hi = (ra, rb) if ra < rb else (rb, ra)
            self.parent[hi] = lo


class SignatureStore:
    """Signature rows by key, from per-shard ``<dir>/r<run>-<shard>.npy`` files (memory-mapped)."""

    def __init__(self, dirs: list[Path]) -> None:
        self.files = {f.stem: f for d in dirs if d.is_dir() for f in d.glob("*.npy")}
        self.open: dict[str, np.ndarray] = {}

    def row(self, key: int) -> np.ndarray | None:
        name = f"r{key >> 56:03d}-{(key >> 32) & 0xFFFFFF:05d}"
        if name not in self.open:
            if name not in self.files:
                return None
            self.open[name] = np.load(self.files[name], mmap_mode="r")
        arr = self.open[name]
        i = key & 0xFFFFFFFF
        return arr[i] if i < len(arr) else None


def cluster(results: list[dict], run: int, store: SignatureStore | None = None, min_similarity: float = 0.0):
    """This run's keys to drop -> reason (``duplicate``: same normalised text as an earlier doc, else
    ``near_duplicate``); keys of earlier runs are never dropped. With ``min_similarity``, a MinHash
    link is kept only when the two full signatures agree on at least that fraction of rows."""
    uf = UnionFind()
    exact_members: set[int] = set()
    checked: dict[tuple[int, int], bool] = {}
    for r in results:
        links = r["links"]
        if r["band"] == EXACT:
            exact_members.update(int(k) for k in links[:, 0])
        for a, b in links.tolist():
            if r["band"] != EXACT and min_similarity > 0 and store is not None:
                ok = checked.get((a, b))
                if ok is None:
                    sa, sb = store.row(a), store.row(b)
                    ok = sa is None or sb is None or float((sa == sb).mean()) >= min_similarity
                    checked[(a, b)] = ok
                if not ok:
                    continue
            uf.union(a, b)
    drop = {}
    for k in list(uf.parent):
        if k >> 56 == run and uf.find(k) != k:
            drop[k] = "duplicate" if k in exact_members else "near_duplicate"
    return drop


def write_index(index_dir: Path, p: DedupParams, bands_dir: Path, drop: dict[int, str], run: int) -> dict[str, int]:
    """Copy this run's band files without the dropped keys into ``index_dir/<band>/<run-shard>.npy``."""
    counts: dict[str, int] = {}
    dropped = np.fromiter(sorted(drop), dtype=np.uint64, count=len(drop))
    for band in p.band_names:
        out = index_dir / band
        out.mkdir(parents=True, exist_ok=True)
        for f in band_files(bands_dir / band):
            arr = np.load(f)
            if len(dropped):
                arr = arr[~np.isin(arr[:, 1], dropped)]
            np.save(out / f"r{run:03d}-{Path(f).name}", arr, allow_pickle=False)
            counts[band] = counts.get(band, 0) + len(arr)
    return counts
