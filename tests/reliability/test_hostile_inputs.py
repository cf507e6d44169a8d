"""Hostile input through the real ingest stage: every case is named in the summary, counted,
and the rest of the batch still comes out. What tests/test_warc.py, test_sources.py and
test_ingest.py already cover (truncated/corrupt gzip members, malformed JSONL lines, invalid
UTF-8, dangling links) is not repeated here; see the README's Reliability table.

The memory-bound cases (a 100 MB line, gzip bombs) run the stage in a subprocess and read
its peak RSS from os.wait4, so they prove the input was streamed, not held.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from warcio.statusandheaders import StatusAndHeaders
from warcio.warcwriter import WARCWriter

from pipeline.stages import ingest
from pipeline.core.parquet import parquet_files
from pipeline.core.config import load
from tests.conftest import ROOT

MiB = 1 << 20


def rows_of(root: Path) -> list[dict]:
    return [r for f in parquet_files(root / "data" / "raw") for r in pq.read_table(f).to_pylist()]


def run_source(root: Path, kind: str, *paths, extra=()):
    plist = ",".join(f"'{p}'" for p in paths)
    return ingest.run(load([f"paths.root={root}", f"source={kind}", f"source.paths=[{plist}]", *extra]))


def run_measured(*args: str) -> tuple[int, float, str]:
    """Exit code, peak RSS (MiB) and stderr of `python -m pipeline ingest ...` as a child."""
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "ingest", *args], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    err = b""
    while chunk := proc.stderr.read(1 << 16):  # drain so the child never blocks on a full pipe
        err += chunk if len(err) < 1 << 20 else b""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_maxrss / 1024, err.decode("utf-8", "replace")


def gzip_of_zeros(mib: int) -> bytes:
    co = zlib.compressobj(9, zlib.DEFLATED, 31)
    block = b"\0" * MiB
    return b"".join(co.compress(block) for _ in range(mib)) + co.flush()


def response(w: WARCWriter, uri: str, body: bytes, headers=(), length: int | None = None) -> None:
    hdrs = [("Content-Type", "text/html"), ("Content-Length", str(len(body))), *headers]
    http = StatusAndHeaders("200 OK", hdrs, protocol="HTTP/1.1")
    w.write_record(w.create_warc_record(uri, "response", payload=io.BytesIO(body),
                                        length=len(body) if length is None else length, http_headers=http))


# ---------------------------------------------------------------- files source


def test_a_100_mb_single_line_is_skipped_in_bounded_memory(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    (d / "a.txt").write_text("a normal document")
    line = b"x" * (100 * MiB)
    with open(d / "big.jsonl", "wb") as f:
        f.write(json.dumps({"text": "before"}).encode() + b"\n")
        f.write(b'{"text": "' + line + b'"}\n')
        f.write(json.dumps({"text": "after"}).encode() + b"\n")
    (d / "big.txt").write_bytes(line)  # no newline at all
    with open(d / "big.csv", "wb") as f:  # one huge cell between two small rows
        f.write(b"text\nsmall one\n" + line[: 12 * MiB] + b"\nsmall two\n")
    root = tmp_path / "out"
    # the baseline: the same stage on the same files minus the two big ones
    small = tmp_path / "small"
    small.mkdir()
    (small / "a.txt").write_text("a normal document")
    rc, base, err = run_measured(f"paths.root={tmp_path / 'base'}", "source=files", f"source.paths=[{small}]")
    assert rc == 0, err
    rc, peak, err = run_measured(f"paths.root={root}", "source=files", f"source.paths=[{d}]")
    assert rc == 0, err
    assert peak - base < 48, f"peak RSS {peak:.0f} MiB vs {base:.0f} MiB without the 100 MB line"
    summary = json.loads((root / "data" / "raw" / "_summary.json").read_text())
    assert {r["text"] for r in rows_of(root)} == {"a normal document", "before", "after", "small one", "small two"}
    assert summary["statuses"]["skipped_too_large"] == 3
    ex = summary["problem_examples"]["skipped_too_large"]
    assert any(m.startswith(f"{d}/big.jsonl:2: line of {len(line) + 13} bytes > max_doc_bytes") for m in ex), ex
    assert any(m.startswith(f"{d}/big.txt@0: line of {len(line)} bytes > max_doc_bytes") for m in ex), ex
    assert any(m.startswith(f"{d}/big.csv#row1: {12 * MiB} bytes > max_doc_bytes") for m in ex), ex
    after = next(r for r in rows_of(root) if r["text"] == "after")
    assert after["source_offset"] == len(json.dumps({"text": "before"})) + 1 + len(line) + 13  # offsets stay exact


def test_nul_bytes_invalid_utf8_and_empty_files(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    (d / "nul.txt").write_bytes(b"text with \x00 NUL \x00 bytes")
    (d / "bad.txt").write_bytes(b"caf\xc3\xa9 then \xc3\x28 a broken sequence")
    (d / "empty.txt").write_bytes(b"")
    (d / "empty.jsonl").write_bytes(b"")
    (d / "empty.json").write_bytes(b"")
    (d / "nul.jsonl").write_bytes(b'{"text": "ok \\u0000 escaped"}\n\x00\x00\x00\n{"text": "last"}\n')
    summary = run_source(tmp_path / "out", "files", d)
    texts = {r["url"].rsplit("/", 1)[1]: r["text"] for r in rows_of(tmp_path / "out")}
    assert texts["nul.txt"] == "text with \x00 NUL \x00 bytes"  # kept verbatim; clean decides
    assert "\ufffd" in texts["bad.txt"] and texts["bad.txt"].startswith("caf\u00e9")
    assert texts["nul.jsonl#L1"] == "ok \x00 escaped" and texts["nul.jsonl#L3"] == "last"
    st = summary["statuses"]
    assert st["error_bad_json"] == 2  # empty.json, the NUL line
    ex = summary["problem_examples"]["error_bad_json"]
    assert any(m.startswith(f"{d}/nul.jsonl:2: ") for m in ex) and any(m.startswith(f"{d}/empty.json:") for m in ex)
    assert summary["repairs"] == {"invalid_utf8_replaced": 1}
    assert "empty.txt" in texts and texts["empty.txt"] == ""  # an empty document is clean's to drop


def test_symlink_loops_and_links_out_of_the_root(tmp_path):
    outside = tmp_path / "secret.txt"
    outside.write_text("never ingested")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "x.txt").write_text("never ingested either")
    d = tmp_path / "in"
    (d / "sub").mkdir(parents=True)
    (d / "ok.txt").write_text("inside")
    (d / "sub" / "twin.txt").symlink_to(d / "ok.txt")  # inside the root: fine, read once
    (d / "escape.txt").symlink_to(outside)
    (d / "dotdot.txt").symlink_to(Path("..") / "secret.txt")
    (d / "dirlink").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (d / "loop_a.txt").symlink_to(d / "loop_b.txt")
    (d / "loop_b.txt").symlink_to(d / "loop_a.txt")
    (d / "sub" / "up").symlink_to(d, target_is_directory=True)  # a directory loop
    summary = run_source(tmp_path / "out", "files", d)
    texts = [r["text"] for r in rows_of(tmp_path / "out")]
    assert texts == ["inside"]
    st = summary["statuses"]
    assert st["skipped_outside_root"] == 2 and st["error_unreadable"] == 2  # escape + dotdot; the two loop links
    ex = summary["problem_examples"]
    assert sorted(m.split(":")[0] for m in ex["skipped_outside_root"]) == [f"{d}/dotdot.txt", f"{d}/escape.txt"]
    assert all("outside the input root" in m for m in ex["skipped_outside_root"])
    assert all("symbolic links" in m for m in ex["error_unreadable"]), ex["error_unreadable"]
    # directory links are not walked, and each is named (a folder of links is not an empty corpus)
    assert st["skipped_directory_link"] == 2
    assert sorted(m.split(":")[0] for m in ex["skipped_directory_link"]) == [f"{d}/dirlink", f"{d}/sub/up"]
    # a recursive glob follows the directory links: still nothing outside, nothing twice, no endless walk
    summary = run_source(tmp_path / "glob", "files", f"{d}/**/*.txt")
    assert [r["text"] for r in rows_of(tmp_path / "glob")] == ["inside"]
    assert summary["statuses"]["skipped_outside_root"] >= 3  # escape, dotdot, dirlink/x.txt
    assert all("secret" not in json.dumps(r) for r in rows_of(tmp_path / "glob"))
    # a trusted tree of links (a Hugging Face hub snapshot, git-annex) can opt out
    summary = run_source(tmp_path / "trusted", "files", d, extra=["source.allow_outside_root=true"])
    # ...and then directory links are walked too, each real directory once (the loop ends)
    assert sorted(r["text"] for r in rows_of(tmp_path / "trusted")) == ["inside", "never ingested",
                                                                          "never ingested either"]
    assert "skipped_outside_root" not in summary["statuses"]
    assert "skipped_directory_link" not in summary["statuses"]


def test_a_folder_of_directory_links(tmp_path):
    """The input folder holds only a link to the real data: counted and named, or followed."""
    data = tmp_path / "store" / "corpus"
    data.mkdir(parents=True)
    for i in range(3):
        (data / f"{i}.txt").write_text(f"document number {i}")
    d = tmp_path / "in"
    d.mkdir()
    (d / "corpus").symlink_to(data, target_is_directory=True)
    (d / "again").symlink_to(data, target_is_directory=True)  # the same directory twice: read once
    from pipeline.core.errors import PipelineError

    with pytest.raises(PipelineError, match="skipped_directory_link") as err:
        run_source(tmp_path / "refused", "files", d)
    assert "allow_outside_root=true follows directory links" in str(err.value), str(err.value)
    summary = run_source(tmp_path / "followed", "files", d, extra=["source.allow_outside_root=true"])
    assert sorted(r["text"] for r in rows_of(tmp_path / "followed")) == [f"document number {i}" for i in range(3)]
    assert summary["files_read"] == 3


def test_fifos_and_devices_are_not_read(tmp_path):
    """A named pipe would block the stage forever, /dev/zero would never end."""
    d = tmp_path / "in"
    d.mkdir()
    (d / "ok.txt").write_text("fine")
    os.mkfifo(d / "pipe.txt")
    summary = run_source(tmp_path / "out", "files", d, "/dev/zero", d / "pipe.txt")
    assert [r["text"] for r in rows_of(tmp_path / "out")] == ["fine"]
    ex = summary["problem_examples"]["skipped_not_regular_file"]
    assert summary["statuses"]["skipped_not_regular_file"] == 2  # named explicitly (a directory walk lists only regular files)
    assert sorted(m.split(":")[0] for m in ex) == ["/dev/zero", f"{d}/pipe.txt"]


def test_a_pickle_among_the_inputs_is_refused_not_loaded(tmp_path):
    import pickle

    import torch

    d = tmp_path / "in"
    d.mkdir()
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (d / "model.pkl").write_bytes(pickle.dumps(Evil()))
    (d / "disguised.jsonl").write_bytes(pickle.dumps(Evil()))
    torch.save({"w": torch.zeros(2)}, d / "weights.pt")
    (d / "data.bin").write_bytes(b"\x00\x01 not a pickle")
    (d / "ok.txt").write_text("fine")
    summary = run_source(tmp_path / "out", "files", d)
    assert [r["text"] for r in rows_of(tmp_path / "out")] == ["fine"]
    assert not marker.exists()
    ex = summary["problem_examples"]["skipped_pickle"]
    assert summary["statuses"]["skipped_pickle"] == 3 and summary["statuses"]["skipped_extension"] == 1
    assert {m.split(":")[0] for m in ex} == {f"{d}/model.pkl", f"{d}/disguised.jsonl", f"{d}/weights.pt"}
    assert all("never loaded" in m for m in ex)


# ---------------------------------------------------------------- warc source


def test_gzip_bombs_are_capped_in_bounded_memory(tmp_path):
    """Two bombs of 256 MiB of zeros each (~250 KiB on disk): an HTTP body with
    Content-Encoding: gzip, and a bare gzip member with no WARC header and no newline."""
    bomb = gzip_of_zeros(256)
    path = tmp_path / "bombs.warc.gz"
    with open(path, "wb") as f:
        w = WARCWriter(f, gzip=True)
        w.write_record(w.create_warcinfo_record(path.name, {"software": "test"}))
        response(w, "http://example.org/ce-bomb", bomb, [("Content-Encoding", "gzip")])
        response(w, "http://example.org/one", b"<html>one</html>")
        f.write(bomb)  # a member that is not a record
        response(w, "http://example.org/two", b"<html>two</html>")
    small = tmp_path / "small.warc.gz"
    with open(small, "wb") as f:
        w = WARCWriter(f, gzip=True)
        response(w, "http://example.org/one", b"<html>one</html>")
    rc, base, err = run_measured(f"paths.root={tmp_path / 'base'}", "source=warc", f"source.paths=[{small}]")
    assert rc == 0, err
    rc, peak, err = run_measured(f"paths.root={tmp_path / 'out'}", "source=warc", f"source.paths=[{path}]",
                                 "source.max_record_bytes=1000000")
    assert rc == 0, err
    assert peak - base < 48, f"peak RSS {peak:.0f} MiB vs {base:.0f} MiB without the bombs"
    root = tmp_path / "out"
    assert [r["url"] for r in rows_of(root)] == ["http://example.org/one", "http://example.org/two"]
    summary = json.loads((root / "data" / "raw" / "_summary.json").read_text())
    st, ex = summary["statuses"], summary["problem_examples"]
    assert st["skipped_too_large"] == 1 and ex["skipped_too_large"][0].startswith(f"{path}@")
    assert "> max_record_bytes 1000000" in ex["skipped_too_large"][0]
    assert st["error_malformed_record"] == 1 and ex["error_malformed_record"][0].startswith(f"{path}@")


def test_wrong_chunk_lengths_bad_target_uris_and_empty_files(tmp_path):
    plain = tmp_path / "lengths.warc"
    with open(plain, "wb") as f:
        w = WARCWriter(f, gzip=False)
        response(w, "http://example.org/a", b"<html>a</html>")
        response(w, "http://example.org/short", b"<html>declared too short</html>", length=5)
        response(w, "http://example.org/b", b"<html>b</html>")
        response(w, "http://example.org/long", b"<html>declared too long</html>", length=400)
    gz = tmp_path / "uris.warc.gz"
    with open(gz, "wb") as f:
        w = WARCWriter(f, gzip=True)
        response(w, "http://example.org/c", b"<html>c</html>")
        for bad in ("", "not a uri at all", "http://[::1/broken-ipv6", "javascript:alert(1)"):
            response(w, bad, b"<html>odd uri</html>")
        response(w, "http://example.org/d", b"<html>d</html>")
    (tmp_path / "empty.warc.gz").write_bytes(b"")
    (tmp_path / "empty.warc").write_bytes(b"")
    summary = run_source(tmp_path / "out", "warc", plain, gz, tmp_path / "empty.warc.gz", tmp_path / "empty.warc")
    urls = [r["url"] for r in rows_of(tmp_path / "out")]
    assert urls == ["http://example.org/a", "http://example.org/b", "http://example.org/c", "http://example.org/d"]
    st, ex = summary["statuses"], summary["problem_examples"]
    # wrong lengths: too short leaves junk before the next record, too long runs past the end of the file
    assert st["error_bad_length"] == 1 and ex["error_bad_length"][0].startswith(f"{plain}@")
    assert "Content-Length is wrong" in ex["error_bad_length"][0]
    assert st["error_truncated"] == 1 and ex["error_truncated"][0].startswith(f"{plain}@")
    assert st["skipped_no_target_uri"] == 1 and ex["skipped_no_target_uri"][0].startswith(f"{gz}@")
    assert st["skipped_bad_target_uri"] == 3
    assert [m.split(": WARC-Target-URI ")[1] for m in ex["skipped_bad_target_uri"]] == [
        "'not%20a%20uri%20at%20all' is not an absolute URI",
        "'http://[::1/broken-ipv6' does not parse (Invalid IPv6 URL)",
        "'javascript:alert(1)' is not an http(s) URL with a host",
    ]
    assert summary["files_found"] == 4 and summary["files_read"] == 4  # the empty files: read, nothing in them


def test_wrong_http_chunk_lengths_are_damage_not_content(tmp_path):
    """warcio on its own returns chunk framing as text, or a short chunk as complete; a body
    stored de-chunked under a `Transfer-Encoding: chunked` header (common) is still read."""
    path = tmp_path / "chunked.warc.gz"
    te = [("Transfer-Encoding", "chunked")]
    with open(path, "wb") as f:
        w = WARCWriter(f, gzip=True)
        response(w, "http://example.org/good", b"6\r\n<html>\r\n7\r\n</html>\r\n0\r\n\r\n", te)
        response(w, "http://example.org/short", b"ff\r\n<html>short</html>\r\n0\r\n\r\n", te)
        response(w, "http://example.org/dechunked", b"<html>stored de-chunked</html>", te)
        response(w, "http://example.org/huge", b"fffffffffff\r\n<html>x</html>\r\n0\r\n\r\n", te)
        response(w, "http://example.org/no-end", b"6\r\n<html>\r\nXX</html>", te)
        response(w, "http://example.org/after", b"<html>after</html>")
    summary = run_source(tmp_path / "out", "warc", path)
    rows = {r["url"].rsplit("/", 1)[1]: r["html"] for r in rows_of(tmp_path / "out")}
    assert rows == {"good": "<html></html>", "dechunked": "<html>stored de-chunked</html>", "after": "<html>after</html>"}
    ex = summary["problem_examples"]["error_bad_chunk_length"]
    assert summary["statuses"]["error_bad_chunk_length"] == 3 and all(m.startswith(f"{path}@") for m in ex)
    assert "Ran out of data before end of chunk" in ex[0]

