"""Parquet shards: the one writer every stage uses, and streaming reads back.

:class:`ShardWriter` writes rows into ``{prefix}-NNNNN.parquet`` files (zstd), numbered
from ``start``. A file is finished when it holds ``rows_per_shard`` rows, or before a row
whose bytes would take it past ``max_shard_bytes``. Within a file, rows go out as one row
group per file, or one every ``row_group_rows`` rows (a file streamed with bounded memory).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

COMPRESSION = "zstd"


class ShardWriter:
    """Rows -> size- and row-bounded Parquet shards ``{prefix}-{start + i:05d}.parquet`` in ``out_dir``.

    * ``rows_per_shard``: rows per file (``None``: one file for everything);
    * ``max_shard_bytes``: a file is finished before the row whose ``nbytes`` (passed to
      :meth:`write`) would take it past this (0: no byte cap; a single larger row still
      gets a file of its own);
    * ``row_group_rows``: write a row group every this many rows instead of one per file;
    * ``keep_empty``: :meth:`close` writes one file without row groups when no row came;
    * ``background``: encoding and compression (which release the GIL) run on a second
      thread, overlapping with producing the next rows; at most one write is in flight.

    Rows are buffered column-wise (cheaper per row than a list of dicts); a key missing
    from a row is null. ``files`` lists ``{"name", "rows"}`` per finished file, ``part_bytes``
    their byte counts, ``rows`` the rows in them.
    """

    def __init__(
        self,
        out_dir: Path,
        schema: pa.Schema,
        rows_per_shard: int | None,
        *,
        max_shard_bytes: int = 0,
        prefix: str = "part",
        start: int = 0,
        row_group_rows: int = 0,
        keep_empty: bool = False,
        background: bool = False,
    ) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.schema = schema
        self.rows_per_shard = None if rows_per_shard is None else max(1, int(rows_per_shard))
        self.max_shard_bytes = int(max_shard_bytes or 0)
        self.prefix = prefix
        self.start = int(start)
        self.row_group_rows = int(row_group_rows or 0)
        self.keep_empty = keep_empty
        self.background = background
        self.files: list[dict] = []
        self.part_bytes: list[int] = []
        self.rows = 0  # in finished files
        self.shard_rows = 0  # in the file being filled (written row groups and buffer)
        self.shard_bytes = 0
        self._cols: dict[str, list] = {n: [] for n in schema.names}
        self._buffered = 0
        self._file: pq.ParquetWriter | None = None  # touched only by _put, one call at a time
        self._executor: ThreadPoolExecutor | None = None
        self._pending: Future | None = None

    @property
    def shard_index(self) -> int:
        """Number of the file the next row goes to (before the byte cap is applied)."""
        return self.start + len(self.files)

    def next_name(self) -> str:
        return f"{self.prefix}-{self.shard_index:05d}.parquet"

    def write(self, row: dict, nbytes: int = 0) -> None:
        if self.max_shard_bytes and self.shard_rows and self.shard_bytes + nbytes > self.max_shard_bytes:
            self.flush()
        get = row.get
        for name, col in self._cols.items():
            col.append(get(name))
        self._buffered += 1
        self.shard_rows += 1
        self.shard_bytes += nbytes
        if self.rows_per_shard is not None and self.shard_rows >= self.rows_per_shard:
            self.flush()
        elif self.row_group_rows and self._buffered >= self.row_group_rows:
            self._write_group(last=False)

    def flush(self) -> None:
        """Finish the current file (nothing when it holds no row)."""
        if not self.shard_rows:
            return
        self._write_group(last=True)
        self._finished(self.next_name(), self.shard_rows, self.shard_bytes)
        self.shard_rows = self.shard_bytes = 0

    def add_file(self, path: Path, rows: int, nbytes: int = 0, **info) -> None:
        """Take over a shard written elsewhere as the next file (after what is buffered)."""
        self.flush()
        self._wait()
        name = self.next_name()
        os.replace(path, self.out_dir / name)
        self._finished(name, rows, nbytes, **info)

    def abort(self) -> None:
        """Stop without writing what is buffered (the stage failed); waits for a write in flight."""
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None
        self._pending = None
        if self._file is not None:
            file, self._file = self._file, None
            with contextlib.suppress(Exception):  # the output is being thrown away
                file.close()

    def close(self) -> list[dict]:
        try:
            self.flush()
            self._wait()
            if self.keep_empty and not self.files:  # a file with the schema and no row group
                self._put(None, self.next_name(), True)
                self._finished(self.next_name(), 0, 0)
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None
        return self.files

    # ------------------------------------------------------------------ internals

    def _finished(self, name: str, rows: int, nbytes: int, **info) -> None:
        self.files.append({"name": name, "rows": rows, **info})
        self.part_bytes.append(nbytes)
        self.rows += rows

    def _write_group(self, last: bool) -> None:
        """The buffered rows as one row group of the current file; ``last`` closes the file."""
        table = pa.Table.from_pydict(self._cols, schema=self.schema) if self._buffered else None
        self._cols = {n: [] for n in self.schema.names}
        self._buffered = 0
        if table is None and not last:
            return
        name = self.next_name()
        if not self.background:
            self._put(table, name, last)
            return
        self._wait()
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="parquet")
        self._pending = self._executor.submit(self._put, table, name, last)

    def _put(self, table: pa.Table | None, name: str, last: bool) -> None:
        if self._file is None:
            self._file = pq.ParquetWriter(self.out_dir / name, self.schema, compression=COMPRESSION)
        if table is not None:
            self._file.write_table(table)
        if last:
            file, self._file = self._file, None
            file.close()

    def _wait(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()  # a failed write fails the stage here


def parquet_files(path: Path) -> list[Path]:
    return sorted(Path(path).glob("*.parquet"))


def iter_rows(path: Path, columns: list[str] | None = None, batch_size: int = 512) -> Iterator[dict]:
    """Stream rows from one Parquet file (or every shard in a directory), in order."""
    files = [Path(path)] if Path(path).is_file() else parquet_files(path)
    for f in files:
        pf = pq.ParquetFile(f)
        for batch in pf.iter_batches(batch_size=batch_size, columns=columns):
            yield from batch.to_pylist()
