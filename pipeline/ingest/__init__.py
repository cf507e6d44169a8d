"""Ingest: fetch documents from the configured source into ``data/raw/`` Parquet shards.

Every source yields rows of :data:`RAW_SCHEMA`; this module only picks the source, writes
the shards atomically and records what happened in ``_summary.json``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pyarrow as pa

from pipeline.artifacts import ShardWriter, Timer, atomic_dir, write_summary
from pipeline.errors import PipelineError

RAW_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("url", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("content_type", pa.string(), nullable=False),
        pa.field("http_status", pa.int32()),
        pa.field("html", pa.string()),
        pa.field("text", pa.string()),
    ]
)


def _sources() -> dict[str, Callable[..., Iterator[dict]]]:
    from pipeline.ingest import files, pydoc_site

    return {"pydoc_site": pydoc_site.documents, "files": files.documents}


def _empty_message(kind: str, stats: dict) -> str:
    if kind == "files":
        problems = ", ".join(f"{k}={v}" for k, v in stats.get("problems", {}).items()) or "none"
        return (
            f"no documents found in {', '.join(stats.get('input_paths', []))} "
            f"({stats.get('files_found', 0)} files, problems: {problems})"
        )
    statuses = ", ".join(f"{k}={v}" for k, v in stats.get("statuses", {}).items()) or "none"
    return f"{kind} produced no documents (statuses: {statuses})"


def run(cfg) -> dict:
    """Read the configured source into ``cfg.paths.raw`` and summarise what was kept or skipped."""
    timer = Timer()
    kind = str(cfg.source.kind)
    sources = _sources()
    if kind not in sources:
        raise PipelineError(f"source kind {kind!r} is not implemented by ingest (available: {', '.join(sources)})")
    stats: dict = {}
    with atomic_dir(Path(cfg.paths.raw)) as tmp:
        writer = ShardWriter(tmp, RAW_SCHEMA, int(cfg.source.rows_per_shard))
        bytes_out = 0
        for row in sources[kind](cfg.source, stats):
            bytes_out += len((row["html"] if row["html"] is not None else row["text"]).encode("utf-8", "replace"))
            writer.write(row)
        shards = writer.close()
        if writer.rows == 0:
            raise PipelineError(_empty_message(kind, stats))
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
            **stats,
        )
    return summary
