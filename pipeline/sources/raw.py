"""TODO docstring."""

from __future__ import annotations

import logging

import os
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
import pyarrow as pa
import pyarrow.parquet as pq

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


class RawShardWriter:
    """``part-NNNNN.parquet`` shards of RAW_SCHEMA, bounded by rows and by content bytes.

    Buffers column lists rather than row dicts: building the Arrow table column-wise is
    several times cheaper per document, which matters when a source yields thousands of
    WARC records per second.
    """

    def __init__(self, out_dir: Path, rows_per_shard: int, max_shard_bytes: int = 0, prefix: str = "part") -> None:
        self.out_dir = Path(out_dir)
        self.prefix = prefix
        self.part_bytes: list[int] = []
        self.rows_per_shard = max(1, int(rows_per_shard))
        self.max_shard_bytes = int(max_shard_bytes or 0)
        self.names = RAW_SCHEMA.names
        self.cols: dict[str, list] = {n: [] for n in self.names}
        self.buffered_rows = 0
        self.buffered_bytes = 0
        self.files: list[dict] = []
        self.rows = 0
        self._executor: ThreadPoolExecutor | None = None
        self._pending: Future | None = None

    def write(self, row: dict, nbytes: int) -> None:
        if self.max_shard_bytes and self.buffered_rows and self.buffered_bytes + nbytes > self.max_shard_bytes:
            self.flush()
        get = row.get
        for name, col in self.cols.items():
            col.append(get(name))
        self.buffered_rows += 1
        self.buffered_bytes += nbytes
        if self.buffered_rows >= self.rows_per_shard:
            self.flush()

    def flush(self) -> None:
        if not self.buffered_rows:
            return
        name = f"{self.prefix}-{len(self.files):05d}.parquet"
        table = pa.Table.from_pydict(self.cols, schema=RAW_SCHEMA)
        # encoding + zstd release the GIL: done on a second thread, they overlap with reading
        # the next shard's records; at most one shard is in flight, so memory stays bounded
        self._wait()
        self._pending = self._pool().submit(pq.write_table, table, self.out_dir / name, compression="zstd")
        self.files.append({"name": name, "rows": self.buffered_rows})
        self.part_bytes.append(self.buffered_bytes)
        self.rows += self.buffered_rows
        self.cols = {n: [] for n in self.names}
        self.buffered_rows = self.buffered_bytes = 0

    def add_part(self, part: ShardPart) -> None:
        """Take over a shard written elsewhere as the next one (after what is buffered)."""
        self.flush()
        self._wait()
        name = f"{self.prefix}-{len(self.files):05d}.parquet"
        os.replace(part.path, self.out_dir / name)
        self.files.append({"name": name, "rows": part.rows, **({"input": part.input} if part.input else {})})
        self.part_bytes.append(part.bytes)
        self.rows += part.rows

    def _pool(self) -> ThreadPoolExecutor:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="parquet")
        return self._executor

    def _wait(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()  # a failed write fails the stage here

    def abort(self) -> None:
        """Stop without writing what is buffered (the stage failed); waits for a write in flight."""
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None
        self._pending = None

    def close(self) -> list[dict]:
        try:
            self.flush()
            self._wait()
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None
        return self.files


def content_bytes(row: dict) -> int:
    content = row["html"] if row.get("html") is not None else row.get("text")
    return len(content.encode("utf-8", "surrogatepass")) if content else 0
