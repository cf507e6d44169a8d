"""Ingest: read the configured source into ``data/raw/`` Parquet shards.

Every source (``pydoc_site``, ``crawl``, ``warc``, ``files``, ``hf``) is a generator
``documents(source_cfg, ctx)`` of rows of :data:`RAW_SCHEMA`; this module only picks the
source, writes size-bounded shards atomically and records in ``_summary.json`` how many
documents and bytes ended in each status (fetched, not modified, robots-disallowed,
error by kind, skipped by reason). Rows carry their provenance (input file and byte
offset, WARC record id and type, HTTP status, content type) but never fetch times, so
identical content gives identical shards.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pyarrow.parquet as pq

from pipeline.core.artifacts import Timer, atomic_dir, write_summary
from pipeline.core.errors import PipelineError
from pipeline.sources.raw import IngestContext, RAW_SCHEMA, RawShardWriter, ShardPart, content_bytes

log = logging.getLogger("pipeline.stages.ingest")


def _sources() -> dict[str, Callable[..., Iterator[dict]]]:
    from pipeline.sources import crawl, files, hf, pydoc_site, warc

    return {
        "pydoc_site": pydoc_site.documents,
        "crawl": crawl.documents,
        "warc": warc.documents,
        "files": files.documents,
        "hf": hf.documents,
    }


def _empty_message(kind: str, ctx: IngestContext) -> str:
    statuses = ", ".join(f"{k}={v}" for k, v in sorted(ctx.docs.items())) or "none"
    first = next((m[0] for _, m in sorted(ctx.examples.items()) if m), None)
    why = f"; e.g. {first}" if first else ""
    if "input_paths" in ctx.extra:
        return (
            f"no documents found in {', '.join(ctx.extra['input_paths'])} "
            f"({ctx.extra.get('files_found', 0)} files, statuses: {statuses}){why}"
        )
    return f"{kind} produced no documents (statuses: {statuses}){why}"


def run(cfg) -> dict:
    """Read the configured source into ``cfg.paths.raw`` and summarise what was kept or skipped."""
    timer = Timer()
    kind = str(cfg.source.kind)
    sources = _sources()
    if kind not in sources:
        raise PipelineError(f"source kind {kind!r} is not implemented by ingest (available: {', '.join(sources)})")
    max_shard_bytes = int(cfg.source.get("max_shard_bytes", 0) or 0)
    closers: list[Callable[[], None]] = []
    try:
        return _run(cfg, kind, sources[kind], max_shard_bytes, timer, closers)
    finally:
        for close in closers:
            close()


def _run(cfg, kind: str, source, max_shard_bytes: int, timer: Timer, closers: list) -> dict:
    with atomic_dir(Path(cfg.paths.raw)) as tmp:
        ctx = IngestContext(kind, Path(cfg.paths.root), tmp / ".work", cfg.get("executor"))
        ctx.on_close = closers
        writer = RawShardWriter(tmp, int(cfg.source.rows_per_shard), max_shard_bytes)
        bytes_out = 0
        try:
            for row in source(cfg.source, ctx):
                if isinstance(row, ShardPart):
                    writer.add_part(row)
                    bytes_out += row.bytes
                    continue
                n = content_bytes(row)
                bytes_out += n
                writer.write(row, n)
        except BaseException:
            writer.abort()  # no write may still be running when atomic_dir removes the temp dir
            raise
        shards = writer.close()
        shutil.rmtree(tmp / ".work", ignore_errors=True)
        unchanged = ctx.docs.get("not_modified", 0) + ctx.docs.get("unchanged", 0)
        if writer.rows == 0:
            if not unchanged:
                raise PipelineError(_empty_message(kind, ctx))
            # an incremental crawl of an unchanged site: an empty, valid output
            pq.write_table(RAW_SCHEMA.empty_table(), tmp / "part-00000.parquet", compression="zstd")
            shards = [{"name": "part-00000.parquet", "rows": 0}]
        summary = write_summary(
            tmp,
            "ingest",
            cfg,
            {},
            timer,
            source=kind,
            docs_out=writer.rows,
            bytes_out=bytes_out,
            shards=shards,
            statuses=dict(sorted(ctx.docs.items())),
            accounting={kind: ctx.accounting()},
            problem_examples=dict(sorted(ctx.examples.items())),
            **ctx.extra,
        )
    for hook in ctx.on_commit:
        hook()
    return summary
