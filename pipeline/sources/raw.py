"""Raw documents: the ``data/raw`` schema, what a source reports besides its rows, and the shard writer."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from pipeline.core.parquet import ShardWriter

log = logging.getLogger("pipeline.stages.ingest")


RAW_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("url", pa.string(), nullable=False),  # the WARC target URI for warc, a path#locator for files
        pa.field("source", pa.string(), nullable=False),
        pa.field("content_type", pa.string(), nullable=False),
        pa.field("http_status", pa.int32()),
        pa.field("html", pa.string()),
        pa.field("text", pa.string()),
        # provenance
        pa.field("source_file", pa.string()),  # input file (warc, files) or dataset (hf)
        pa.field("source_offset", pa.int64()),  # byte offset of the WARC record / JSONL line
        pa.field("warc_record_id", pa.string()),
        pa.field("warc_type", pa.string()),  # response | resource | conversion
    ]
)


MAX_EXAMPLES = 50  # problem messages kept per status in the summary


@dataclass
class ShardPart:
    """A shard a worker already wrote (RAW_SCHEMA); ingest renames it into the output in order."""

    path: Path
    rows: int
    bytes: int
    input: str | None = None  # the input file it came from (lineage in the summary)


def file_shards(worker: Callable[[dict], dict], tasks: list[dict], ctx) -> Iterator[ShardPart]:
    """One ``worker`` task per input file on the executor, in file order: each file's counts go
    into ``ctx`` and the shards it wrote are yielded; ``ctx.extra["files_read"]`` grows as files finish."""
    from pipeline.core.executor import map_ordered

    for res in map_ordered(worker, tasks, ctx.executor):
        ctx.merge(res["docs"], res["bytes"], res["examples"])
        ctx.extra["files_read"] = ctx.extra.get("files_read", 0) + res["ok"]
        for path, rows, nbytes in res["parts"]:
            yield ShardPart(Path(path), rows, nbytes, input=res["path"])


class IngestContext:
    """What a source reports besides its rows: per-status counts and bytes, problems, extras.

    ``work_dir`` (inside the stage's temp output) and ``executor`` let a source fan out over
    its inputs with :func:`pipeline.core.executor.map_ordered` and hand back :class:`ShardPart`.
    """

    def __init__(self, kind: str, root: Path, work_dir: Path | None = None, executor=None) -> None:
        self.kind = kind
        self.root = Path(root)
        self.work_dir = Path(work_dir) if work_dir else None
        self.executor = executor if executor is not None else {"kind": "local", "workers": 1}
        self.docs: Counter[str] = Counter()
        self.bytes: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = {}
        self.extra: dict = {}  # more summary fields
        self.on_commit: list[Callable[[], None]] = []  # run once the output is in place
        self.on_close: list[Callable[[], None]] = []  # run at the end, whether the stage succeeded or not

    def count(self, status: str, nbytes: int = 0, n: int = 1) -> None:
        self.docs[status] += n
        if nbytes:
            self.bytes[status] += nbytes

    def problem(self, status: str, message: str, nbytes: int = 0) -> None:
        """Count a problem and keep its message (naming the file and offset) for the summary."""
        self.count(status, nbytes)
        examples = self.examples.setdefault(status, [])
        if len(examples) < MAX_EXAMPLES:
            examples.append(message)
        log.warning("ingest: %s: %s", status, message)

    def merge(self, docs: dict, nbytes: dict, examples: dict) -> None:
        """Fold in what a worker counted."""
        self.docs.update(docs)
        self.bytes.update(nbytes)
        for status, messages in examples.items():
            kept = self.examples.setdefault(status, [])
            kept.extend(messages[: max(0, MAX_EXAMPLES - len(kept))])

    def accounting(self) -> dict:
        return {
            s: {"docs": self.docs[s], "bytes": self.bytes.get(s, 0)} for s in sorted(set(self.docs) | set(self.bytes))
        }


class RawShardWriter(ShardWriter):
    """``part-NNNNN.parquet`` shards of RAW_SCHEMA, bounded by rows and by content bytes.

    Encoding and zstd run on a second thread, overlapping with reading the next shard's
    records (a source may yield thousands of WARC records per second); at most one shard
    is in flight, so memory stays bounded.
    """

    def __init__(self, out_dir: Path, rows_per_shard: int, max_shard_bytes: int = 0, prefix: str = "part") -> None:
        super().__init__(out_dir, RAW_SCHEMA, rows_per_shard, max_shard_bytes=max_shard_bytes, prefix=prefix,
                         background=True)  # fmt: skip

    def add_part(self, part: ShardPart) -> None:
        """Take over a shard written elsewhere as the next one (after what is buffered)."""
        self.add_file(part.path, part.rows, part.bytes, **({"input": part.input} if part.input else {}))


def content_bytes(row: dict) -> int:
    content = row["html"] if row.get("html") is not None else row.get("text")
    return len(content.encode("utf-8", "surrogatepass")) if content else 0
