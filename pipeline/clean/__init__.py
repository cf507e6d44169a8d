"""Clean: raw documents -> extracted, normalised, filtered, exact-deduplicated text.

The configured steps run per raw shard through the executor (each worker writes its own
intermediate files); exact dedup then runs once, in shard order, so the first occurrence
wins on every backend. Every input document ends up kept or rejected with a reason, and
``funnel.json`` counts both.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import unicodedata
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.artifacts import (
    ShardWriter,
    Timer,
    atomic_dir,
    doc_id,
    iter_rows,
    parquet_files,
    require_dir,
    write_json,
    write_summary,
)
from pipeline.errors import PipelineError

log = logging.getLogger("pipeline.clean")

CLEAN_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("text", pa.string(), nullable=False),
        pa.field("url", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("raw_id", pa.string(), nullable=False),
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
    ]
)
CANDIDATE_SCHEMA = pa.schema(
    [
        pa.field("text", pa.string(), nullable=False),
        pa.field("url", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("raw_id", pa.string(), nullable=False),
        pa.field("norm_hash", pa.string(), nullable=False),
    ]
)
# 16-byte digests of normalised text, first-seen order; .npy so that globbing the output
# for *.parquet finds only document shards.
DEDUP_INDEX = "dedup_index.npy"
WORK = "_work"
BATCH = 256
MAX_ERROR_EXAMPLES = 20


def normalized_hash(text: str) -> str:
    """Hash of the text as dedup sees it: NFKC, lowercase, whitespace runs collapsed."""
    norm = " ".join(unicodedata.normalize("NFKC", text).lower().split())
    return hashlib.sha256(norm.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def build_steps(step_cfgs: list[dict]) -> list:
    """Instantiate the configured steps (``_target_`` + arguments), with a clear error per bad entry."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    steps = []
    for i, sc in enumerate(step_cfgs):
        target = sc.get("_target_") if isinstance(sc, dict) else None
        if not target:
            raise PipelineError(f"clean.steps[{i}] has no _target_ (got {sc!r})")
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


def apply_steps(steps: list, doc: dict, errors: list[str]) -> tuple[dict | None, int, str]:
    """Run one document through the steps: (doc, len(steps), "") if kept, else (None, j, reason)."""
    from pipeline.clean.steps import Reject

    for j, step in enumerate(steps):
        if getattr(step, "needs_text", True) and doc.get("text") is None:
            return None, j, "no_text"
        try:
            result = step(doc)
        except Exception as e:  # noqa: BLE001 - one bad document must not stop the batch
            msg = f"{doc.get('url')}: {step_name(step)} failed: {type(e).__name__}: {e}"
            log.warning("clean: %s", msg)
            if len(errors) < MAX_ERROR_EXAMPLES:
                errors.append(msg)
            return None, j, "step_error"
        if isinstance(result, Reject):
            return None, j, result.reason
        doc = result
    if doc.get("text") is None:
        return None, len(steps), "no_text"
    return doc, len(steps), ""


def step_name(step) -> str:
    return getattr(step, "name", type(step).__name__)


def clean_shard(task: dict) -> dict:
    """Worker: filter one raw shard into ``<work>/kept-i`` and ``<work>/rejected-i``; return counts."""
    steps = build_steps(task["steps"])
    names = [step_name(s) for s in steps]
    passed = [0] * len(steps)
    reached = [0] * len(steps)
    rejected: Counter[str] = Counter()
    errors: list[str] = []
    work = Path(task["work"])
    kept_out = _ParquetOut(work / f"kept-{task['index']:05d}.parquet", CANDIDATE_SCHEMA)
    rej_out = _ParquetOut(work / f"rejected-{task['index']:05d}.parquet", REJECTED_SCHEMA)
    n_in = bytes_in = 0
    for raw in iter_rows(task["shard"], batch_size=BATCH):
        n_in += 1
        content = raw.get("html") if raw.get("html") is not None else raw.get("text")
        bytes_in += len((content or "").encode("utf-8", "surrogatepass"))
        doc, where, reason = apply_steps(steps, dict(raw), errors)
        for j in range(min(where + 1, len(steps))):
            reached[j] += 1
        for j in range(where):
            passed[j] += 1
        if doc is None:
            rejected[reason] += 1
            step = names[where] if where < len(steps) else "end"
            rej_out.write(
                {"id": raw["id"], "url": raw["url"], "source": raw["source"], "step": step, "reason": reason}
            )
            continue
        kept_out.write(
            {
                "text": doc["text"],
                "url": raw["url"],
                "source": raw["source"],
                "raw_id": raw["id"],
                "norm_hash": normalized_hash(doc["text"]),
            }
        )
    kept_out.close()
    rej_out.close()
    return {
        "shard": Path(task["shard"]).name,
        "in": n_in,
        "bytes_in": bytes_in,
        "steps": [[names[j], reached[j], passed[j]] for j in range(len(steps))],
        "rejected": dict(rejected),
        "errors": errors,
    }


def run(cfg) -> dict:
    """Clean ``cfg.paths.raw`` into ``cfg.paths.clean`` with the steps in ``cfg.clean.steps``."""
    from omegaconf import OmegaConf

    from pipeline.executor import map_ordered

    timer = Timer()
    raw_dir = require_dir(Path(cfg.paths.raw), "raw documents", "ingest")
    shards = parquet_files(raw_dir)
    if not shards:
        raise PipelineError(f"no raw shards (*.parquet) in {raw_dir}: run `python -m pipeline ingest` first")
    step_cfgs = OmegaConf.to_container(cfg.clean.steps, resolve=True)
    steps = build_steps(step_cfgs)  # fail fast, in this process, on a bad step config
    dedup = bool(cfg.clean.get("dedup", True))
    rows_per_shard = int(cfg.clean.get("rows_per_shard", 500))

    with atomic_dir(Path(cfg.paths.clean)) as tmp:
        work = tmp / WORK
        work.mkdir()
        tasks = [
            {"index": i, "shard": str(s), "work": str(work), "steps": step_cfgs} for i, s in enumerate(shards)
        ]
        results = map_ordered(clean_shard, tasks, cfg.executor)

        kept_w = ShardWriter(tmp, CLEAN_SCHEMA, rows_per_shard)
        rej_w = ShardWriter(tmp / "rejected", REJECTED_SCHEMA, rows_per_shard)
        seen: dict[str, None] = {}  # insertion-ordered set: the index is written in first-seen order
        lineage: dict[int, set[str]] = {}
        dedup_in = duplicates = bytes_out = 0
        for i, res in enumerate(results):
            for row in iter_rows(work / f"rejected-{i:05d}.parquet", batch_size=BATCH):
                rej_w.write(row)
            for row in iter_rows(work / f"kept-{i:05d}.parquet", batch_size=BATCH):
                dedup_in += 1
                h = row["norm_hash"]
                if dedup and h in seen:
                    duplicates += 1
                    rej_w.write(
                        {"id": row["raw_id"], "url": row["url"], "source": row["source"], "step": "dedup",
                         "reason": "duplicate"}
                    )  # fmt: skip
                    continue
                seen[h] = None
                lineage.setdefault((kept_w.rows + len(kept_w.buffer)) // rows_per_shard, set()).add(res["shard"])
                bytes_out += len(row["text"].encode("utf-8", "surrogatepass"))
                kept_w.write(
                    {"id": doc_id(row["text"]), "text": row["text"], "url": row["url"], "source": row["source"],
                     "raw_id": row["raw_id"]}
                )  # fmt: skip
        kept_files = kept_w.close()
        rej_files = rej_w.close()
        shutil.rmtree(work)

        n_in = sum(r["in"] for r in results)
        rejected: Counter[str] = Counter()
        for r in results:
            rejected.update(r["rejected"])
        if duplicates:
            rejected["duplicate"] += duplicates
        kept = kept_w.rows
        funnel_steps = []
        for j, step in enumerate(steps):
            funnel_steps.append(
                {
                    "step": step_name(step),
                    "in": sum(r["steps"][j][1] for r in results),
                    "out": sum(r["steps"][j][2] for r in results),
                }
            )
        funnel_steps.append({"step": "dedup", "in": dedup_in, "out": kept})
        funnel = {"in": n_in, "kept": kept, "rejected": dict(sorted(rejected.items())), "steps": funnel_steps}
        if n_in != kept + sum(rejected.values()):
            raise AssertionError(f"funnel does not add up: in={n_in} kept={kept} rejected={dict(rejected)}")
        if n_in == 0:
            raise PipelineError(f"clean found 0 documents in {raw_dir}")
        if kept == 0:
            reasons = ", ".join(f"{k}={v}" for k, v in funnel["rejected"].items())
            raise PipelineError(f"clean kept 0 of {n_in} documents (rejected: {reasons})")
        write_json(tmp / "funnel.json", funnel)
        if dedup:
            np.save(tmp / DEDUP_INDEX, np.array([bytes.fromhex(h) for h in seen], dtype="S16"), allow_pickle=False)
        summary = write_summary(
            tmp,
            "clean",
            cfg,
            {"raw": raw_dir},
            timer,
            docs_in=n_in,
            kept=kept,
            rejected=funnel["rejected"],
            bytes_in=sum(r["bytes_in"] for r in results),
            bytes_out=bytes_out,
            funnel=funnel,
            steps=[repr(s) for s in steps],
            shards_in=[r["shard"] for r in results],
            shards_out=kept_files,
            rejected_shards=rej_files,
            lineage={kept_files[k]["name"]: sorted(v) for k, v in sorted(lineage.items())},
            dedup_index={"file": DEDUP_INDEX, "hashes": len(seen)} if dedup else None,
            step_errors=[e for r in results for e in r["errors"]][:MAX_ERROR_EXAMPLES],
        )
    return summary
