"""WARC with warcio: the crawler's archive writer and a fault-tolerant record reader.

Reading resynchronises after damage: a corrupt gzip member or malformed record is reported
with its file and byte offset, counted, and reading goes on from the next record that
parses (for .gz files the next gzip member that starts with a WARC header), so one bad
record never costs the rest of a multi-gigabyte file.
"""

from __future__ import annotations

import io
import logging
import os
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from warcio.archiveiterator import ArchiveIterator
from warcio.bufferedreaders import (
    BufferedReader,
    ChunkedDataException,
    ChunkedDataReader,
)
from warcio.exceptions import ArchiveLoadFailed
from warcio.limitreader import LimitReader
from warcio.statusandheaders import StatusAndHeaders
from warcio.warcwriter import WARCWriter

log = logging.getLogger("pipeline.stages.ingest")

# A WARC or HTTP header line longer than this is damage, not a header: warcio would otherwise
# read a "line" of a hostile member (a gzip bomb of zeros has no newline) whole into memory.
MAX_HEADER_LINE = 1 << 16
MAX_HTTP_HEADER_BYTES = 1 << 20

# hop-by-hop or re-encoded headers: the stored body is the decoded one, so its length rules
_DROP_HEADERS = {"transfer-encoding", "content-encoding", "content-length"}


class WarcArchive:
    """Appends response records to ``directory/name`` (gzip, one member per record).

    ``truncate_to`` cuts a file back to the last record the crawl state committed, so a run
    resumed after SIGKILL continues the same archive without a half-written record.

    Until :meth:`finish` (the stage succeeded) the file is ``.<name>.partial``: an archive cut
    short by a killed run is never visible under a finished archive's name (nor matched by a
    ``*.warc.gz`` glob a replay would use).
    """

    def __init__(self, directory: Path, name: str, truncate_to: int | None = None, info: dict | None = None) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.path = self.directory / name
        self.partial = self.directory / f".{name}.partial"
        if truncate_to is not None and self.partial.exists():
            with open(self.partial, "r+b") as f:
                f.truncate(truncate_to)
        self.f = open(self.partial, "ab")
        self.writer = WARCWriter(self.f, gzip=True)
        self.records = 0
        if self.f.tell() == 0:
            self.writer.write_record(self.writer.create_warcinfo_record(name, info or {"software": "pipeline"}))
            self.f.flush()

    def write_response(self, url: str, fetch) -> None:
        body = fetch.body or b""
        headers = [(k, v) for k, v in fetch.headers if k.lower() not in _DROP_HEADERS]
        headers.append(("Content-Length", str(len(body))))
        status = f"{fetch.http_status} {fetch.reason}".strip()
        http_headers = StatusAndHeaders(status, headers, protocol=fetch.http_version or "HTTP/1.1")
        record = self.writer.create_warc_record(
            url, "response", payload=io.BytesIO(body), length=len(body), http_headers=http_headers
        )
        self.writer.write_record(record)
        self.f.flush()  # a killed process loses nothing the state has committed
        self.records += 1

    def position(self) -> dict:
        return {"name": self.name, "end": self.f.tell()}

    def close(self) -> None:
        self.f.close()

    def finish(self) -> None:
        """Publish the archive under its final name (the run that wrote it succeeded)."""
        self.close()
        if self.partial.exists():
            os.replace(self.partial, self.path)


# ---------------------------------------------------------------- reading


@dataclass
class Record:
    offset: int
    rec_type: str
    record_id: str | None
    target_uri: str | None
    http_status: int | None
    content_type: str  # of the payload: HTTP Content-Type for responses, WARC Content-Type otherwise
    payload: bytes | None  # None when not read (too large)
    length: int  # payload length, or the declared block length when not read


@dataclass
class Damage:
    offset: int
    kind: str  # "malformed_record" | "truncated"
    message: str


def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == b"\x1f\x8b"


def _next_record_start(fh, start: int, gz: bool) -> int | None:
    """Offset of the next plausible record after ``start``: a gzip member (or a line) opening with WARC/."""
    fh.seek(start)
    window = 1 << 20
    pos = start
    carry = b""
    while True:
        block = fh.read(window)
        if not block:
            return None
        data = carry + block
        base = pos - len(carry)
        needle = b"\x1f\x8b\x08" if gz else b"\nWARC/1."
        i = data.find(needle)
        while i != -1:
            cand = base + i + (0 if gz else 1)
            if cand > start:
                if not gz:
                    return cand
                fh.seek(cand)
                head = fh.read(8192)
                try:
                    if zlib.decompressobj(wbits=31).decompress(head)[:6].startswith(b"WARC/"):
                        return cand
                except zlib.error:
                    pass
                fh.seek(base + len(data))
            i = data.find(needle, i + 1)
        carry = data[-8:]
        pos = base + len(data)


def iter_records(path: Path, max_payload: int, wanted: set[str]) -> Iterator[Record | Damage]:
    """Every record of one WARC/WET file, plain or gzip; damage is yielded, not raised."""
    path = Path(path)
    gz = _is_gzip(path)
    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        pos = 0
        while pos < size:
            fh.seek(pos)
            # no_record_parse: HTTP headers are parsed only for the records we keep (_record),
            # not for every request/metadata record as warcio would by default
            it = ArchiveIterator(fh, no_record_parse=True)
            _cap_readline(it.reader)
            try:
                for rec in it:
                    yield _record(it, rec, max_payload, wanted)
                if it.offset >= size:
                    return
                # warcio stops quietly at a cut gzip member: what is left was never a record
                bad = it.offset
                yield Damage(bad, "truncated", f"{path}@{bad}: {size - bad} trailing bytes are not a complete "
                                               f"record (truncated file or gzip member)")
            except (ArchiveLoadFailed, zlib.error, EOFError, ValueError, OSError) as e:
                bad = it.offset
                msg = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
                yield Damage(bad, "malformed_record", f"{path}@{bad}: unreadable record ({type(e).__name__}: {msg})")
            except _Damaged as t:
                yield Damage(t.offset, t.kind, f"{path}@{t.offset}: {t}")
                bad = t.offset
            nxt = _next_record_start(fh, bad, gz)
            if nxt is None:
                return
            log.info("ingest: %s: resuming at byte %d after damage at %d", path, nxt, bad)
            pos = nxt


_CHUNK_LINE = re.compile(rb"[0-9A-Fa-f]+[ \t]*(;[^\r\n]*)?\r\n")


def _decode_body(raw: bytes, http_headers, max_payload: int, start: int) -> bytes | None:
    """The HTTP body as warcio's ``content_stream()`` gives it (de-chunked, Content-Encoding
    decoded), but capped at ``max_payload`` decoded bytes (None when over) and strict about
    chunk lengths: warcio silently returns chunk framing as content, or a short chunk as if
    complete, when a length is wrong. A body not chunked at all despite its header (crawlers
    often store it de-chunked) is still read as it is."""
    encoding = (http_headers.get_header("content-encoding") or "").lower() if http_headers else ""
    if encoding not in BufferedReader.get_supported_decompressors():
        encoding = None
    chunked = http_headers is not None and http_headers.get_header("transfer-encoding") == "chunked"
    if chunked and _CHUNK_LINE.match(raw):
        try:
            return _capped(ChunkedDataReader(io.BytesIO(raw), raise_exceptions=True, decomp_type=encoding), max_payload)
        except ChunkedDataException as e:
            msg = e.args[0].decode("latin-1", "replace") if isinstance(e.args[0], bytes) else str(e.args[0])
            msg = " ".join(msg.split())[:80]
            raise _Damaged("bad_chunk_length", start, f"chunked HTTP body with a wrong chunk length ({msg})") from e
    if encoding:
        return _capped(BufferedReader(io.BytesIO(raw), decomp_type=encoding), max_payload)
    return raw


def _capped(stream, max_payload: int) -> bytes | None:
    data = stream.read(max_payload + 1)
    return None if len(data) > max_payload else data


def _cap_readline(reader) -> None:
    """Bound every line warcio reads from this reader (per instance, warcio itself untouched)."""
    readline = reader.readline

    def capped(length=None):
        return readline(MAX_HEADER_LINE if not length or length < 0 else min(length, MAX_HEADER_LINE))

    reader.readline = capped


class _Damaged(Exception):
    def __init__(self, kind: str, offset: int, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.offset = offset


def _record(it: ArchiveIterator, rec, max_payload: int, wanted: set[str]) -> Record:
    start = it.offset
    if not str(rec.format).startswith("warc"):  # warcio reads junk as an ARC record rather than fail
        raise _Damaged("malformed_record", start, f"not a WARC record (parsed as {rec.format})")
    h = {k.lower(): v for k, v in rec.rec_headers.headers}  # one pass instead of a scan per header
    rec_type = rec.rec_type
    status = None
    ctype = h.get("content-type") or ""
    uri = h.get("warc-target-uri")
    payload = None
    length = rec.length or 0
    if rec_type in wanted:
        if rec_type == "response":
            try:
                # at most MAX_HTTP_HEADER_BYTES of headers: a block without a blank line is not read whole
                head = LimitReader(rec.raw_stream, MAX_HTTP_HEADER_BYTES)
                rec.http_headers = it.loader.load_http_headers(rec_type, uri or "", head, rec.length)
            except (EOFError, ValueError) as e:
                raise _Damaged("malformed_record", start, f"bad HTTP headers in response record ({e})") from e
            if rec.http_headers is not None:
                try:
                    status = int(rec.http_headers.get_statuscode())
                except (TypeError, ValueError):
                    status = None
                ctype = rec.http_headers.get_header("Content-Type") or ""
                length = getattr(rec.raw_stream, "limit", length)  # what is left after the headers
        if length <= max_payload:
            raw = rec.raw_stream.read()
            if rec.raw_stream.limit > 0:  # the block ended before its Content-Length: a cut file
                missing = rec.raw_stream.limit
                raise _Damaged("truncated", start, f"record truncated ({missing} of {rec.length} bytes missing)")
            payload = _decode_body(raw, rec.http_headers, max_payload, start)
            # None: the decoded payload is over the cap (a small gzip body can inflate to gigabytes)
            length = max_payload + 1 if payload is None else len(payload)
    errors = it.err_count
    it.read_to_end()
    if it.err_count > errors:  # warcio found junk where the next record should start
        raise _Damaged("bad_length", start, f"{rec_type} record followed by junk: its Content-Length is wrong; not used")
    return Record(it.get_record_offset(), rec_type, h.get("warc-record-id"), uri, status, ctype, payload, length)
