"""Ingest: the pydoc_site crawl, the crawler against a local site, and the files source."""

from __future__ import annotations

import json
import re
import sys
import time
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.stages import ingest
from pipeline.core.artifacts import doc_id, read_json
from pipeline.core.parquet import parquet_files
from pipeline.core.config import load
from pipeline.core.errors import PipelineError
from pipeline.sources.crawler import CrawlConfig, Crawler, extract_links, normalize_url
from pipeline.sources.pydoc_site import denier, module_of, pydoc_server


def rows_of(root: Path) -> list[dict]:
    files = parquet_files(root / "data" / "raw")
    return [r for f in files for r in pq.read_table(f).to_pylist()]


def q(path: Path | str) -> str:
    """A path as a quoted Hydra override value."""
    return "'" + str(path) + "'"


# ------------------------------------------------------------------ pydoc_site


@pytest.fixture(scope="module")
def pydoc_runs(tmp_path_factory):
    """The same 12-page crawl twice, into two roots."""
    roots = [tmp_path_factory.mktemp(f"pydoc{i}") for i in range(2)]
    summaries = [ingest.run(load([f"paths.root={r}", "source.max_pages=12"])) for r in roots]
    return roots, summaries


def test_pydoc_crawl_rows_schema_and_urls(pydoc_runs):
    (root, _), (summary, _) = pydoc_runs
    files = parquet_files(root / "data" / "raw")
    assert files and files[0].name == "part-00000.parquet"
    assert pq.read_schema(files[0]).remove_metadata().equals(ingest.RAW_SCHEMA)
    rows = rows_of(root)
    assert len(rows) == 12 == summary["docs_out"] == summary["statuses"]["fetched"]
    urls = [r["url"] for r in rows]
    assert urls[0] == "pydoc:///" and "pydoc:///index.html" in urls
    assert all(re.fullmatch(r"pydoc:///[\w.]*", u) for u in urls), urls
    assert len(set(urls)) == len(urls)
    for r in rows:
        assert r["source"] == "pydoc_site" and r["http_status"] == 200
        assert r["content_type"].startswith("text/html")
        assert r["text"] is None and r["html"] and r["id"] == doc_id(r["html"])
    # BFS in discovery order: the module index lists built-in modules alphabetically first
    assert urls[2:5] == ["pydoc:///_abc.html", "pydoc:///_ast.html", "pydoc:///_codecs.html"]
    st = summary["statuses"]
    assert st["skipped_max_pages"] > 100  # the index links to hundreds of modules
    assert st["skipped_path"] >= 2  # topics.html, keywords.html
    assert st["skipped_deny"] >= 5  # antigravity, this, tkinter, turtle, idlelib, ...
    assert summary["robots"]["pydoc://"].startswith("allow-all")  # pydoc answers robots.txt with HTML
    assert summary["bytes_fetched"] > 10_000
    assert not any("topics" in u or "keywords" in u for u in urls)
    # every response is archived beside data/raw, with the real (port-bearing) URIs
    from warcio.archiveiterator import ArchiveIterator

    warcs = sorted((root / "data" / "warc" / "pydoc_site").glob("pydoc_site-*.warc.gz"))
    assert len(warcs) == 1 and summary["warc_file"] == str(warcs[0])
    with open(warcs[0], "rb") as f:
        uris = [r.rec_headers.get_header("WARC-Target-URI") for r in ArchiveIterator(f) if r.rec_type == "response"]
    assert len(uris) == 12 and uris[0].startswith("http://127.0.0.1:")


def test_pydoc_crawl_is_byte_identical(pydoc_runs):
    roots, _ = pydoc_runs
    a, b = (parquet_files(r / "data" / "raw") for r in roots)
    assert [f.name for f in a] == [f.name for f in b]
    for fa, fb in zip(a, b):
        assert fa.read_bytes() == fb.read_bytes()


def test_pydoc_deny_and_skip_paths_are_honoured(tmp_path):
    summary = ingest.run(
        load([f"paths.root={tmp_path}", "source.max_pages=5", "source.deny=[_abc]", "source.skip_paths=[/_ast]"])
    )
    urls = [r["url"] for r in rows_of(tmp_path)]
    # with the default skip_paths replaced, topics/keywords are crawled like any page
    assert urls == [
        "pydoc:///",
        "pydoc:///index.html",
        "pydoc:///topics.html",
        "pydoc:///keywords.html",
        "pydoc:///_codecs.html",
    ]
    assert summary["statuses"]["skipped_deny"] == 1
    assert summary["statuses"]["skipped_path"] == 1


def test_pydoc_server_startup_errors_are_clear():
    with pytest.raises(PipelineError, match=r"exited with code 3 before it was ready \(output: no server here\)"):
        with pydoc_server(10, cmd=[sys.executable, "-c", "print('no server here'); raise SystemExit(3)"]):
            pass
    started = time.monotonic()
    with pytest.raises(PipelineError, match=r"did not print 'Server ready at \.\.\.' within 0.5s"):
        with pydoc_server(0.5, cmd=[sys.executable, "-c", "import time; time.sleep(30)"]):
            pass
    assert time.monotonic() - started < 10  # the silent process was terminated, not waited for


def test_pydoc_deny_patterns():
    check = denier(["tkinter", "*.tests", "test"])
    assert module_of("http://h:1/tkinter.ttk.html") == "tkinter.ttk"
    assert check("http://h:1/tkinter.ttk.html") == "deny"
    assert check("http://h:1/tkinter.html") == "deny"
    assert check("http://h:1/distutils.tests.test_core.html") == "deny"
    assert check("http://h:1/test.support.html") == "deny"
    assert check("http://h:1/testing.html") is None  # names, not string prefixes
    assert check("http://h:1/json.html") is None
    assert check("http://h:1/") is None and check("http://h:1/index.html") is None


# ------------------------------------------------------------------ crawler against a local site

BIG = "<html><body>" + "x" * 5000 + "</body></html>"
SITE = {
    "/robots.txt": ("text/plain", "User-agent: *\nDisallow: /private\n"),
    "/": (
        "text/html",
        '<html><body><a href="/a.html">a</a> <a href="/private/secret.html">s</a>'
        '<a href="http://example.invalid/x">off</a> <a href="mailto:me@example.invalid">m</a>'
        '<a href="/big.html">big</a> <a href="/data.json">json</a> <a href="/a.html#frag">again</a>'
        '<a href="/missing.html">404</a></body></html>',
    ),
    "/a.html": ("text/html", '<html><body><p>&lt;obj at 0x7fabcdef1234&gt;</p><a href="b.html">b</a></body></html>'),
    "/b.html": ("text/html", '<html><body><a href="/c.html">c</a></body></html>'),
    "/c.html": ("text/html", "<html><body>deep</body></html>"),
    "/private/secret.html": ("text/html", "<html><body>secret</body></html>"),
    "/big.html": ("text/html", BIG),
    "/data.json": ("application/json", "{}"),
}


class _Site(BaseHTTPRequestHandler):
    site: dict = SITE
    log: list = []

    def do_GET(self):  # noqa: N802 - http.server API
        type(self).log.append((self.path, self.headers.get("User-Agent")))
        if self.path not in self.site:
            self.send_error(404)
            return
        ctype, body = self.site[self.path]
        data = body.encode()
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def site():
    """A tiny site on 127.0.0.1 that records the requests it gets."""

    def serve(pages: dict):
        handler = type("Handler", (_Site,), {"site": pages, "log": []})
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}", handler.log

    servers: list = []
    yield serve
    for s in servers:
        s.shutdown()
        s.server_close()


def crawl(base: str, **kw) -> tuple[list, Crawler]:
    cfg = CrawlConfig(seeds=[base + "/"], allow_private=True, user_agent="test-bot/1", **kw)
    crawler = Crawler(cfg, canonical=lambda u: u.replace(base, "site://"))
    return list(crawler.crawl()), crawler


def test_crawler_honours_robots_caps_and_scope(site):
    base, log = site(SITE)
    pages, crawler = crawl(base, max_depth=2, max_bytes=1000, scrub=[r"( at )?0x[0-9a-fA-F]{6,}"])
    assert [p.canonical for p in pages] == ["site:///", "site:///a.html", "site:///b.html"]
    requested = [path for path, _ in log]
    assert requested[0] == "/robots.txt"  # robots first
    assert not any(p.startswith("/private") for p in requested)
    assert "/c.html" not in requested  # depth 3 > max_depth 2
    assert all(ua == "test-bot/1" for _, ua in log)
    assert crawler.stats == {
        "fetched": 3,
        "robots_disallowed": 1,
        "skipped_offsite": 1,
        "skipped_scheme": 1,
        "skipped_too_large": 1,
        "skipped_content_type": 1,
        "error_http_404": 1,
        "skipped_max_depth": 1,
    }
    assert crawler.robots_note[base] == "parsed"
    assert "0x7f" not in pages[1].html and "&lt;obj&gt;" in pages[1].html  # scrubbed
    assert crawler.bytes == sum(p.nbytes for p in pages)


def test_crawler_max_pages_and_html_robots(site):
    pages = dict(SITE)
    pages["/robots.txt"] = ("text/html", "<html>not a robots file: Disallow: /</html>")
    base, log = site(pages)
    got, crawler = crawl(base, max_pages=3, max_bytes=10_000)
    # robots.txt served as HTML means allow-all: the private page is crawled now
    assert [p.canonical for p in got] == ["site:///", "site:///a.html", "site:///private/secret.html"]
    assert crawler.robots_note[base].startswith("allow-all (robots.txt answered 200 text/html")
    # still queued when the cap hit: big.html, data.json, missing.html, b.html
    assert crawler.stats["skipped_max_pages"] == 4
    assert [p for p, _ in log] == ["/robots.txt", "/", "/a.html", "/private/secret.html"]


def test_crawler_refuses_private_hosts_unless_allowed(site):
    base, log = site(SITE)
    cfg = CrawlConfig(seeds=[base + "/"], allow_private=False)
    assert list(Crawler(cfg).crawl()) == []
    assert log == []


def test_url_helpers():
    assert normalize_url("HTTP://Example.COM#x") == "http://example.com/"
    assert normalize_url("https://example.com:443/a?b=1#c") == "https://example.com/a?b=1"
    assert normalize_url("http://example.com:8080") == "http://example.com:8080/"
    html = '<html><head><base href="/docs/"></head><body><a href="a.html">a</a><a href="#top">t</a></body></html>'
    assert extract_links(html, "http://h/x/y.html") == ["http://h/docs/a.html"]


# ------------------------------------------------------------------ files source


@pytest.fixture
def corpus(tmp_path):
    d = tmp_path / "corpus"
    (d / "sub").mkdir(parents=True)
    (d / "a.txt").write_text("plain text document\n")
    (d / "b.md").write_text("# Title\n\nmarkdown body\n")
    (d / "sub" / "c.html").write_text("<html><body><p>hello html</p></body></html>")
    (d / "d.jsonl").write_text(
        json.dumps({"text": "first json doc"}) + "\n"
        + "{not json\n"
        + json.dumps({"body": "no text field"}) + "\n"
        + "\n"
        + json.dumps({"text": "fifth line doc"}) + "\n"
    )  # fmt: skip
    pq.write_table(pa.table({"text": ["row zero", None, "row two"], "n": [0, 1, 2]}), d / "e.parquet")
    (d / "f.txt").write_bytes(b"bad \xff\xfe utf8 in caf\xc3\xa9 but the rest is fine")
    (d / "g.bin").write_bytes(b"\x00\x01")
    (d / "h.parquet").write_bytes(b"PAR1 this is not really parquet")
    pq.write_table(pa.table({"body": ["wrong column"]}), d / "i.parquet")
    return d


def files_cfg(root: Path, paths: list, *extra: str):
    return load([f"paths.root={root}", "source=files", f"source.paths=[{','.join(q(p) for p in paths)}]", *extra])


def test_files_source_reads_every_format(tmp_path, corpus):
    summary = ingest.run(files_cfg(tmp_path / "out", [corpus]))
    rows = rows_of(tmp_path / "out")
    by_url = {r["url"]: r for r in rows}
    d = str(corpus)
    assert list(by_url) == [
        f"{d}/a.txt",
        f"{d}/b.md",
        f"{d}/d.jsonl#L1",
        f"{d}/d.jsonl#L5",
        f"{d}/e.parquet#row0",
        f"{d}/e.parquet#row2",
        f"{d}/f.txt",
        f"{d}/sub/c.html",
    ]
    assert by_url[f"{d}/a.txt"]["text"] == "plain text document\n"
    assert by_url[f"{d}/b.md"]["content_type"] == "text/markdown"
    html_row = by_url[f"{d}/sub/c.html"]
    assert html_row["html"].startswith("<html>") and html_row["text"] is None
    assert html_row["id"] == doc_id(html_row["html"])
    assert by_url[f"{d}/d.jsonl#L5"]["text"] == "fifth line doc"
    assert by_url[f"{d}/e.parquet#row2"]["text"] == "row two"
    assert "\ufffd" in by_url[f"{d}/f.txt"]["text"] and by_url[f"{d}/f.txt"]["text"].endswith("the rest is fine")
    for r in rows:
        assert r["source"] == "files" and r["http_status"] is None
        assert (r["html"] is None) != (r["text"] is None)
    assert summary["statuses"] == {
        "read": 8,
        "error_bad_json": 1,
        "skipped_missing_field": 3,  # jsonl line 3, e.parquet row 1 (null), i.parquet (no such column)
        "skipped_extension": 1,
        "error_unreadable": 1,
    }
    assert summary["accounting"]["files"]["read"] == {"docs": 8, "bytes": sum(
        len((r["html"] or r["text"]).encode()) for r in rows)}
    assert summary["repairs"] == {"invalid_utf8_replaced": 1}
    assert summary["repair_examples"][0].startswith(f"{d}/f.txt: invalid utf-8 bytes replaced")
    examples = summary["problem_examples"]
    assert examples["error_bad_json"] == [f"{d}/d.jsonl:2: Expecting property name enclosed in double quotes (column 2)"]
    assert f"{d}/e.parquet#row1" in examples["skipped_missing_field"][1]
    assert examples["error_unreadable"][0].startswith(f"{d}/h.parquet: not a readable Parquet file")
    assert examples["skipped_missing_field"][2] == f"{d}/i.parquet: no 'text' column (has ['body'])"
    for r in rows:
        assert r["source_file"] == r["url"].split("#")[0]
    assert by_url[f"{d}/d.jsonl#L5"]["source_offset"] == sum(
        len(line) + 1 for line in (corpus / "d.jsonl").read_bytes().split(b"\n")[:4])
    assert summary["docs_out"] == 8 and summary["files_found"] == 9 and summary["files_read"] == 6
    assert read_json(tmp_path / "out" / "data" / "raw" / "_summary.json")["docs_out"] == 8


def test_files_source_globs_size_cap_and_determinism(tmp_path, corpus):
    s1 = ingest.run(files_cfg(tmp_path / "r1", [corpus / "*.txt"], "source.max_file_bytes=25"))
    rows = rows_of(tmp_path / "r1")
    assert [r["url"] for r in rows] == [f"{corpus}/a.txt"]  # f.txt (41 bytes) is over the cap
    assert s1["statuses"] == {"read": 1, "skipped_too_large": 1}
    assert s1["problem_examples"]["skipped_too_large"] == [f"{corpus}/f.txt: 41 bytes > max_file_bytes 25"]
    ingest.run(files_cfg(tmp_path / "r2", [corpus / "*.txt"], "source.max_file_bytes=25"))
    a, b = (parquet_files(tmp_path / r / "data" / "raw") for r in ("r1", "r2"))
    assert [f.read_bytes() for f in a] == [f.read_bytes() for f in b]


def test_files_source_missing_path(tmp_path):
    with pytest.raises(PipelineError, match=r"input path not found: .*nope"):
        ingest.run(files_cfg(tmp_path, [tmp_path / "nope"]))
    assert not (tmp_path / "data" / "raw").exists()


def test_files_source_empty_dir(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(PipelineError, match=r"no documents found in .*empty"):
        ingest.run(files_cfg(tmp_path, [tmp_path / "empty"]))


def test_files_source_needs_paths(tmp_path):
    with pytest.raises(PipelineError, match="source.paths"):
        ingest.run(load([f"paths.root={tmp_path}", "source=files"]))


def test_cli_reports_missing_input_on_one_line(tmp_path, capsys):
    from pipeline.apps.cli import main

    code = main(["ingest", f"paths.root={tmp_path}", "source=files", f"source.paths=[{q(tmp_path / 'nope')}]"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.count("\n") == 0 and err.startswith("error: input path not found:")


def test_pydoc_pages_do_not_carry_the_callers_environment(tmp_path, monkeypatch):
    """cgi.FieldStorage's default is os.environ: the server must not see ours."""
    monkeypatch.setenv("PIPELINE_SECRET_TOKEN", "hunter2-do-not-leak")
    from pipeline.sources.pydoc_site import pydoc_server

    import urllib.request

    with pydoc_server() as base:
        html = urllib.request.urlopen(f"{base}/cgi.html", timeout=60).read().decode()
    assert "FieldStorage" in html
    assert "hunter2-do-not-leak" not in html and "PIPELINE_SECRET_TOKEN" not in html
