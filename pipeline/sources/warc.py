"""The ``warc`` source: WARC and WET files (plain or gzip, one or a glob of many), streamed.

Response, resource and conversion (WET) records become documents; every other record is
counted by type. Each row keeps its provenance: file, byte offset, record id, target URI
(``url``), HTTP status and content type. Damage (a malformed record, a truncated gzip
member) is counted with its file and offset, and reading resumes at the next record.
"""

from __future__ import annotations

import re

from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit


from pipeline.core.artifacts import doc_id
from pipeline.sources.decode import decode_bytes
from pipeline.sources.files import source_files
from pipeline.sources.warc_io import Damage, iter_records

HTML_TYPES = {"text/html", "application/xhtml+xml"}
DOC_RECORDS = {"response", "resource", "conversion"}


def _charset(content_type: str) -> str | None:
    for part in content_type.split(";")[1:]:
        key, _, value = part.partition("=")
        if key.strip().lower() == "charset":
            return value.strip().strip("\"'") or None
    return None


_BAD_URI_CHAR = re.compile(r"[\x00-\x20\s]")  # whitespace or a control character anywhere


def _bad_uri(uri: str, rec_type: str) -> str | None:
    """Why a target URI cannot be a document's URL, or None: it must parse, have a scheme,
    and a response (an HTTP exchange) must be http(s) with a host."""
    try:
        parts = urlsplit(uri)
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError as e:
        return f"does not parse ({e})"
    if not parts.scheme or _BAD_URI_CHAR.search(uri):
        return "is not an absolute URI"
    if rec_type == "response" and (parts.scheme.lower() not in ("http", "https") or not parts.hostname):
        return "is not an http(s) URL with a host"
    return None


def read_file(path, ctx, content_types: set[str], max_record_bytes: int, statuses: set[int]) -> Iterator[dict]:
    name = str(path)
    for rec in iter_records(path, max_record_bytes, DOC_RECORDS):
        if isinstance(rec, Damage):
            ctx.problem(f"error_{rec.kind}", rec.message)
            continue
        if rec.rec_type not in DOC_RECORDS:
            ctx.count(f"skipped_{rec.rec_type}")
            continue
        ctype = rec.content_type
        mime = ctype.split(";", 1)[0].strip().lower() if ctype else ("text/plain" if rec.rec_type == "conversion" else "")
        if rec.payload is None:
            ctx.problem("skipped_too_large", f"{name}@{rec.offset}: {rec.length} bytes > max_record_bytes "
                        f"{max_record_bytes}", rec.length)
            continue
        if not rec.target_uri:
            ctx.problem("skipped_no_target_uri", f"{name}@{rec.offset}: {rec.rec_type} record without WARC-Target-URI")
            continue
        if why := _bad_uri(rec.target_uri, rec.rec_type):
            ctx.problem("skipped_bad_target_uri", f"{name}@{rec.offset}: WARC-Target-URI {rec.target_uri[:200]!r} {why}")
            continue
        if rec.rec_type == "response" and rec.http_status not in statuses:
            ctx.count("skipped_http_status", rec.length)
            continue
        if mime not in content_types:
            ctx.count("skipped_content_type", rec.length)
            continue
        is_html = mime in HTML_TYPES
        text, _enc, replaced = decode_bytes(rec.payload, _charset(ctype) if ";" in ctype else None, html=is_html)
        if replaced:
            ctx.count("repaired_invalid_utf8", n=1)
        ctx.count("read", rec.length)
        yield {
            "id": doc_id(text),
            "url": rec.target_uri,
            "source": "warc",
            "content_type": rec.content_type or mime,
            "http_status": rec.http_status,
            "html": text if is_html else None,
            "text": None if is_html else text,
            "source_file": name,
            "source_offset": rec.offset,
            "warc_record_id": rec.record_id,
            "warc_type": rec.rec_type,
        }


def ingest_file(task: dict) -> dict:
    """One input file -> Parquet parts under the work dir, plus its counts (runs in a worker)."""
    from pipeline.sources.raw import IngestContext, RawShardWriter, content_bytes

    path = Path(task["path"])
    ctx = IngestContext("warc", Path("."))
    work = Path(task["work"])
    work.mkdir(parents=True, exist_ok=True)
    writer = RawShardWriter(work, task["rows_per_shard"], task["max_shard_bytes"], prefix=f"f{task['index']:06d}")
    ok = True
    try:
        for row in read_file(path, ctx, set(task["content_types"]), task["max_record_bytes"], set(task["statuses"])):
            writer.write(row, content_bytes(row))
    except OSError as e:
        ctx.problem("error_unreadable", f"{path}: {e.strerror or e}")
        ok = False
    writer.close()
    parts = [(str(work / f["name"]), f["rows"], b) for f, b in zip(writer.files, writer.part_bytes, strict=True)]
    return {"path": str(path), "parts": parts, "docs": dict(ctx.docs), "bytes": dict(ctx.bytes), "examples": ctx.examples, "ok": ok}


def documents(source, ctx) -> Iterator:
    """Fan out over the files (``executor`` config); shards come back in file order and never
    span two input files, so the output is the same whatever the number of workers."""
    from pipeline.sources.raw import file_shards

    paths, files = source_files(source, ctx, "warc", "/data/cc/*.warc.gz")
    common = {
        "work": str(ctx.work_dir or Path.cwd() / ".warc-work"),
        "content_types": sorted(str(c).lower() for c in source.content_types),
        "statuses": sorted(int(s) for s in source.get("http_statuses", [200])),
        "max_record_bytes": int(source.max_record_bytes),
        "rows_per_shard": int(source.rows_per_shard),
        "max_shard_bytes": int(source.get("max_shard_bytes", 0) or 0),
    }
    tasks = [{**common, "path": str(p), "index": i} for i, p in enumerate(files)]
    ctx.extra.update(input_paths=paths, files_found=len(files), files_read=0)
    yield from file_shards(ingest_file, tasks, ctx)
