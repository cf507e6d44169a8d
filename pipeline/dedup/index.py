"""The clean output's dedup index, and incremental runs against it.

A filtering worker signs its shard's candidates (:class:`ShardSignatures`: exact hash and
MinHash bands into ``<work>/bands/<band>/<shard>.npy``, full signatures into
``<work>/sigs``); :func:`find_duplicates` links and clusters them (with the previous
output's index on an incremental run); :func:`write_index` persists the kept documents'
entries as ``index/<band>/r<run>-<shard>.npy`` with ``index/index.json`` (run number,
parameters, raw shards cleaned so far). ``.npy`` so that globbing the output for
``*.parquet`` finds only document shards.

An incremental run (:func:`previous_run`) cleans only raw shards not in ``index.json``
(same name and sha256) and starts from the previous output (:func:`carry_over`).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.core.artifacts import read_json, write_json
from pipeline.core.errors import PipelineError
from pipeline.core.parquet import parquet_files
from pipeline.dedup.minhash import (
    EXACT,
    DedupParams,
    SignatureStore,
    Signer,
    band_links,
    band_tasks,
    cluster,
    exact_hash,
    make_key,
    normalized_hash,
    write_band_files,
)
from pipeline.dedup.minhash import write_index as write_band_index

INDEX = "index"
SIGN_CHUNK = 2048  # signatures computed at a time (bounded memory)


class ShardSignatures:
    """Keys and dedup signatures of one shard's candidates, in candidate order."""

    def __init__(self, p: DedupParams, run: int, shard: int) -> None:
        self.p, self.run, self.shard = p, run, shard
        self.signer = Signer(p) if p.near else None
        self.keys: list[int] = []
        self.exact: list[int] = []
        self.shingles: list = []

    def add(self, text: str) -> int:
        """Sign the next candidate; returns its key."""
        key = make_key(self.run, self.shard, len(self.keys))
        self.keys.append(key)
        if self.p.exact:
            self.exact.append(exact_hash(normalized_hash(text)))
        if self.signer is not None:
            self.shingles.append(self.signer.shingles(text))
        return key

    def write(self, work: Path) -> None:
        """Band files into ``<work>/bands``, full signatures (for link verification) into ``<work>/sigs``."""
        p, signer = self.p, self.signer
        karr = np.array(self.keys, dtype=np.uint64)
        bands = work / "bands"
        if p.exact:
            write_band_files(bands, self.shard, karr, {EXACT: np.array(self.exact, dtype=np.uint64)})
        if signer is None:
            return
        cols: dict[str, list] = {}
        has_all, sigs = [], []
        for a in range(0, len(self.shingles), SIGN_CHUNK):
            sig, has = signer.signatures(self.shingles[a : a + SIGN_CHUNK])
            bh = signer.band_hashes(sig)
            has_all.append(has)
            sigs.append(sig)
            for b in range(p.bands):
                cols.setdefault(f"b{b:03d}", []).append(bh[:, b])
        has = np.concatenate(has_all) if has_all else np.zeros(0, dtype=bool)
        (work / "sigs").mkdir(exist_ok=True)  # rows in candidate order
        np.save(
            work / "sigs" / f"r{self.run:03d}-{self.shard:05d}.npy",
            np.concatenate(sigs) if sigs else np.zeros((0, signer.k), dtype=np.uint32),
            allow_pickle=False,
        )
        write_band_files(bands, self.shard, karr[has],
                         {k: np.concatenate(v)[has] if v else np.zeros(0, np.uint64) for k, v in cols.items()}
                         if cols else {f"b{b:03d}": np.zeros(0, np.uint64) for b in range(p.bands)})  # fmt: skip


def find_duplicates(work: Path, out: Path, incremental: bool, p: DedupParams, run: int, executor) -> dict[int, str]:
    """This run's keys to drop -> ``duplicate`` | ``near_duplicate``, from the signatures under
    ``work`` (and the carried-over index in ``out`` when ``incremental``)."""
    from pipeline.core.executor import map_ordered

    dirs = [work / "bands"] + ([out / INDEX] if incremental else [])
    btasks = band_tasks(dirs, p)
    # a few million bucket entries are a fraction of a second in one process: only fan out beyond that
    small = sum(t["entries"] for t in btasks) <= p.partition_rows
    links = [band_links(t) for t in btasks] if small else map_ordered(band_links, btasks, executor)
    store = SignatureStore([work / "sigs", out / INDEX / "sigs"])
    return cluster(links, run, store, p.min_similarity)


def write_index(out: Path, work: Path, p: DedupParams, dropped: dict, run: int, shards_in: list[dict]) -> dict[str, int]:
    """Persist this run's kept entries and signatures in ``out/index``; entries per band."""
    counts = write_band_index(out / INDEX, p, work / "bands", dropped, run)
    for f in sorted((work / "sigs").glob("*.npy")):
        _link_or_copy(f, out / INDEX / "sigs" / f.name)
    write_json(out / INDEX / "index.json", {"run": run, "params": p.index_meta(), "shards_in": shards_in})
    return counts


@dataclass
class PreviousRun:
    """The output an incremental run builds on."""

    dir: Path
    run: int  # the previous run's number
    shards_in: list[dict]  # raw shards (name, sha256) cleaned so far

    @property
    def done(self) -> set[tuple[str, str]]:
        return {(s["name"], s["sha256"]) for s in self.shards_in}


def previous_run(out_dir: Path, p: DedupParams) -> PreviousRun | None:
    """The previous output in ``out_dir`` when it has an index built with the same parameters."""
    meta_file = Path(out_dir) / INDEX / "index.json"
    if not meta_file.is_file():
        return None
    meta = read_json(meta_file)
    if meta["params"] != p.index_meta():
        raise PipelineError(
            f"clean.incremental: the index in {Path(out_dir) / INDEX} was built with {meta['params']}, "
            f"this run asks for {p.index_meta()}; rebuild with clean.incremental=false"
        )
    return PreviousRun(Path(out_dir), int(meta["run"]), list(meta.get("shards_in", [])))


def carry_over(prev: Path, out: Path) -> tuple[int, int]:
    """Bring the previous output's kept and rejected shards and index into ``out``; return shard counts."""
    kept = parquet_files(prev)
    rej = parquet_files(prev / "rejected")
    for f in kept:
        _link_or_copy(f, out / f.name)
    for f in rej:
        _link_or_copy(f, out / "rejected" / f.name)
    for f in sorted((prev / INDEX).rglob("*.npy")):
        _link_or_copy(f, out / INDEX / f.relative_to(prev / INDEX))
    return len(kept), len(rej)


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)  # outputs are immutable once written: sharing the inode is safe
    except OSError:
        shutil.copy2(src, dst)
