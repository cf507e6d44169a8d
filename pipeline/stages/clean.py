"""Clean: raw documents -> extracted, normalised, filtered, deduplicated, decontaminated text.

Four fan-outs through the executor, so local processes and Dask give the same bytes:

1. per raw shard: the configured steps (pipeline.filters.apply, pipeline.filters.steps),
   then the dedup signatures of the survivors, written per shard and per band
   (pipeline.dedup.index, pipeline.dedup.minhash);
2. per band x bucket range: links between documents that share a bucket;
   the driver clusters them (union-find) and drops all but each cluster's first document;
3. per shard, when ``clean.decontaminate.enabled``: n-grams of the validation documents,
   then the training documents that share one (pipeline.dedup.decontam);
4. the driver streams the survivors into ``data/clean/part-*.parquet`` in shard order.

Every input document ends up kept or in ``rejected/`` with the step and reason, and
``funnel.json`` counts documents and bytes in, kept and rejected per step and reason
(in == kept + rejected is checked before anything is written; pipeline.filters.funnel).

Incremental runs (``clean.incremental=true``): raw shards already cleaned (same name and
sha256, recorded in ``index/index.json``) are skipped, the previous output's
shards and dedup index are carried over, and the new documents are deduplicated against
everything kept before (the index, ``index/<band>/*.npy``) as well as each other.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.core.artifacts import (
    Timer,
    atomic_dir,
    doc_id,
    read_json,
    require_dir,
    sha256_file,
    write_json,
    write_summary,
)
from pipeline.core.errors import PipelineError
from pipeline.core.parquet import ShardWriter, iter_rows, parquet_files
from pipeline.dedup import decontam
from pipeline.dedup.index import carry_over, find_duplicates, previous_run, write_index
from pipeline.dedup.minhash import DedupParams
from pipeline.filters.apply import BATCH, MAX_ERROR_EXAMPLES, build_steps, clean_shard, nbytes, step_name
from pipeline.filters.funnel import Tally, build_funnel, check_funnel, merge_funnels, step_rows
from pipeline.filters.schema import CLEAN_SCHEMA, REJECTED_SCHEMA

log = logging.getLogger("pipeline.stages.clean")

WORK = "_work"


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
    dedup = p.exact or p.near
    dc = decontam.settings(cfg)
    rows_per_shard = int(cfg.clean.get("rows_per_shard", 500))
    out_dir = Path(cfg.paths.clean)

    shard_info = [{"name": s.name, "sha256": sha256_file(s)} for s in shards]
    prev = previous_run(out_dir, p) if bool(cfg.clean.get("incremental", False)) else None
    run_no = prev.run + 1 if prev else 0
    done = prev.done if prev else set()
    todo = [i for i, s in enumerate(shard_info) if (s["name"], s["sha256"]) not in done]

    with atomic_dir(out_dir) as tmp:
        work = tmp / WORK
        work.mkdir()
        n_prev_kept, n_prev_rej = carry_over(prev.dir, tmp) if prev else (0, 0)
        prev_kept_files = parquet_files(tmp)
        phase = {"start": timer.seconds}

        # 1. every new raw shard through the steps; the survivors' dedup signatures
        tasks = [
            {"index": i, "shard": str(shards[i]), "work": str(work), "steps": step_cfgs, "run": run_no,
             "dedup": p.index_meta() | {"partition_rows": p.partition_rows}}
            for i in todo
        ]  # fmt: skip
        results = map_ordered(clean_shard, tasks, cfg.executor)
        phase["filter_and_sign"] = timer.seconds

        # 2. duplicates, among the new documents and of what earlier runs kept
        drop = find_duplicates(work, tmp, prev is not None, p, run_no, cfg.executor) if dedup else {}
        phase["dedup"] = timer.seconds

        # 3. training documents that share n-grams with held-out text
        cand = [work / f"kept-{r['index']:05d}.parquet" for r in results]
        bad, dc_info = {}, None
        if dc["enabled"]:
            bad, dc_info = decontam.find_contaminated(cfg, dc, work, cand, prev_kept_files, drop, cfg.executor)
        phase["decontaminate"] = timer.seconds

        # 4. survivors and rejections into the output, in shard order; the funnel; the index
        out = _write_documents(tmp, work, results, cand, drop, bad, rows_per_shard, n_prev_kept, n_prev_rej)
        funnel = _funnel(steps, results, out, dedup, dc["enabled"])
        n_in = funnel["in"]
        if n_in == 0 and not prev:
            raise PipelineError(f"clean found 0 documents in {raw_dir}")
        if out.kept == 0 and n_in and not prev:
            reasons = ", ".join(f"{k}={v}" for k, v in funnel["rejected"].items())
            raise PipelineError(f"clean kept 0 of {n_in} documents (rejected: {reasons})")
        total = funnel
        if prev:
            total = merge_funnels(read_json(prev.dir / "funnel.json"), funnel)
            check_funnel(total)
        write_json(tmp / "funnel.json", total)
        index_counts = {}
        if dedup:
            shards_in = (prev.shards_in if prev else []) + [shard_info[i] for i in todo]
            index_counts = write_index(tmp, work, p, {**drop, **bad}, run_no, shards_in)
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
            shards_out=out.kept_files,
            rejected_shards=out.rejected_files,
            lineage={f"part-{k:05d}.parquet": sorted(v) for k, v in sorted(out.lineage.items())},
            dedup={**p.index_meta(), "index_entries": index_counts, "dropped": len(drop)},
            decontaminate=dc_info,
            step_errors=[e for r in results for e in r["errors"]][:MAX_ERROR_EXAMPLES],
        )
    return summary


def _funnel(steps: list, results: list[dict], out: _Written, dedup: bool, decontaminate: bool) -> dict:
    """This run's funnel, checked: the steps' counts from the workers, then dedup and decontamination."""
    funnel_steps = step_rows([step_name(s) for s in steps], results)
    if dedup:
        funnel_steps.append({"step": "dedup", "in": out.dedup_in, "out": out.decontam_in})
    if decontaminate:
        funnel_steps.append({"step": "decontaminate", "in": out.decontam_in, "out": out.kept})
    funnel = build_funnel(sum(r["in"] for r in results), sum(r["bytes_in"] for r in results), out.kept,
                          out.bytes_kept_in, out.bytes_out, out.tally, funnel_steps)  # fmt: skip
    check_funnel(funnel)
    return funnel


@dataclass
class _Written:
    kept_files: list[dict]
    rejected_files: list[dict]
    tally: Tally  # rejections of the workers, dedup and decontamination
    lineage: dict[int, set[str]] = field(default_factory=dict)  # output shard -> raw shards it descends from
    kept: int = 0
    dedup_in: int = 0
    decontam_in: int = 0
    bytes_kept_in: int = 0
    bytes_out: int = 0


def _write_documents(tmp: Path, work: Path, results: list[dict], cand: list[Path], drop: dict, bad: dict,
                     rows_per_shard: int, n_prev_kept: int, n_prev_rej: int) -> _Written:  # fmt: skip
    """Stream each shard's rejected rows, then its candidates minus the duplicates (``drop``) and
    contaminated ones (``bad``), into ``part-*.parquet`` and ``rejected/``, numbered after the
    shards carried over."""
    kept_w = ShardWriter(work / "out", CLEAN_SCHEMA, rows_per_shard, start=n_prev_kept)
    rej_w = ShardWriter(work / "out" / "rejected", REJECTED_SCHEMA, rows_per_shard, start=n_prev_rej)
    tally = Tally()
    for r in results:
        tally.update(r)
    w = _Written([], [], tally)
    for res, path in zip(results, cand, strict=True):
        for row in iter_rows(work / f"rejected-{res['index']:05d}.parquet", batch_size=BATCH):
            rej_w.write(row)
        for row in iter_rows(path, batch_size=BATCH):
            w.dedup_in += 1
            key = row["key"]
            step, reason = ("dedup", drop[key]) if key in drop else (None, None)
            if reason is None:
                w.decontam_in += 1
                if key in bad:
                    step, reason = "decontaminate", "contaminated"
            if reason:
                tally.reject(step, reason, row["bytes_in"])
                rej_w.write({"id": row["raw_id"], "url": row["url"], "source": row["source"], "step": step,
                             "reason": reason, "bytes": row["bytes_in"], "text": row["text"]})  # fmt: skip
                continue
            w.lineage.setdefault(kept_w.shard_index, set()).add(res["shard"])
            w.bytes_out += nbytes(row["text"])
            w.bytes_kept_in += row["bytes_in"]
            kept_w.write({"id": doc_id(row["text"]), "text": row["text"], "url": row["url"],
                          "source": row["source"], "raw_id": row["raw_id"], "title": row["title"],
                          "language": row["language"]})  # fmt: skip
    w.kept_files = kept_w.close()
    w.rejected_files = rej_w.close()
    w.kept = kept_w.rows
    for f in w.kept_files:
        os.replace(work / "out" / f["name"], tmp / f["name"])
    for f in w.rejected_files:
        (tmp / "rejected").mkdir(exist_ok=True)
        os.replace(work / "out" / "rejected" / f["name"], tmp / "rejected" / f["name"])
    return w
