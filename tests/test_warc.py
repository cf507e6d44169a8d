"""The warc source on WARC and WET files written here with warcio, and on damaged copies."""

from __future__ import annotations

import gzip
import io
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from warcio.archiveiterator import ArchiveIterator
from warcio.statusandheaders import StatusAndHeaders
from warcio.warcwriter import WARCWriter

from pipeline.stages import ingest
from pipeline.core.artifacts import doc_id
from pipeline.core.parquet import parquet_files
from pipeline.core.config import load
from pipeline.core.errors import PipelineError

HTML = "<html><body><p>caf\u00e9 {i}</p></body></html>"


def response(w: WARCWriter, uri: str, body: bytes, ctype: str, status: str = "200 OK", extra=()):
    headers = [("Content-Type", ctype), ("Content-Length", str(len(body))), *extra]
    http = StatusAndHeaders(status, headers, protocol="HTTP/1.1")
    w.write_record(w.create_warc_record(uri, "response", payload=io.BytesIO(body), length=len(body), http_headers=http))


def write_warc(path: Path, gz: bool = True, n: int = 3) -> Path:
    """warcinfo, request, n HTML responses and one of each other kind a crawl archive holds."""
    with open(path, "wb") as f:
        w = WARCWriter(f, gzip=gz)
        w.write_record(w.create_warcinfo_record(path.name, {"software": "test"}))
        req = StatusAndHeaders("GET / HTTP/1.1", [("Host", "example.org")], protocol="HTTP/1.1", is_http_request=True)
        w.write_record(w.create_warc_record("http://example.org/", "request", http_headers=req))
        for i in range(n):
            response(w, f"http://example.org/p{i}", HTML.format(i=i).encode(), "text/html; charset=utf-8")
        response(w, "http://example.org/latin", "<html>na\u00efve</html>".encode("latin-1"), "text/html; charset=iso-8859-1")
        gzipped = gzip.compress(b"<html>compressed body</html>", mtime=0)
        response(w, "http://example.org/gz", gzipped, "text/html", extra=[("Content-Encoding", "gzip")])
        response(w, "http://example.org/missing", b"<html>404</html>", "text/html", status="404 Not Found")
        response(w, "http://example.org/doc.pdf", b"%PDF-1.4", "application/pdf")
        w.write_record(
            w.create_warc_record(
                "http://example.org/notes.txt", "resource", payload=io.BytesIO(b"a resource"), length=10,
                warc_content_type="text/plain",
            )
        )
        w.write_record(
            w.create_warc_record("http://example.org/p0", "metadata", payload=io.BytesIO(b"k: v"), length=4,
                                 warc_content_type="application/warc-fields")
        )
    return path


def write_wet(path: Path, texts: list[str]) -> Path:
    with open(path, "wb") as f:
        w = WARCWriter(f, gzip=path.suffix == ".gz")
        w.write_record(w.create_warcinfo_record(path.name, {"software": "test"}))
        for i, t in enumerate(texts):
            data = t.encode()
            w.write_record(
                w.create_warc_record(f"http://example.org/t{i}", "conversion", payload=io.BytesIO(data),
                                     length=len(data), warc_content_type="text/plain")
            )
    return path


def offsets(path: Path) -> list[tuple[str, int]]:
    with open(path, "rb") as f:
        it = ArchiveIterator(f)
        return [(r.rec_type, it.get_record_offset()) for r in it]


def run_warc(root: Path, *paths, extra=()):
    plist = ",".join(f"'{p}'" for p in paths)
    return ingest.run(load([f"paths.root={root}", "source=warc", f"source.paths=[{plist}]", *extra]))


def rows_of(root: Path) -> list[dict]:
    return [r for f in parquet_files(root / "data" / "raw") for r in pq.read_table(f).to_pylist()]


EXPECTED_STATUSES = {
    "read": 6,  # p0-p2, latin, gz, the resource
    "skipped_warcinfo": 1,
    "skipped_request": 1,
    "skipped_metadata": 1,
    "skipped_http_status": 1,
    "skipped_content_type": 1,
}


@pytest.mark.parametrize("gz", [True, False], ids=["gzip", "plain"])
def test_warc_records_with_provenance(tmp_path, gz):
    path = write_warc(tmp_path / ("a.warc.gz" if gz else "a.warc"), gz=gz)
    summary = run_warc(tmp_path / "out", path)
    assert summary["statuses"] == EXPECTED_STATUSES
    rows = rows_of(tmp_path / "out")
    assert [r["url"] for r in rows] == [
        "http://example.org/p0", "http://example.org/p1", "http://example.org/p2",
        "http://example.org/latin", "http://example.org/gz", "http://example.org/notes.txt",
    ]
    want = [o for t, o in offsets(path) if t in ("response", "resource")]
    got = [r["source_offset"] for r in rows]
    assert got == [want[i] for i in (0, 1, 2, 3, 4, 7)]
    p0 = rows[0]
    assert p0["html"] == HTML.format(i=0) and p0["id"] == doc_id(p0["html"]) and p0["text"] is None
    assert p0["http_status"] == 200 and p0["content_type"] == "text/html; charset=utf-8"
    assert p0["source_file"] == str(path) and p0["warc_type"] == "response"
    assert p0["warc_record_id"].startswith("<urn:uuid:")
    assert rows[3]["html"] == "<html>na\u00efve</html>"  # declared charset honoured
    assert rows[4]["html"] == "<html>compressed body</html>"  # Content-Encoding undone
    res = rows[5]
    assert res["text"] == "a resource" and res["warc_type"] == "resource" and res["http_status"] is None
    assert summary["accounting"]["warc"]["read"]["docs"] == 6


def test_wet_and_a_glob_of_many_files(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    write_wet(d / "a.warc.wet.gz", ["first text", "second text"])
    write_wet(d / "b.warc.wet", ["plain wet"])
    write_warc(d / "c.warc.gz", n=1)
    summary = run_warc(tmp_path / "out", d / "*.warc*")
    rows = rows_of(tmp_path / "out")
    assert [r["text"] for r in rows[:3]] == ["first text", "second text", "plain wet"]
    assert all(r["warc_type"] == "conversion" and r["content_type"] == "text/plain" for r in rows[:3])
    assert summary["files_found"] == 3 and summary["statuses"]["read"] == 3 + 4
    assert summary["statuses"]["skipped_warcinfo"] == 3


def test_corrupted_member_is_reported_and_the_rest_is_read(tmp_path):
    good = write_warc(tmp_path / "good.warc.gz")
    data = bytearray(good.read_bytes())
    recs = offsets(good)
    bad_at = recs[3][1]  # the second response (p1)
    data[bad_at + 30 : bad_at + 60] = b"\x00" * 30
    bad = tmp_path / "bad.warc.gz"
    bad.write_bytes(bytes(data))
    summary = run_warc(tmp_path / "out", bad)
    st = summary["statuses"]
    assert st["error_malformed_record"] == 1
    assert st["read"] == EXPECTED_STATUSES["read"] - 1
    msg = summary["problem_examples"]["error_malformed_record"][0]
    assert msg.startswith(f"{bad}@{bad_at}: unreadable record")
    urls = [r["url"] for r in rows_of(tmp_path / "out")]
    assert "http://example.org/p1" not in urls and "http://example.org/notes.txt" in urls


def test_truncated_gzip_file(tmp_path):
    good = write_warc(tmp_path / "good.warc.gz", n=3)
    recs = offsets(good)
    cut = recs[4][1] + 40  # inside the third response's gzip member
    bad = tmp_path / "cut.warc.gz"
    bad.write_bytes(good.read_bytes()[:cut])
    other = write_warc(tmp_path / "other.warc.gz", n=1)
    summary = run_warc(tmp_path / "out", bad, other)
    st = summary["statuses"]
    damage = st.get("error_truncated", 0) + st.get("error_malformed_record", 0)
    assert damage == 1, st
    problems = [m for v in summary["problem_examples"].values() for m in v]
    assert any(m.startswith(f"{bad}@{recs[4][1]}:") for m in problems), problems
    urls = [r["url"] for r in rows_of(tmp_path / "out")]
    assert urls[:2] == ["http://example.org/p0", "http://example.org/p1"]
    assert len(urls) == 2 + 4  # the rest of the batch: other.warc.gz in full


def test_malformed_plain_record_then_resync(tmp_path):
    good = write_warc(tmp_path / "good.warc", gz=False)
    data = good.read_bytes()
    recs = offsets(good)
    at = recs[2][1]
    broken = data[:at] + b"NOT-A-WARC-HEADER\r\n" + data[at + len(b"WARC/1.1"):]
    bad = tmp_path / "bad.warc"
    bad.write_bytes(broken)
    summary = run_warc(tmp_path / "out", bad)
    assert summary["statuses"]["error_malformed_record"] == 1
    assert summary["problem_examples"]["error_malformed_record"][0].startswith(f"{bad}@{at}:")
    assert summary["statuses"]["read"] == EXPECTED_STATUSES["read"] - 1  # p0 lost, everything after read


def test_not_a_warc_file_and_empty_result(tmp_path):
    junk = tmp_path / "junk.warc.gz"
    junk.write_bytes(b"\x1f\x8b\x08 this is not gzip at all" * 10)
    good = write_warc(tmp_path / "z.warc.gz", n=1)
    summary = run_warc(tmp_path / "out", junk, good)
    assert summary["statuses"]["error_malformed_record"] == 1
    assert summary["problem_examples"]["error_malformed_record"][0].startswith(f"{junk}@0:")
    assert summary["docs_out"] == 4
    with pytest.raises(PipelineError, match=r"no documents found in .*junk.warc.gz"):
        run_warc(tmp_path / "out2", junk)
    with pytest.raises(PipelineError, match="source=warc needs source.paths"):
        ingest.run(load([f"paths.root={tmp_path}", "source=warc"]))


def test_output_does_not_depend_on_the_number_of_workers(tmp_path):
    files = [write_warc(tmp_path / f"{i}.warc.gz", n=i + 1) for i in range(3)]
    s1 = run_warc(tmp_path / "w1", *files, extra=("executor.workers=1", "source.rows_per_shard=4"))
    s2 = run_warc(tmp_path / "w2", *files, extra=("executor.workers=2", "source.rows_per_shard=4"))
    a, b = (parquet_files(tmp_path / w / "data" / "raw") for w in ("w1", "w2"))
    assert [f.name for f in a] == [f.name for f in b] and len(a) == 5  # 4+1, 4+1, 4+... shards never span files
    assert [f.read_bytes() for f in a] == [f.read_bytes() for f in b]
    assert s1["statuses"] == s2["statuses"] and s1["bytes_out"] == s2["bytes_out"]
    assert not (tmp_path / "w2" / "data" / "raw" / ".work").exists()
    # lineage: each shard names the WARC it came from
    assert [sh["input"] for sh in s2["shards"]] == [str(files[0]), str(files[1]), str(files[1]), str(files[2]),
                                                     str(files[2])]
