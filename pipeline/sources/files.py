"""Local files as a source: txt, md, html, json, jsonl, parquet and csv, in sorted order.

A bad file or line never stops the batch: it is logged with its file (and line or row),
counted under a status, and the rest is read. Text is decoded by
:func:`pipeline.sources.decode.decode_bytes`: declared or detected encodings are used, and
invalid UTF-8 is replaced and counted.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import io
import json
import os
import stat
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq

from pipeline.core.artifacts import doc_id
from pipeline.core.errors import PipelineError
from pipeline.sources.decode import decode_bytes

CONTENT_TYPES = {
    ".txt": "text/plain",
    ".md": "text/markdown",
    ".html": "text/html",
    ".htm": "text/html",
    ".json": "text/plain",
    ".jsonl": "text/plain",
    ".parquet": "text/plain",
    ".csv": "text/plain",
}


# Pickle-based files are never loaded (unpickling runs arbitrary code), and one put among the inputs
# is refused with a message rather than silently skipped: .pkl/.pickle/.joblib by name, torch's
# .pt/.pth/.bin/.ckpt when they hold a pickle (protocol header or torch's zip), any other file
# (.txt, .jsonl, ...) when it starts with a pickle protocol header.
PICKLE_SUFFIXES = (".pkl", ".pickle", ".joblib")
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
_PICKLE_MAGIC = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")


def pickle_reason(path: Path, head: bytes) -> str | None:
    """Why ``path`` (whose first bytes are ``head``) is a pickle, or None."""
    ext = path.suffix.lower()
    if ext in PICKLE_SUFFIXES:
        return f"a pickle file ({ext})"
    if head[:2] in _PICKLE_MAGIC:
        return "starts with a pickle protocol header"
    if ext in TORCH_SUFFIXES and head[:4] == b"PK\x03\x04":
        return f"a torch/zip pickle archive ({ext})"
    return None
SINGLE_DOC = {".txt", ".md", ".html", ".htm"}  # the whole file is one document (unless split, below)
SPLITTABLE = {".txt", ".md"}  # plain text cut into documents at blank lines (source.split_text)
STREAMED = {".jsonl", ".parquet"}  # read record by record: no cap on the file, only on each record
SPLIT_MODES = ("auto", "paragraphs", "none")


def _has_magic(p: str) -> bool:
    return any(c in p for c in "*?[")


def input_paths(paths) -> list[str]:
    """The configured ``source.paths`` as a list of strings (a single string is accepted)."""
    if isinstance(paths, str):
        return [paths]
    return [str(p) for p in paths]


def _glob_root(pattern: str) -> str:
    """The directory a glob cannot leave: its components before the first wildcard."""
    parts = Path(pattern).parts
    keep = []
    for part in parts:
        if _has_magic(part):
            break
        keep.append(part)
    return os.path.join(*keep) if keep else os.sep


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _walk(top: Path, follow_links: bool, links: list[str] | None) -> list[Path]:
    """Files (and dangling links, to be reported) under ``top``, sorted. A link to a directory
    is walked only when ``follow_links``, each real directory once (so a link loop ends);
    otherwise it is named in ``links``: a folder of links must not read as an empty corpus."""
    out: list[Path] = []
    visited: set[str] = set()

    def visit(d: Path) -> None:
        real = os.path.realpath(d)
        if real in visited:
            return
        visited.add(real)
        for e in sorted(os.scandir(d), key=lambda e: e.name):
            p = Path(e.path)
            try:
                is_dir = e.is_dir()  # follows the link, if it is one
            except OSError:  # a link loop: listed below as a file, so that reading it reports it
                is_dir = False
            if is_dir:
                if e.is_symlink() and not follow_links:
                    if links is not None:
                        links.append(f"{p}: a link to the directory {os.path.realpath(p)}; not followed "
                                     f"(source.allow_outside_root=true follows directory links)")
                    continue
                visit(p)
            elif e.is_symlink() or e.is_file():  # a dangling or looping link too: reported when read
                out.append(p)

    visit(top)
    return sorted(out)


def resolve_files(paths: list[str], refused: list[str] | None = None, allow_outside: bool = False,
                  links: list[str] | None = None) -> list[Path]:
    """Every file named by the paths (dirs walked, globs expanded), each input's files sorted.

    A file found by walking a directory or expanding a glob must resolve inside that
    directory (the glob's fixed prefix): a symlink out of it (``-> /etc/passwd``, ``-> ../..``)
    is left out and described in ``refused``. A file reached twice (two links, a glob through
    a symlinked directory loop) is read once. Files named explicitly are taken as given.
    ``allow_outside`` (``source.allow_outside_root``) follows links anywhere, for trusted trees
    built of links (a Hugging Face hub snapshot, git-annex), directory links included; without
    it a directory link is not walked and is described in ``links``.
    """
    files: list[Path] = []
    seen: set[str] = set()
    for raw in paths:
        given = os.path.abspath(os.path.expanduser(raw))
        if _has_magic(given):
            matches = sorted(glob.glob(given, recursive=True))
            if not matches:
                raise PipelineError(f"input path not found: {raw} (the glob matched nothing)")
            candidates = [Path(m) for m in matches]
            root = os.path.realpath(_glob_root(given))
        elif os.path.exists(given):
            candidates = [Path(given)]
            root = os.path.realpath(given) if os.path.isdir(given) else None
        else:
            raise PipelineError(f"input path not found: {raw}")
        for c in candidates:
            # a dangling link is listed too, so that it is reported rather than silently missed
            walked = c.is_dir()
            found = _walk(c, allow_outside, links) if walked else [c]
            for f in found:
                real = os.path.realpath(f)  # never raises, even on a symlink loop
                if root is not None and not allow_outside and not _inside(real, root):
                    if refused is not None:
                        refused.append(f"{f}: resolves to {real}, outside the input root {root}; not read "
                                       f"(source.allow_outside_root=true follows such links)")
                    continue
                if real not in seen:
                    seen.add(real)
                    files.append(f)
    return files


class _FileProblem(Exception):
    """A whole file cannot be used; ``status`` is the summary counter it goes under."""

    def __init__(self, status: str, message: str) -> None:
        super().__init__(message)
        self.status = status


class FilesReader:
    """Turns files into raw rows; problems and repairs go to the ingest context."""

    def __init__(self, ctx, text_field: str, extensions: list[str], max_file_bytes: int, encoding: str = "auto",
                 max_doc_bytes: int = 10_000_000, split_text: str = "auto", doc_bytes: int = 16_000) -> None:
        if split_text not in SPLIT_MODES:
            raise PipelineError(f"source.split_text={split_text!r}: expected one of {', '.join(SPLIT_MODES)}")
        self.split_text = split_text
        self.doc_bytes = max(1, int(doc_bytes))
        self.ctx = ctx
        self.max_doc_bytes = int(max_doc_bytes)  # one document (a .txt/.html file, a JSONL line)
        self.text_field = text_field
        self.extensions = {e.lower() for e in extensions}
        self.max_file_bytes = int(max_file_bytes)
        self.encoding = None if encoding in (None, "", "auto") else encoding
        self.bytes_read = 0
        self.files_read = 0
        self.input_hash = hashlib.sha256()
        self.repairs: Counter[str] = Counter()
        self.repair_examples: list[str] = []
        self.encodings: Counter[str] = Counter()

    def row(self, url: str, content_type: str, name: str, text: str | None = None, html: str | None = None,
            offset: int | None = None) -> dict | None:
        """The raw row, or None (counted) when the document is over max_doc_bytes (a huge CSV cell,
        JSON string or Parquet value)."""
        content = html if html is not None else text
        nbytes = len(content.encode("utf-8", "surrogatepass"))
        if nbytes > self.max_doc_bytes:
            self.ctx.problem("skipped_too_large", f"{url}: {nbytes} bytes > max_doc_bytes {self.max_doc_bytes}", nbytes)
            return None
        self.ctx.count("read", nbytes)
        return {
            "id": doc_id(content),
            "url": url,
            "source": "files",
            "content_type": content_type,
            "http_status": None,
            "html": html,
            "text": text,
            "source_file": name,
            "source_offset": offset,
        }

    def decode(self, data: bytes, where: str, html: bool = False) -> str:
        text, enc, replaced = decode_bytes(data, self.encoding, html=html)
        if replaced:
            self.repairs["invalid_utf8_replaced"] += 1
            if len(self.repair_examples) < 50:
                self.repair_examples.append(f"{where}: invalid {enc} bytes replaced with U+FFFD")
        elif enc not in ("utf-8", "ascii"):
            self.encodings[enc] += 1
        return text

    def read(self, path: Path) -> Iterator[dict]:
        for row in self._read(path):
            if row is not None:
                yield row

    def _read(self, path: Path) -> Iterator[dict | None]:
        ext = path.suffix.lower()
        name = str(path)
        try:
            mode = path.stat().st_mode
            if not stat.S_ISREG(mode):  # a FIFO or /dev/zero would block or never end
                self.ctx.problem("skipped_not_regular_file", f"{name}: not a regular file (a FIFO, device or "
                                 f"socket); not read")
                return
            with open(path, "rb") as f:
                head = f.read(4)
        except OSError as e:
            self.ctx.problem("error_unreadable", f"{name}: {e.strerror or e}")
            return
        if ext != ".parquet" and (why := pickle_reason(path, head)):
            self.ctx.problem("skipped_pickle", f"{name}: {why}; pickles are never loaded (they can run code)")
            return
        if ext not in self.extensions or ext not in CONTENT_TYPES:
            self.ctx.count("skipped_extension")
            return
        try:
            size = path.stat().st_size
        except OSError as e:
            self.ctx.problem("error_unreadable", f"{name}: {e.strerror or e}")
            return
        split = ext in SPLITTABLE and (self.split_text == "paragraphs" or
                                       (self.split_text == "auto" and size > self.doc_bytes))
        if size > self.max_file_bytes and ext not in STREAMED and not split:
            self.ctx.problem("skipped_too_large", f"{name}: {size} bytes > max_file_bytes {self.max_file_bytes}", size)
            return
        if ext in SINGLE_DOC and not split and size > self.max_doc_bytes:
            self.ctx.problem("skipped_too_large", f"{name}: {size} bytes > max_doc_bytes {self.max_doc_bytes}", size)
            return
        self.input_hash.update(name.encode() + b"\0")
        try:
            if split:
                yield from self._paragraphs(path, CONTENT_TYPES[ext])
            elif ext == ".jsonl":
                yield from self._jsonl(path)
            elif ext == ".parquet":
                yield from self._parquet(path)
            else:
                data = path.read_bytes()
                self.input_hash.update(data)
                self.bytes_read += len(data)
                if ext == ".json":
                    yield from self._json(data, name)
                elif ext == ".csv":
                    yield from self._csv(data, name)
                elif CONTENT_TYPES[ext] == "text/html":
                    yield self.row(name, "text/html", name, html=self.decode(data, name, html=True))
                else:
                    yield self.row(name, CONTENT_TYPES[ext], name, text=self.decode(data, name))
        except OSError as e:
            self.ctx.problem("error_unreadable", f"{name}: {e.strerror or e}")
            return
        except _FileProblem as e:
            self.ctx.problem(e.status, str(e))
            return
        self.files_read += 1

    def _paragraphs(self, path: Path, content_type: str) -> Iterator[dict]:
        """A long text file (a book, a corpus in one file) as documents of about `doc_bytes`:
        cut at a blank line once that size is reached (at any line past 4x it), streamed line by
        line, so neither the file nor a line longer than `max_doc_bytes` is ever held whole."""
        name, cap = str(path), self.max_doc_bytes
        buf: list[bytes] = []
        size = start = offset = 0

        def flush():
            data = b"".join(buf)
            if data.strip():
                return self.row(f"{name}@{start}", content_type, name, text=self.decode(data, f"{name}@{start}"),
                                offset=start)
            return None

        with open(path, "rb") as f:
            while line := f.readline(cap + 1):
                self.input_hash.update(line)
                self.bytes_read += len(line)
                if len(line) > cap and not line.endswith(b"\n"):  # a line longer than a document may be
                    n = len(line)
                    while more := f.readline(cap + 1):  # the rest of the line, a bounded piece at a time
                        n += len(more)
                        self.input_hash.update(more)
                        self.bytes_read += len(more)
                        if more.endswith(b"\n"):
                            break
                    if (row := flush()) is not None:
                        yield row
                    self.ctx.problem("skipped_too_large", f"{name}@{offset}: line of {n} bytes > max_doc_bytes {cap}", n)
                    offset += n
                    buf, size, start = [], 0, offset
                    continue
                buf.append(line)
                size += len(line)
                offset += len(line)
                if (size >= self.doc_bytes and not line.strip()) or size >= 4 * self.doc_bytes:
                    if (row := flush()) is not None:
                        yield row
                    buf, size, start = [], 0, offset
        if (row := flush()) is not None:
            yield row

    def _field(self, record, where: str) -> str | None:
        if not isinstance(record, dict) or record.get(self.text_field) is None:
            self.ctx.problem("skipped_missing_field", f"{where}: no {self.text_field!r} field")
            return None
        value = record[self.text_field]
        if not isinstance(value, str):
            kind = type(value).__name__
            self.ctx.problem("skipped_bad_field_type", f"{where}: {self.text_field!r} is {kind}, not a string")
            return None
        return value

    def _jsonl(self, path: Path) -> Iterator[dict]:
        name = str(path)
        offset = 0
        cap = self.max_doc_bytes
        with open(path, "rb") as f:
            lineno = 0
            # readline with a limit: a 100 MB line is skipped in bounded chunks, never held whole
            while raw := f.readline(cap + 1):
                lineno += 1
                start, offset = offset, offset + len(raw)
                self.input_hash.update(raw)
                self.bytes_read += len(raw)
                where = f"{name}:{lineno}"
                if len(raw) > cap and not raw.endswith(b"\n"):
                    while (rest := f.readline(1 << 20)) and not rest.endswith(b"\n"):
                        offset += len(rest)
                        self.input_hash.update(rest)
                    offset += len(rest)
                    self.input_hash.update(rest)
                    self.bytes_read += offset - start - len(raw)
                    self.ctx.problem("skipped_too_large", f"{where}: line of {offset - start} bytes > max_doc_bytes {cap}",
                                     offset - start)
                    continue
                line = self.decode(raw, where).strip()
                if not line:
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    self.ctx.problem("error_bad_json", f"{where}: {e.msg} (column {e.colno})")
                    continue
                if (text := self._field(record, where)) is not None:
                    yield self.row(f"{name}#L{lineno}", "text/plain", name, text=text, offset=start)

    def _json(self, data: bytes, name: str) -> Iterator[dict]:
        """A JSON object with the text field, or an array of such objects (or of strings)."""
        try:
            doc = json.loads(self.decode(data, name))
        except json.JSONDecodeError as e:
            raise _FileProblem("error_bad_json", f"{name}:{e.lineno}: {e.msg} (column {e.colno})") from e
        items = doc if isinstance(doc, list) else [doc]
        for i, item in enumerate(items):
            where = f"{name}#{i}" if isinstance(doc, list) else name
            text = item if isinstance(item, str) else self._field(item, where)
            if text is not None:
                yield self.row(where, "text/plain", name, text=text)

    def _csv(self, data: bytes, name: str) -> Iterator[dict]:
        csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
        reader = csv.DictReader(io.StringIO(self.decode(data, name), newline=""))
        if reader.fieldnames is None or self.text_field not in reader.fieldnames:
            raise _FileProblem("skipped_missing_field", f"{name}: no {self.text_field!r} column (has {reader.fieldnames})")
        i = 0
        while True:
            try:
                record = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                raise _FileProblem("error_bad_csv", f"{name}#row{i}: {e}; the rest of the file is skipped") from e
            where = f"{name}#row{i}"
            if (text := self._field(record, where)) is not None and text != "":
                yield self.row(where, "text/plain", name, text=text)
            i += 1

    def _parquet(self, path: Path) -> Iterator[dict]:
        name = str(path)
        try:
            pf = pq.ParquetFile(path)
        except Exception as e:  # noqa: BLE001 - arrow raises several types for a corrupt file
            raise _FileProblem("error_unreadable", f"{name}: not a readable Parquet file ({type(e).__name__}: {e})") from e
        if self.text_field not in pf.schema_arrow.names:
            raise _FileProblem(
                "skipped_missing_field", f"{name}: no {self.text_field!r} column (has {pf.schema_arrow.names})"
            )
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                self.input_hash.update(block)
                self.bytes_read += len(block)
        row = 0
        batches = parquet_batches(pf, [self.text_field])
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                break
            except Exception as e:  # noqa: BLE001 - a corrupt row group: keep the rows already read
                raise _FileProblem("error_unreadable", f"{name}#row{row}: unreadable from here on ({e})") from e
            for value in batch.column(0).to_pylist():
                where = f"{name}#row{row}"
                if value is None:
                    self.ctx.problem("skipped_missing_field", f"{where}: {self.text_field!r} is null")
                elif not isinstance(value, str):
                    kind = type(value).__name__
                    self.ctx.problem("skipped_bad_field_type", f"{where}: {self.text_field!r} is {kind}, not a string")
                else:
                    yield self.row(where, "text/plain", name, text=value)
                row += 1


def parquet_batches(pf: pq.ParquetFile, columns: list[str] | None, batch_rows: int = 1024) -> Iterator:
    """A Parquet file's rows in record batches, one row group at a time: a single reader over
    all row groups keeps what it has read allocated until the end (about the file's size)."""
    for group in range(pf.num_row_groups):
        yield from pf.iter_batches(batch_size=batch_rows, row_groups=[group], columns=columns)


def source_files(source, ctx, kind: str, example: str) -> tuple[list[str], list]:
    """(configured paths, the files they name) for a file-based source; links out of the input
    roots are refused and counted unless ``source.allow_outside_root``."""
    from omegaconf import OmegaConf

    if OmegaConf.is_missing(source, "paths") or not source.paths:
        raise PipelineError(f"source={kind} needs source.paths, e.g. source.paths='[{example}]'")
    paths = input_paths(source.paths)
    refused: list[str] = []
    links: list[str] = []
    files = resolve_files(paths, refused, bool(source.get("allow_outside_root", False)), links)
    for message in refused:
        ctx.problem("skipped_outside_root", message)
    for message in links:
        ctx.problem("skipped_directory_link", message)
    return paths, files


def documents(source, ctx) -> Iterator[dict]:
    """Read every configured file in sorted order; counts and problems go into ``ctx``."""
    paths, files = source_files(source, ctx, "files", "/data/corpus")
    reader = FilesReader(
        ctx, str(source.text_field), list(source.extensions), int(source.max_file_bytes), str(source.get("encoding", "auto")),
        int(source.get("max_doc_bytes", 10_000_000)), str(source.get("split_text", "auto")),
        int(source.get("doc_bytes", 16_000)),
    )
    try:
        for path in files:
            yield from reader.read(path)
    finally:
        ctx.extra.update(
            input_paths=paths,
            files_found=len(files),
            files_read=reader.files_read,
            bytes_read=reader.bytes_read,
            input_sha256=reader.input_hash.hexdigest(),
            repairs=dict(sorted(reader.repairs.items())),
            repair_examples=reader.repair_examples,
            encodings_detected=dict(sorted(reader.encodings.items())),
        )
