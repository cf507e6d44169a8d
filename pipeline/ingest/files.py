"""Local files as a source: text, Markdown, HTML, JSON Lines and Parquet, in sorted order.

A bad file or line never stops the batch: it is logged with its file (and line), counted
under a reason in ``stats``, and the rest is read.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq

from pipeline.artifacts import doc_id
from pipeline.errors import PipelineError

log = logging.getLogger("pipeline.ingest")

CONTENT_TYPES = {
    ".txt": "text/plain",
    ".md": "text/markdown",
    ".html": "text/html",
    ".htm": "text/html",
    ".jsonl": "text/plain",
    ".parquet": "text/plain",
}
MAX_EXAMPLES = 50  # problem messages kept per reason in the summary


def _has_magic(p: str) -> bool:
    return any(c in p for c in "*?[")


def input_paths(paths) -> list[str]:
    """The configured ``source.paths`` as a list of strings (a single string is accepted)."""
    if isinstance(paths, str):
        return [paths]
    return [str(p) for p in paths]


def resolve_files(paths: list[str]) -> list[Path]:
    """Every file named by the paths (dirs walked, globs expanded), each input's files sorted."""
    files: list[Path] = []
    seen: set[Path] = set()
    for raw in paths:
        given = os.path.abspath(os.path.expanduser(raw))
        if _has_magic(given):
            matches = sorted(glob.glob(given, recursive=True))
            if not matches:
                raise PipelineError(f"input path not found: {raw} (the glob matched nothing)")
            candidates = [Path(m) for m in matches]
        elif os.path.exists(given):
            candidates = [Path(given)]
        else:
            raise PipelineError(f"input path not found: {raw}")
        for c in candidates:
            found = sorted(p for p in c.rglob("*") if p.is_file()) if c.is_dir() else [c]
            for f in found:
                if f not in seen:
                    seen.add(f)
                    files.append(f)
    return files


class _FileProblem(Exception):
    """A whole file cannot be used; ``reason`` is the summary counter it goes under."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class FilesReader:
    """Turns files into raw rows and keeps per-reason counts and example messages."""

    def __init__(self, text_field: str, extensions: list[str], max_file_bytes: int) -> None:
        self.text_field = text_field
        self.extensions = {e.lower() for e in extensions}
        self.max_file_bytes = int(max_file_bytes)
        self.counts: Counter[str] = Counter()
        self.problems: dict[str, list[str]] = {}
        self.bytes_read = 0
        self.files_read = 0
        self.input_hash = hashlib.sha256()

    def problem(self, reason: str, message: str) -> None:
        self.counts[reason] += 1
        examples = self.problems.setdefault(reason, [])
        if len(examples) < MAX_EXAMPLES:
            examples.append(message)
        log.warning("ingest: %s: %s", reason, message)

    def row(self, url: str, content_type: str, text: str | None = None, html: str | None = None) -> dict:
        content = html if html is not None else text
        return {
            "id": doc_id(content),
            "url": url,
            "source": "files",
            "content_type": content_type,
            "http_status": None,
            "html": html,
            "text": text,
        }

    def decode(self, data: bytes, where: str) -> str:
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as e:
            self.problem("invalid_utf8", f"{where}: invalid UTF-8 at byte {e.start}, decoded with U+FFFD replacements")
            return data.decode("utf-8", errors="replace")

    def read(self, path: Path) -> Iterator[dict]:
        ext = path.suffix.lower()
        name = str(path)
        if ext not in self.extensions or ext not in CONTENT_TYPES:
            self.counts["skipped_extension"] += 1
            return
        try:
            size = path.stat().st_size
        except OSError as e:
            self.problem("unreadable", f"{name}: {e.strerror or e}")
            return
        if size > self.max_file_bytes:
            self.problem("skipped_too_large", f"{name}: {size} bytes > max_file_bytes {self.max_file_bytes}")
            return
        self.input_hash.update(name.encode() + b"\0")
        try:
            if ext == ".jsonl":
                yield from self._jsonl(path)
            elif ext == ".parquet":
                yield from self._parquet(path)
            else:
                data = path.read_bytes()
                self.input_hash.update(data)
                self.bytes_read += len(data)
                text = self.decode(data, name)
                if CONTENT_TYPES[ext] == "text/html":
                    yield self.row(name, "text/html", html=text)
                else:
                    yield self.row(name, CONTENT_TYPES[ext], text=text)
        except OSError as e:
            self.problem("unreadable", f"{name}: {e.strerror or e}")
            return
        except _FileProblem as e:
            self.problem(e.reason, str(e))
            return
        self.files_read += 1

    def _field(self, record, where: str) -> str | None:
        if not isinstance(record, dict) or self.text_field not in record or record[self.text_field] is None:
            self.problem("missing_field", f"{where}: no {self.text_field!r} field")
            return None
        value = record[self.text_field]
        if not isinstance(value, str):
            self.problem("bad_field_type", f"{where}: {self.text_field!r} is {type(value).__name__}, not a string")
            return None
        return value

    def _jsonl(self, path: Path) -> Iterator[dict]:
        name = str(path)
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, start=1):
                self.input_hash.update(raw)
                self.bytes_read += len(raw)
                where = f"{name}:{lineno}"
                line = self.decode(raw, where).strip()
                if not line:
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    self.problem("bad_json", f"{where}: {e.msg} (column {e.colno})")
                    continue
                if (text := self._field(record, where)) is not None:
                    yield self.row(f"{name}#L{lineno}", "text/plain", text=text)

    def _parquet(self, path: Path) -> Iterator[dict]:
        name = str(path)
        try:
            pf = pq.ParquetFile(path)
        except Exception as e:  # noqa: BLE001 - arrow raises several types for a corrupt file
            raise _FileProblem("unreadable", f"{name}: not a readable Parquet file ({type(e).__name__}: {e})") from e
        if self.text_field not in pf.schema_arrow.names:
            raise _FileProblem("missing_field", f"{name}: no {self.text_field!r} column (has {pf.schema_arrow.names})")
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                self.input_hash.update(block)
                self.bytes_read += len(block)
        row = 0
        batches = pf.iter_batches(batch_size=1024, columns=[self.text_field])
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                break
            except Exception as e:  # noqa: BLE001 - a corrupt row group: keep the rows already read
                raise _FileProblem("unreadable", f"{name}#row{row}: unreadable from here on ({e})") from e
            for value in batch.column(0).to_pylist():
                where = f"{name}#row{row}"
                if value is None:
                    self.problem("missing_field", f"{where}: {self.text_field!r} is null")
                elif not isinstance(value, str):
                    kind = type(value).__name__
                    self.problem("bad_field_type", f"{where}: {self.text_field!r} is {kind}, not a string")
                else:
                    yield self.row(where, "text/plain", text=value)
                row += 1


def documents(source, stats: dict) -> Iterator[dict]:
    """Read every configured file in sorted order; counts and problems go into ``stats``."""
    from omegaconf import OmegaConf

    if OmegaConf.is_missing(source, "paths") or not source.paths:
        raise PipelineError("source=files needs source.paths, e.g. source.paths='[/data/corpus]'")
    paths = input_paths(source.paths)
    files = resolve_files(paths)
    reader = FilesReader(str(source.text_field), list(source.extensions), int(source.max_file_bytes))
    try:
        for path in files:
            yield from reader.read(path)
    finally:
        stats["input_paths"] = paths
        stats["files_found"] = len(files)
        stats["files_read"] = reader.files_read
        stats["bytes_read"] = reader.bytes_read
        stats["input_sha256"] = reader.input_hash.hexdigest()
        stats["problems"] = dict(sorted(reader.counts.items()))
        stats["problem_examples"] = dict(sorted(reader.problems.items()))
