"""Clean: raw documents -> extracted, normalised, filtered, deduplicated, decontaminated text.

Four fan-outs through the executor, so local processes, Dask and Ray give the same bytes:

1. per raw shard: the configured steps (pipeline.filters.steps), then the dedup
   signatures of the survivors, written per shard and per band (pipeline.dedup.minhash);
2. per band x bucket range: links between documents that share a bucket;
   the driver clusters them (union-find) and drops all but each cluster's first document;
3. per shard, when ``clean.decontaminate.enabled``: n-grams of the validation documents,
   then the training documents that share one (pipeline.dedup.decontam);
4. the driver streams the survivors into ``data/clean/part-*.parquet`` in shard order.

Every input document ends up kept or in ``rejected/`` with the step and reason, and
``funnel.json`` counts documents and bytes in, kept and rejected per step and reason
(in == kept + rejected is checked before anything is written).

Incremental runs (``clean.incremental=true``): raw shards already cleaned (same name and
sha256, recorded in the previous ``_summary.json``) are skipped, the previous output's
shards and dedup index are carried over, and the new documents are deduplicated against
everything kept before (the index, ``index/<band>/*.npy``) as well as each other.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import unicodedata
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core.artifacts import (
    ShardWriter,
    Timer,
    atomic_dir,
    doc_id,
    iter_rows,
    parquet_files,
    read_json,
    require_dir,
    sha256_file,
    write_json,
    write_summary,
)
from pipeline.core.errors import PipelineError
from pipeline.dedup import decontam
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
    write_band_files,
    write_index,
)

log = logging.getLogger("pipeline.stages.clean")

CLEAN_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("text", pa.string(), nullable=False),
        pa.field("url", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("raw_id", pa.string(), nullable=False),
        pa.field("title", pa.string()),
        pa.field("language", pa.string()),
    ]
)
# ``id`` of a rejected document is its raw id: rejected docs may have no cleaned text.
REJECTED_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("url", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("step", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("bytes", pa.int64(), nullable=False),  # input size (HTML or text), for the byte funnel
        pa.field("text", pa.string()),  # the text as the rejecting step saw it (null before extraction)
    ]
)
CANDIDATE_SCHEMA = pa.schema(
    [
        pa.field("key", pa.int64(), nullable=False),
        pa.field("text", pa.string(), nullable=False),
        pa.field("url", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("raw_id", pa.string(), nullable=False),
        pa.field("title", pa.string()),
        pa.field("language", pa.string()),
        pa.field("bytes_in", pa.int64(), nullable=False),
    ]
)
# The dedup index (per band, per shard: sorted (bucket, key) of kept documents) and its
# parameters; .npy so that globbing the output for *.parquet finds only document shards.
INDEX = "index"
WORK = "_work"
BATCH = 256
MAX_ERROR_EXAMPLES = 20


def normalized_hash(text: str) -> str:
    """Hash of the text as dedup sees it: NFKC, lowercase, whitespace runs collapsed."""
    norm = " ".join(unicodedata.normalize("NFKC", text).lower().split())
    return hashlib.sha256(norm.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def build_steps(step_cfgs: list[dict]) -> list:
    """Instantiate the configured steps (``_target_`` + arguments), with a clear error per bad entry.

    A step with ``enabled: false`` is skipped, so any step can be switched off from the
    command line (``++clean.steps.4.enabled=false``) without editing the list.
    """
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    steps = []
    for i, sc in enumerate(step_cfgs):
        target = sc.get("_target_") if isinstance(sc, dict) else None
        if not target:
            raise PipelineError(f"clean.steps[{i}] has no _target_ (got {sc!r})")
        sc = dict(sc)
        if not sc.pop("enabled", True):
            continue
        try:
            steps.append(instantiate(sc, _convert_="all"))
        except InstantiationException as e:
            msg = " ".join(str(e).split())
            raise PipelineError(f"clean.steps[{i}] ({target}) could not be built: {msg}") from e
        if not callable(steps[-1]):
            raise PipelineError(f"clean.steps[{i}] ({target}) is not callable")
    return steps


class _ParquetOut:
    """Streams rows into one Parquet file in small batches (bounded memory)."""

    def __init__(self, path: Path, schema: pa.Schema) -> None:
        self.path, self.schema = path, schema
        self.writer = pq.ParquetWriter(path, schema, compression="zstd")
        self.buf: list[dict] = []

    def write(self, row: dict) -> None:
        self.buf.append(row)
        if len(self.buf) >= BATCH:
            self.flush()

    def flush(self) -> None:
        if self.buf:
            self.writer.write_table(pa.Table.from_pylist(self.buf, schema=self.schema))
            self.buf = []

    def close(self) -> None:
        self.flush()
        self.writer.close()


def apply_steps(steps: list, doc: dict, errors: list[str]) -> tuple[dict, int, str]:
    """Run one document through the steps: (doc, len(steps), "") if kept, else (doc as it
    reached the rejecting step j, j, reason)."""
    from pipeline.filters.steps import Reject

    for j, step in enumerate(steps):
        if getattr(step, "needs_text", True) and doc.get("text") is None:
            return doc, j, "no_text"
        try:
            result = step(doc)
        except Exception as e:  # noqa: BLE001 - one bad document must not stop the batch
            msg = f"{doc.get('url')}: {step_name(step)} failed: {type(e).__name__}: {e}"
            log.warning("clean: %s", msg)
            if len(errors) < MAX_ERROR_EXAMPLES:
                errors.append(msg)
            return doc, j, "step_error"
        if isinstance(result, Reject):
            return doc, j, result.reason
        doc = result
    if doc.get("text") is None:
        return doc, len(steps), "no_text"
    return doc, len(steps), ""


def step_name(step) -> str:
    return getattr(step, "name", type(step).__name__)


def _nbytes(s: str | None) -> int:
    return len((s or "").encode("utf-8", "surrogatepass"))


def clean_shard(task: dict) -> dict:
    """Worker: filter one raw shard into ``<work>/kept-i`` and ``<work>/rejected-i``, write its
    dedup band files, return counts."""
    steps = build_steps(task["steps"])
    p = DedupParams(**task["dedup"])
    signer = Signer(p) if p.near else None
    names = [step_name(s) for s in steps]
    passed = [0] * len(steps)
    reached = [0] * len(steps)
    rejected: Counter[str] = Counter()
    rejected_bytes: Counter[str] = Counter()
    by_step: dict[str, Counter[str]] = {}
    errors: list[str] = []
    work = Path(task["work"])
    kept_out = _ParquetOut(work / f"kept-{task['index']:05d}.parquet", CANDIDATE_SCHEMA)
    rej_out = _ParquetOut(work / f"rejected-{task['index']:05d}.parquet", REJECTED_SCHEMA)
    keys: list[int] = []
    exact: list[int] = []
    shingles = []
    n_in = bytes_in = 0
    for raw in iter_rows(task["shard"], batch_size=BATCH):
        n_in += 1
        content = raw.get("html") if raw.get("html") is not None else raw.get("text")
        nb = _nbytes(content)
        bytes_in += nb
        doc, where, reason = apply_steps(steps, dict(raw), errors)
        for j in range(min(where + 1, len(steps))):
            reached[j] += 1
        for j in range(where):
            passed[j] += 1
        if reason:
            step = names[where] if where < len(steps) else "end"
            rejected[reason] += 1
            rejected_bytes[reason] += nb
            by_step.setdefault(step, Counter())[reason] += 1
            rej_out.write({"id": raw["id"], "url": raw["url"], "source": raw["source"], "step": step,
                           "reason": reason, "bytes": nb, "text": doc.get("text")})  # fmt: skip
            continue
        key = make_key(task["run"], task["index"], len(keys))
        keys.append(key)
        if p.exact:
            exact.append(exact_hash(normalized_hash(doc["text"])))
        if signer is not None:
            shingles.append(signer.shingles(doc["text"]))
        kept_out.write({"key": key, "text": doc["text"], "url": raw["url"], "source": raw["source"],
                        "raw_id": raw["id"], "title": doc.get("title"), "language": doc.get("language"),
                        "bytes_in": nb})  # fmt: skip
    kept_out.close()
    rej_out.close()
    karr = np.array(keys, dtype=np.uint64)
    bands = work / "bands"
    if p.exact:
        write_band_files(bands, task["index"], karr, {EXACT: np.array(exact, dtype=np.uint64)})
    if signer is not None:
        cols: dict[str, list] = {}
        has_all, sigs = [], []
        for a in range(0, len(shingles), 2048):  # bounded memory: 2048 signatures at a time
            sig, has = signer.signatures(shingles[a : a + 2048])
            bh = signer.band_hashes(sig)
            has_all.append(has)
            sigs.append(sig)
            for b in range(p.bands):
                cols.setdefault(f"b{b:03d}", []).append(bh[:, b])
        has = np.concatenate(has_all) if has_all else np.zeros(0, dtype=bool)
        (work / "sigs").mkdir(exist_ok=True)  # rows in candidate order, for link verification
        np.save(
            work / "sigs" / f"r{task['run']:03d}-{task['index']:05d}.npy",
            np.concatenate(sigs) if sigs else np.zeros((0, signer.k), dtype=np.uint32),
            allow_pickle=False,
        )
        write_band_files(bands, task["index"], karr[has],
                         {k: np.concatenate(v)[has] if v else np.zeros(0, np.uint64) for k, v in cols.items()}
                         if cols else {f"b{b:03d}": np.zeros(0, np.uint64) for b in range(p.bands)})  # fmt: skip
    return {
        "shard": Path(task["shard"]).name,
        "index": task["index"],
        "in": n_in,
        "bytes_in": bytes_in,
        "steps": [[names[j], reached[j], passed[j]] for j in range(len(steps))],
        "rejected": dict(rejected),
        "rejected_bytes": dict(rejected_bytes),
        "by_step": {k: dict(v) for k, v in by_step.items()},
        "errors": errors,
    }


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)  # outputs are immutable once written: sharing the inode is safe
    except OSError:
        shutil.copy2(src, dst)


def _carry_over(prev: Path, tmp: Path) -> tuple[int, int]:
    """Bring the previous output's kept and rejected shards and index into ``tmp``; return shard counts."""
    kept = parquet_files(prev)
    rej = parquet_files(prev / "rejected")
    for f in kept:
        _link_or_copy(f, tmp / f.name)
    for f in rej:
        _link_or_copy(f, tmp / "rejected" / f.name)
    for f in sorted((prev / INDEX).rglob("*.npy")):
        _link_or_copy(f, tmp / INDEX / f.relative_to(prev / INDEX))
    return len(kept), len(rej)


class _NumberedWriter(ShardWriter):
    """ShardWriter whose file numbers continue after ``start`` existing shards."""

    def __init__(self, out_dir: Path, schema: pa.Schema, rows_per_shard: int, start: int) -> None:
        super().__init__(out_dir, schema, rows_per_shard)
        self.start = start

    def flush(self) -> None:
        if not self.buffer:
            return
        name = f"{self.prefix}-{self.start + len(self.files):05d}.parquet"
        pq.write_table(pa.Table.from_pylist(self.buffer, schema=self.schema), self.out_dir / name, compression="zstd")
        self.files.append({"name": name, "rows": len(self.buffer)})
        self.rows += len(self.buffer)
        self.buffer = []


def _decontam_cfg(cfg) -> dict:
    from omegaconf import OmegaConf

    d = cfg.clean.get("decontaminate")
    d = OmegaConf.to_container(d, resolve=True) if d is not None else {}
    known = {"enabled", "ngram", "max_train_docs", "min_overlap", "paths"}
    if set(d) - known:
        raise PipelineError(f"clean.decontaminate: unknown keys {sorted(set(d) - known)} (known: {sorted(known)})")
    return {"enabled": bool(d.get("enabled", False)), "ngram": int(d.get("ngram", 13)),
            "max_train_docs": int(d.get("max_train_docs", 5)), "min_overlap": float(d.get("min_overlap", 0.0)),
            "paths": list(d.get("paths") or [])}  # fmt: skip


def _decontaminate(cfg, dc: dict, work: Path, cand: list[Path], prev_kept: list[Path], drop: dict, executor) -> tuple:
    """Keys of contaminated training documents (-> shared n-gram count), and what was checked."""
    from pipeline.core.executor import map_ordered

    fraction = float(cfg.shard.val_fraction)
    dropped = sorted(drop)
    vtasks = [{"path": str(f), "drop": dropped, "val_fraction": fraction, "ngram": dc["ngram"],
               "out": str(work / f"val-{i:05d}.npy")} for i, f in enumerate(cand)]  # fmt: skip
    vtasks += [{"path": str(f), "drop": [], "keyed": False, "val_fraction": fraction, "ngram": dc["ngram"],
                "out": str(work / f"val-prev-{i:05d}.npy")} for i, f in enumerate(prev_kept)]  # fmt: skip
    vres = map_ordered(decontam.val_ngrams, vtasks, executor)
    strict_texts = decontam.external_texts(dc["paths"], cfg.paths.root) + decontam.finetune_heldout_texts(cfg)
    strict_parts = [decontam.ngram_hashes(t, dc["ngram"]) for t in strict_texts]
    strict = np.unique(np.concatenate(strict_parts)) if strict_parts else np.zeros(0, dtype=np.uint64)
    held = np.unique(np.concatenate([strict, *(np.load(t["out"]) for t in vtasks)]))
    np.save(work / "held.npy", held, allow_pickle=False)
    htasks = [{"path": str(f), "drop": dropped, "val_fraction": fraction, "ngram": dc["ngram"],
               "held": str(work / "held.npy")} for f in cand]  # fmt: skip
    hres = map_ordered(decontam.train_hits, htasks, executor)
    bad = decontam.contaminated(hres, strict, dc["max_train_docs"], dc["min_overlap"])
    info = {"ngram": dc["ngram"], "max_train_docs": dc["max_train_docs"], "min_overlap": dc["min_overlap"],
            "val_docs": sum(r["val_docs"] for r in vres),
            "external_texts": len(strict_texts), "heldout_ngrams": len(held), "contaminated": len(bad)}  # fmt: skip
    return bad, info


def run(cfg) -> dict:
    """Clean ``cfg.paths.raw`` into ``cfg.paths.clean`` with the steps in ``cfg.clean.steps``."""
    from omegaconf import OmegaConf

    from pipeline.core.executor import map_ordered

    timer = Timer()
    raw_dir = require_dir(Path(cfg.paths.raw), "raw documents", "ingest")
    shards = parquet_files(raw_dir)
    if not shards:
        raise PipelineError(f"no raw shards (*.parquet) in {raw_dir}: run `python -m pipeline ingest` first")
    step_cfgs = OmegaConf.to_container(cfg.clean.steps, resolve=True)
    steps = build_steps(step_cfgs)  # fail fast, in this process, on a bad step config
    dd = cfg.clean.get("dedup", True)
    p = DedupParams.from_cfg(OmegaConf.to_container(dd, resolve=True) if OmegaConf.is_config(dd) else dd)
    dc = _decontam_cfg(cfg)
    rows_per_shard = int(cfg.clean.get("rows_per_shard", 500))
    out_dir = Path(cfg.paths.clean)

    shard_info = [{"name": s.name, "sha256": sha256_file(s)} for s in shards]
    prev, prev_meta, run_no = None, None, 0
    if bool(cfg.clean.get("incremental", False)) and (out_dir / INDEX / "index.json").is_file():
        prev, prev_meta = out_dir, read_json(out_dir / INDEX / "index.json")
        if prev_meta["params"] != p.index_meta():
            raise PipelineError(
                f"clean.incremental: the index in {out_dir / INDEX} was built with {prev_meta['params']}, "
                f"this run asks for {p.index_meta()}; rebuild with clean.incremental=false"
            )
        run_no = int(prev_meta["run"]) + 1
    done = {(s["name"], s["sha256"]) for s in (prev_meta or {}).get("shards_in", [])}
    todo = [i for i, s in enumerate(shard_info) if (s["name"], s["sha256"]) not in done]

    with atomic_dir(out_dir) as tmp:
        work = tmp / WORK
        work.mkdir()
        n_prev_kept, n_prev_rej = _carry_over(prev, tmp) if prev else (0, 0)
        prev_kept_files = parquet_files(tmp)
        tasks = [
            {"index": i, "shard": str(shards[i]), "work": str(work), "steps": step_cfgs, "run": run_no,
             "dedup": p.index_meta() | {"partition_rows": p.partition_rows}}
            for i in todo
        ]  # fmt: skip
        phase = {"start": timer.seconds}
        results = map_ordered(clean_shard, tasks, cfg.executor)
        phase["filter_and_sign"] = timer.seconds

        drop: dict[int, str] = {}
        if p.exact or p.near:
            dirs = [work / "bands"] + ([tmp / INDEX] if prev else [])
            btasks = band_tasks(dirs, p)
            # a few million bucket entries are a fraction of a second in one process: only fan out beyond that
            small = sum(t["entries"] for t in btasks) <= p.partition_rows
            links = [band_links(t) for t in btasks] if small else map_ordered(band_links, btasks, cfg.executor)
            store = SignatureStore([work / "sigs", tmp / INDEX / "sigs"])
            drop = cluster(links, run_no, store, p.min_similarity)
        phase["dedup"] = timer.seconds
        cand = [work / f"kept-{r['index']:05d}.parquet" for r in results]
        bad, dc_info = {}, None
        if dc["enabled"]:
            bad, dc_info = _decontaminate(cfg, dc, work, cand, prev_kept_files, drop, cfg.executor)
        phase["decontaminate"] = timer.seconds

        kept_w = _NumberedWriter(work / "out", CLEAN_SCHEMA, rows_per_shard, n_prev_kept)
        rej_w = _NumberedWriter(work / "out" / "rejected", REJECTED_SCHEMA, rows_per_shard, n_prev_rej)
        lineage: dict[int, set[str]] = {}
        dedup_in = decontam_in = bytes_out = bytes_kept_in = 0
        rejected: Counter[str] = Counter()
        rejected_bytes: Counter[str] = Counter()
        by_step: dict[str, Counter[str]] = {}
        for r in results:
            rejected.update(r["rejected"])
            rejected_bytes.update(r["rejected_bytes"])
            for step, c in r["by_step"].items():
                by_step.setdefault(step, Counter()).update(c)
        for res, path in zip(results, cand, strict=True):
            for row in iter_rows(work / f"rejected-{res['index']:05d}.parquet", batch_size=BATCH):
                rej_w.write(row)
            for row in iter_rows(path, batch_size=BATCH):
                dedup_in += 1
                key = row["key"]
                step, reason = ("dedup", drop[key]) if key in drop else (None, None)
                if reason is None:
                    decontam_in += 1
                    if key in bad:
                        step, reason = "decontaminate", "contaminated"
                if reason:
                    rejected[reason] += 1
                    rejected_bytes[reason] += row["bytes_in"]
                    by_step.setdefault(step, Counter())[reason] += 1
                    rej_w.write({"id": row["raw_id"], "url": row["url"], "source": row["source"], "step": step,
                                 "reason": reason, "bytes": row["bytes_in"], "text": row["text"]})  # fmt: skip
                    continue
                lineage.setdefault(n_prev_kept + (kept_w.rows + len(kept_w.buffer)) // rows_per_shard, set()).add(
                    res["shard"]
                )
                bytes_out += _nbytes(row["text"])
                bytes_kept_in += row["bytes_in"]
                kept_w.write({"id": doc_id(row["text"]), "text": row["text"], "url": row["url"],
                              "source": row["source"], "raw_id": row["raw_id"], "title": row["title"],
                              "language": row["language"]})  # fmt: skip
        kept_files = kept_w.close()
        rej_files = rej_w.close()
        for f in kept_files:
            os.replace(work / "out" / f["name"], tmp / f["name"])
        for f in rej_files:
            (tmp / "rejected").mkdir(exist_ok=True)
            os.replace(work / "out" / "rejected" / f["name"], tmp / "rejected" / f["name"])

        n_in = sum(r["in"] for r in results)
        bytes_in = sum(r["bytes_in"] for r in results)
        kept = kept_w.rows
        funnel_steps = [
            {"step": step_name(s), "in": sum(r["steps"][j][1] for r in results),
             "out": sum(r["steps"][j][2] for r in results)}
            for j, s in enumerate(steps)
        ]  # fmt: skip
        if p.exact or p.near:
            funnel_steps.append({"step": "dedup", "in": dedup_in, "out": decontam_in})
        if dc["enabled"]:
            funnel_steps.append({"step": "decontaminate", "in": decontam_in, "out": kept})
        funnel = {
            "in": n_in,
            "kept": kept,
            "rejected": dict(sorted(rejected.items())),
            "bytes_in": bytes_in,
            "bytes_kept_in": bytes_kept_in,
            "bytes_out": bytes_out,
            "rejected_bytes": dict(sorted(rejected_bytes.items())),
            "rejected_by_step": {k: dict(sorted(v.items())) for k, v in sorted(by_step.items())},
            "steps": funnel_steps,
        }
        check_funnel(funnel)
        if n_in == 0 and not prev:
            raise PipelineError(f"clean found 0 documents in {raw_dir}")
        if kept == 0 and n_in and not prev:
            reasons = ", ".join(f"{k}={v}" for k, v in funnel["rejected"].items())
            raise PipelineError(f"clean kept 0 of {n_in} documents (rejected: {reasons})")
        total = funnel
        if prev:
            total = merge_funnels(read_json(prev / "funnel.json"), funnel)
            check_funnel(total)
        write_json(tmp / "funnel.json", total)
        index_counts = {}
        if p.exact or p.near:
            index_counts = write_index(tmp / INDEX, p, work / "bands", {**drop, **bad}, run_no)
            for f in sorted((work / "sigs").glob("*.npy")):
                _link_or_copy(f, tmp / INDEX / "sigs" / f.name)
            done_list = (prev_meta or {}).get("shards_in", []) + [shard_info[i] for i in todo]
            write_json(tmp / INDEX / "index.json", {"run": run_no, "params": p.index_meta(), "shards_in": done_list})
        shutil.rmtree(work)
        phase["write"] = timer.seconds
        marks = list(phase.items())
        # timings go to the log, not the summary: summaries are compared across executors
        log.info("clean phases (s): %s", {k: round(t - marks[i][1], 3) for i, (k, t) in enumerate(marks[1:])})
        summary = write_summary(
            tmp,
            "clean",
            cfg,
            {"raw": raw_dir},
            timer,
            docs_in=total["in"],
            kept=total["kept"],
            rejected=total["rejected"],
            bytes_in=total["bytes_in"],
            bytes_out=total["bytes_out"],
            funnel=total,
            this_run=funnel if prev else None,
            incremental={
                "run": run_no,
                "new_shards": [shard_info[i]["name"] for i in todo],
                "carried_kept_shards": n_prev_kept,
            }
            if prev
            else None,
            steps=[repr(s) for s in steps],
            shards_in=[r["shard"] for r in results],
            shards_out=kept_files,
            rejected_shards=rej_files,
            lineage={f"part-{k:05d}.parquet": sorted(v) for k, v in sorted(lineage.items())},
            dedup={**p.index_meta(), "index_entries": index_counts, "dropped": len(drop)},
            decontaminate=dc_info,
            step_errors=[e for r in results for e in r["errors"]][:MAX_ERROR_EXAMPLES],
        )
    return summary


def check_funnel(f: dict) -> None:
    """in == kept + rejected, in documents and in input bytes; a stage that loses a document fails."""
    if f["in"] != f["kept"] + sum(f["rejected"].values()):
        raise AssertionError(f"funnel does not add up: in={f['in']} kept={f['kept']} rejected={f['rejected']}")
    if f["bytes_in"] != f["bytes_kept_in"] + sum(f["rejected_bytes"].values()):
        raise AssertionError(f"funnel bytes do not add up: {f['bytes_in']} != {f['bytes_kept_in']} + rejected")


def merge_funnels(a: dict, b: dict) -> dict:
    """Cumulative funnel of an incremental output: counts add up per key."""

    def add(x: dict, y: dict) -> dict:
        return dict(sorted((Counter(x) + Counter(y)).items()))

    steps = {s["step"]: dict(s) for s in a.get("steps", [])}
    for s in b["steps"]:
        t = steps.setdefault(s["step"], {"step": s["step"], "in": 0, "out": 0})
        t["in"] += s["in"]
        t["out"] += s["out"]
    return {
        "in": a["in"] + b["in"],
        "kept": a["kept"] + b["kept"],
        "rejected": add(a["rejected"], b["rejected"]),
        "bytes_in": a["bytes_in"] + b["bytes_in"],
        "bytes_kept_in": a["bytes_kept_in"] + b["bytes_kept_in"],
        "bytes_out": a["bytes_out"] + b["bytes_out"],
        "rejected_bytes": add(a["rejected_bytes"], b["rejected_bytes"]),
        "rejected_by_step": {
            k: add(a["rejected_by_step"].get(k, {}), b["rejected_by_step"].get(k, {}))
            for k in sorted(set(a["rejected_by_step"]) | set(b["rejected_by_step"]))
        },
        "steps": list(steps.values()),
    }
