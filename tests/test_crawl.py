"""The crawl source against a real HTTP server on 127.0.0.1: politeness, errors, scope, the
private-address guard, WARC archiving and replay, incremental reruns and resume after SIGKILL.

Nothing here connects anywhere but 127.0.0.1: out-of-scope hosts are never resolved, and
private targets are refused before a socket is opened (both are asserted).
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpcore
import pyarrow.parquet as pq
import pytest

from pipeline.stages import ingest
from pipeline.core.artifacts import doc_id
from pipeline.core.parquet import parquet_files
from pipeline.core.config import load
from pipeline.sources.crawler import AddressPolicy, RefusedAddress, _GuardedBackend, retry_after_seconds

ROOT = Path(__file__).resolve().parent.parent


def page(*links: str, body: str = "") -> str:
    anchors = "".join(f'<a href="{h}">{h}</a> ' for h in links)
    return f"<html><head><title>t</title></head><body><p>{body}</p>{anchors}</body></html>"


class Site:
    """A live site: ``routes`` maps a path to a response function; every request is logged."""

    def __init__(self) -> None:
        self.routes: dict = {}
        self.log: list[tuple[float, str, dict]] = []
        self.hits: dict[str, int] = {}
        self.active = 0
        self.max_active = 0
        self.latency = 0.0
        self._lock = threading.Lock()
        site = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):  # noqa: N802 - http.server API
                with site._lock:
                    site.log.append((time.monotonic(), self.path, dict(self.headers)))
                    site.hits[self.path] = site.hits.get(self.path, 0) + 1
                    site.active += 1
                    site.max_active = max(site.max_active, site.active)
                try:
                    if site.latency:
                        time.sleep(site.latency * random.random())
                    route = site.routes.get(self.path)
                    if route is None:
                        status, headers, body = 404, {"Content-Type": "text/html"}, b"<html>not found</html>"
                    else:
                        status, headers, body = route(self, site.hits[self.path])
                    chunked = headers.pop("_chunked", False)
                    self.send_response(status)
                    for k, v in headers.items():
                        self.send_header(k, v)
                    if chunked:
                        self.send_header("Transfer-Encoding", "chunked")
                        self.end_headers()
                        for i in range(0, len(body), 1000):
                            part = body[i : i + 1000]
                            self.wfile.write(f"{len(part):x}\r\n".encode() + part + b"\r\n")
                        self.wfile.write(b"0\r\n\r\n")
                    else:
                        self.send_header("Content-Length", str(len(body)))
                        self.end_headers()
                        self.wfile.write(body)
                finally:
                    with site._lock:
                        site.active -= 1

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.handle_error = lambda request, address: None  # the crawler hangs up on oversized bodies
        self.port = self.server.server_address[1]
        self.base = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def html(self, path: str, html: str, etag: bool = False, last_modified: str | None = None) -> None:
        def respond(handler, n):
            body = self.routes_content[path].encode()
            headers = {"Content-Type": "text/html; charset=utf-8"}
            tag = '"' + hashlib.sha1(body).hexdigest()[:12] + '"'
            if etag:
                headers["ETag"] = tag
                if handler.headers.get("If-None-Match") == tag:
                    return 304, {"ETag": tag}, b""
            if last_modified:
                headers["Last-Modified"] = last_modified
                if handler.headers.get("If-Modified-Since") == last_modified:
                    return 304, {}, b""
            return 200, headers, body

        self.routes_content = getattr(self, "routes_content", {})
        self.routes_content[path] = html
        self.routes[path] = respond

    def fixed(self, path: str, status: int, headers: dict, body: bytes = b"") -> None:
        self.routes[path] = lambda handler, n: (status, dict(headers), body)

    def requested(self) -> list[str]:
        return [p for _, p, _ in self.log]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def make_site():
    sites: list[Site] = []

    def make() -> Site:
        sites.append(Site())
        return sites[-1]

    yield make
    for s in sites:
        s.close()


def crawl_cfg(root: Path, site: Site, *extra: str, allow: list[str] | None = None):
    allow = allow or [f"127.0.0.1:{site.port}"]
    return load(
        [
            f"paths.root={root}",
            "source=crawl",
            f"source.seeds=['{site.base}/']",
            "source.allow=[" + ",".join(f"'{a}'" for a in allow) + "]",
            f"source.allow_private=['127.0.0.1:{site.port}']",
            "source.delay=0",
            "source.timeout=5",
            "source.backoff=0.05",
            "source.user_agent=test-bot/2",
            *extra,
        ]
    )


def rows_of(root: Path) -> list[dict]:
    return [r for f in parquet_files(root / "data" / "raw") for r in pq.read_table(f).to_pylist()]


# ------------------------------------------------------------------ the behaviours, one crawl


@pytest.fixture
def hostile_site(make_site):
    s = make_site()
    p = s.port
    s.fixed("/robots.txt", 200, {"Content-Type": "text/plain"}, b"User-agent: *\nDisallow: /private\nCrawl-delay: 0.2\n")
    s.html("/", page("/a.html", "/private/x.html", "http://other.example.invalid/", "mailto:x@example.invalid",
                     "/old", "/loop1", "/r1", "/missing", "/broken", "/busy", "/big.html", "/stream-big",
                     "/file.pdf", "/notes.txt", "/to-private", "/to-metadata", "/to-localhost", "/a.html#frag"))
    s.html("/a.html", page("b.html", body="a"))
    s.html("/b.html", page(body="b"))
    s.html("/moved.html", page(body="moved"))
    s.html("/private/x.html", page(body="secret"))
    s.fixed("/old", 301, {"Location": "/moved.html"})
    s.fixed("/loop1", 302, {"Location": "/loop2"})
    s.fixed("/loop2", 302, {"Location": "/loop1"})
    for i in range(1, 8):
        s.fixed(f"/r{i}", 302, {"Location": f"/r{i + 1}"})
    s.fixed("/broken", 500, {"Content-Type": "text/html"}, b"<html>oops</html>")
    s.routes["/busy"] = lambda h, n: (
        (429, {"Retry-After": "1", "Content-Type": "text/plain"}, b"slow down")
        if n == 1
        else (200, {"Content-Type": "text/html"}, page(body="finally").encode())
    )
    s.fixed("/big.html", 200, {"Content-Type": "text/html"}, b"<html>" + b"x" * 5000 + b"</html>")
    s.fixed("/stream-big", 200, {"Content-Type": "text/html", "_chunked": True}, b"<html>" + b"y" * 5000 + b"</html>")
    s.fixed("/file.pdf", 200, {"Content-Type": "application/pdf"}, b"%PDF-1.4 not html")
    s.fixed("/notes.txt", 200, {"Content-Type": "text/plain; charset=utf-8"}, "plain notes café".encode())
    s.fixed("/to-private", 302, {"Location": "http://10.0.0.1/secret"})
    s.fixed("/to-metadata", 302, {"Location": "http://169.254.169.254/latest/meta-data/"})
    s.fixed("/to-localhost", 302, {"Location": f"http://localhost:{p}/b.html"})
    return s


def test_crawl_behaviours_against_a_live_server(tmp_path, hostile_site, monkeypatch):
    site = hostile_site
    connects: list[tuple[str, int]] = []
    lookups: list[str] = []
    real_connect, real_getaddrinfo = httpcore.SyncBackend.connect_tcp, socket.getaddrinfo

    def spy_connect(self, host, port, *a, **k):
        connects.append((host, port))
        return real_connect(self, host, port, *a, **k)

    def spy_getaddrinfo(host, *a, **k):
        lookups.append(host)
        return real_getaddrinfo(host, *a, **k)

    monkeypatch.setattr(httpcore.SyncBackend, "connect_tcp", spy_connect)
    monkeypatch.setattr(socket, "getaddrinfo", spy_getaddrinfo)
    allow = [f"127.0.0.1:{site.port}", "10.0.0.1", "169.254.169.254", f"localhost:{site.port}"]
    summary = ingest.run(
        crawl_cfg(tmp_path, site, "source.max_bytes=2000", "source.max_redirects=3", "source.retries=2", allow=allow)
    )
    st = summary["statuses"]
    assert st == {
        "fetched": 6,  # /, a, b, moved, notes.txt, busy (after its 429)
        "redirected": 10,  # old, loop1, loop2, r1-r4, to-private, to-metadata, to-localhost
        "robots_disallowed": 1,
        "skipped_offsite": 1,
        "skipped_scheme": 1,
        "skipped_private": 3,
        "error_redirect_loop": 1,
        "error_too_many_redirects": 1,
        "error_http_404": 1,
        "error_http_500": 1,
        "skipped_too_large": 2,
        "skipped_content_type": 1,
    }, st
    rows = rows_of(tmp_path)
    urls = [r["url"] for r in rows]
    b = site.base
    # BFS order: b.html and moved.html were discovered while processing a.html and /old
    assert urls == [f"{b}/", f"{b}/a.html", f"{b}/busy", f"{b}/notes.txt", f"{b}/b.html", f"{b}/moved.html"]
    notes = rows[3]
    assert notes["text"] == "plain notes café" and notes["html"] is None
    assert notes["content_type"] == "text/plain; charset=utf-8" and notes["id"] == doc_id("plain notes café")
    req = site.requested()
    # robots.txt first and once; the disallowed page, the loop's second lap and r5+ never requested
    assert req[0] == "/robots.txt" and req.count("/robots.txt") == 1
    assert "/private/x.html" not in req and req.count("/loop1") == 1 and "/r5" not in req
    assert req.count("/broken") == 3  # retries=2
    assert req.count("/busy") == 2
    times = {p: [t for t, q, _ in site.log if q == p] for p in ("/busy",)}
    assert times["/busy"][1] - times["/busy"][0] >= 0.95  # Retry-After: 1 honoured
    starts = [t for t, _, _ in site.log]
    gaps = [b2 - a2 for a2, b2 in zip(starts[1:], starts[2:])]  # after robots.txt: Crawl-delay 0.2
    assert min(gaps) >= 0.18, gaps
    assert all(h.get("User-Agent") == "test-bot/2" for _, _, h in site.log)
    # never resolved out-of-scope hosts, never connected anywhere but the test server
    assert "other.example.invalid" not in lookups
    assert set(connects) == {("127.0.0.1", site.port)}
    # accounting: documents and bytes per status
    acc = summary["accounting"]["crawl"]
    assert acc["fetched"]["docs"] == 6 and acc["fetched"]["bytes"] == summary["bytes_fetched"] > 0
    assert acc["error_http_500"] == {"docs": 1, "bytes": len(b"<html>oops</html>")}
    assert summary["robots"][site.base] == "parsed"


def test_address_policy_and_connect_time_guard():
    pol = AddressPolicy(["127.0.0.1:8000"])
    assert pol.check("127.0.0.1", 8000)[0] == "127.0.0.1"
    assert pol.check("127.0.0.1", 8001)[0] is None  # another port
    assert pol.check("localhost", 8000)[0] is None  # another loopback name
    assert pol.check("10.1.2.3", 80)[0] is None and pol.check("169.254.169.254", 80)[0] is None
    assert pol.check("::1", 8000)[0] is None and pol.check("192.168.1.1", 80)[0] is None
    assert AddressPolicy(True).check("10.0.0.1", 80)[0] == "10.0.0.1"
    assert AddressPolicy(["loopback"]).check("localhost", 1)[0] in ("127.0.0.1", "::1")
    assert AddressPolicy(["10.0.0.0/8"]).check("10.9.9.9", 80)[0] == "10.9.9.9"
    with pytest.raises(RefusedAddress, match="refused: 10.0.0.1:80 resolves to non-public address 10.0.0.1"):
        _GuardedBackend(pol).connect_tcp("10.0.0.1", 80)
    assert retry_after_seconds("7") == 7 and retry_after_seconds("nonsense") is None
    assert 0 <= retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT") <= 1  # in the past: no wait


def test_private_address_refused_by_default(tmp_path, make_site):
    site = make_site()
    site.html("/", page(body="hello"))
    cfg = load([f"paths.root={tmp_path}", "source=crawl", f"source.seeds=['{site.base}/']", "source.delay=0"])
    with pytest.raises(Exception, match=r"skipped_private=1"):
        ingest.run(cfg)
    assert site.log == []  # refused before connecting, robots.txt included


# ------------------------------------------------------------------ concurrency and determinism


def fan_site(site: Site, n: int = 16, etag: bool = False) -> None:
    site.fixed("/robots.txt", 200, {"Content-Type": "text/plain"}, b"User-agent: *\nAllow: /\n")
    site.html("/", page(*[f"/p{i}.html" for i in range(n)]), etag=etag)
    for i in range(n):
        site.html(f"/p{i}.html", page(f"/p{(i + 1) % n}.html", body=f"page {i} " * 20), etag=etag)


def test_concurrent_crawl_is_bounded_per_host_and_deterministic(tmp_path, make_site):
    site = make_site()
    fan_site(site)
    site.latency = 0.05  # random per request: completion order differs between runs
    extra = ("source.concurrency=6", "source.per_host_concurrency=2", "source.incremental=false")
    s1 = ingest.run(crawl_cfg(tmp_path / "r1", site, *extra))
    assert site.max_active == 2
    site.max_active = 0
    ingest.run(crawl_cfg(tmp_path / "r2", site, *extra))
    a, b = (parquet_files(tmp_path / r / "data" / "raw") for r in ("r1", "r2"))
    assert [f.read_bytes() for f in a] == [f.read_bytes() for f in b]
    assert s1["docs_out"] == 17 and [r["url"] for r in rows_of(tmp_path / "r1")][:3] == [
        f"{site.base}/", f"{site.base}/p0.html", f"{site.base}/p1.html"]


# ------------------------------------------------------------------ WARC archive and replay


def test_crawl_writes_warc_that_replays_through_the_warc_source(tmp_path, hostile_site):
    site = hostile_site
    site.routes["/robots.txt"] = lambda h, n: (200, {"Content-Type": "text/plain"}, b"User-agent: *\nDisallow: /private\n")
    crawled = ingest.run(crawl_cfg(tmp_path / "c", site, "source.max_bytes=2000", "source.retries=0"))
    warcs = sorted((tmp_path / "c" / "data" / "warc" / "crawl").glob("*.warc.gz"))
    assert [w.name for w in warcs] == ["crawl-run00001.warc.gz"] and crawled["warc_file"] == str(warcs[0])
    replay = ingest.run(
        load([f"paths.root={tmp_path / 'w'}", "source=warc", f"source.paths=['{warcs[0]}']"])
    )
    crawl_rows = rows_of(tmp_path / "c")
    warc_rows = rows_of(tmp_path / "w")
    assert [(r["url"], r["id"]) for r in warc_rows] == [(r["url"], r["id"]) for r in crawl_rows]
    for r in warc_rows:
        assert r["source_file"] == str(warcs[0]) and r["warc_type"] == "response" and r["http_status"] == 200
        assert r["warc_record_id"].startswith("<urn:uuid:") and r["source_offset"] > 0
    # the 404, the 500, the 429 and the redirects were archived too, and skipped on replay
    st = replay["statuses"]
    assert st["read"] == len(crawl_rows) and st["skipped_http_status"] >= 12 and st["skipped_warcinfo"] == 1


# ------------------------------------------------------------------ incremental crawl


def test_incremental_rerun_sends_conditional_requests_and_emits_only_changes(tmp_path, make_site):
    site = make_site()
    site.fixed("/robots.txt", 200, {"Content-Type": "text/plain"}, b"User-agent: *\nAllow: /\n")
    lm = "Wed, 21 Oct 2015 07:28:00 GMT"
    site.html("/", page("/a.html", "/b.html", "/c.html", "/d.html"), etag=True)
    site.html("/a.html", page("/e.html", body="a"), etag=True)
    site.html("/b.html", page(body="b"), etag=True)
    site.html("/c.html", page(body="c"))  # no validators: refetched, compared by content
    site.html("/d.html", page(body="d"), last_modified=lm)
    site.html("/e.html", page(body="e, only reachable through a"), etag=True)
    first = ingest.run(crawl_cfg(tmp_path, site))
    assert first["statuses"]["fetched"] == 6 and first["crawl_run"] == 1
    site.log.clear()
    site.routes_content["/b.html"] = page(body="b, edited")
    site.html("/new.html", page(body="new"), etag=True)
    site.routes_content["/"] = page("/a.html", "/b.html", "/c.html", "/d.html", "/new.html")
    second = ingest.run(crawl_cfg(tmp_path, site))
    assert second["crawl_run"] == 2
    assert second["statuses"] == {"fetched": 3, "not_modified": 3, "unchanged": 1}, second["statuses"]
    assert [r["url"] for r in rows_of(tmp_path)] == [f"{site.base}/", f"{site.base}/b.html", f"{site.base}/new.html"]
    sent = {p: h for _, p, h in site.log}
    assert sent["/a.html"].get("If-None-Match") and sent["/d.html"].get("If-Modified-Since") == lm
    assert "/e.html" in sent  # discovered again through a's stored links, although a answered 304
    third = ingest.run(crawl_cfg(tmp_path, site))
    assert third["docs_out"] == 0 and third["statuses"]["not_modified"] == 6  # empty but valid output
    assert pq.read_table(parquet_files(tmp_path / "data" / "raw")[0]).num_rows == 0


def kill_crawl_after(site, args: list[str], pages: int) -> None:
    """Run `pipeline ingest` with `args` in a subprocess and SIGKILL it once the site has
    served `pages` of its /p pages."""
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "ingest", *args], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while sum(p.startswith("/p") for p in site.requested()) < pages:
            assert proc.poll() is None and time.monotonic() < deadline, "crawler ended before it could be killed"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()


def test_killed_crawl_resumes_without_refetching(tmp_path, make_site):
    site = make_site()
    fan_site(site, n=24)
    args = [
        f"paths.root={tmp_path}", "source=crawl", f"source.seeds=['{site.base}/']",
        f"source.allow_private=['127.0.0.1:{site.port}']", "source.concurrency=2",
    ]
    kill_crawl_after(site, [*args, "source.delay=0.12"], pages=8)
    db = sqlite3.connect(tmp_path / "data" / "crawl_state" / "state.sqlite")
    done = {r[0] for r in db.execute("SELECT url FROM frontier WHERE status = 'fetched'")}
    db.close()
    assert len(done) >= 6
    before = len(site.log)
    summary = ingest.run(load([*args, "source.delay=0"]))
    again = {f"{site.base}{p}" for p in site.requested()[before:]}
    assert not (again & done), sorted(again & done)
    assert summary["resumed"] is True and summary["crawl_run"] == 1
    urls = [r["url"] for r in rows_of(tmp_path)]
    assert urls == [f"{site.base}/", *[f"{site.base}/p{i}.html" for i in range(24)]]
    assert summary["statuses"]["fetched"] == 25
    # the archive continues the same WARC and holds each page exactly once
    from warcio.archiveiterator import ArchiveIterator

    with open(summary["warc_file"], "rb") as f:
        uris = [r.rec_headers.get_header("WARC-Target-URI") for r in ArchiveIterator(f) if r.rec_type == "response"]
    assert sorted(uris) == sorted(set(uris)) and len([u for u in uris if u.endswith(".html")]) == 24


def test_robots_rfc9309_redirects_and_server_errors(tmp_path, make_site):
    site = make_site()
    site.fixed("/robots.txt", 301, {"Location": "/real-robots.txt"})
    site.fixed("/real-robots.txt", 200, {"Content-Type": "text/plain"}, b"User-agent: *\nDisallow: /no\n")
    site.html("/", page("/yes.html", "/no.html"))
    site.html("/yes.html", page(body="yes"))
    summary = ingest.run(crawl_cfg(tmp_path / "a", site))
    assert summary["statuses"] == {"fetched": 2, "robots_disallowed": 1}
    assert summary["robots"][site.base] == "parsed"
    # a failing robots.txt means "disallow everything" until it answers
    down = make_site()
    down.fixed("/robots.txt", 503, {"Content-Type": "text/plain"}, b"busy")
    down.html("/", page(body="hidden"))
    with pytest.raises(Exception, match=r"robots_disallowed=1"):
        ingest.run(crawl_cfg(tmp_path / "b", down, "source.retries=0"))
    assert down.requested() == ["/robots.txt"]


def test_failed_run_with_nothing_to_resume_starts_afresh(tmp_path, make_site):
    site = make_site()
    site.fixed("/", 500, {"Content-Type": "text/html"}, b"down")
    with pytest.raises(Exception, match=r"error_http_500=1"):
        ingest.run(crawl_cfg(tmp_path, site, "source.retries=0"))
    site.html("/", page(body="back up"))
    summary = ingest.run(crawl_cfg(tmp_path, site))
    assert summary["resumed"] is False and summary["crawl_run"] == 2 and summary["docs_out"] == 1


def test_odd_links_never_stop_the_crawl(tmp_path, make_site):
    site = make_site()
    site.html("/", page("http://[::1", "javascript:void(0)", "/%zz", "/unicod\u00e9.html", "http://exa mple.invalid/",
                        f"http://127.0.0.1:{site.port}:99/x", "/ok.html"))
    site.html("/ok.html", page(body="ok"))
    summary = ingest.run(crawl_cfg(tmp_path, site))
    assert summary["statuses"]["fetched"] == 2 and [r["url"] for r in rows_of(tmp_path)][-1] == f"{site.base}/ok.html"
    # every link is accounted for: [::1 (bad URL), javascript:, two off-scope hosts, two 404s
    assert summary["statuses"] == {"fetched": 2, "skipped_bad_url": 1, "skipped_scheme": 1, "skipped_offsite": 2,
                                   "error_http_404": 2}


def test_one_crawl_per_state_at_a_time(tmp_path):
    from pipeline.core.errors import PipelineError
    from pipeline.sources.crawl_state import CrawlState

    first = CrawlState(tmp_path / "state.sqlite", "fp")
    with pytest.raises(PipelineError, match="is in use by another crawl"):
        CrawlState(tmp_path / "state.sqlite", "fp")
    first.close()
    CrawlState(tmp_path / "state.sqlite", "fp").close()


def test_archive_retention_keeps_the_newest(tmp_path):
    from pipeline.sources.crawl import _prune
    from pipeline.sources.warc_io import WarcArchive

    for stamp in ("20260101T000000000001Z", "20260102T000000000001Z", "20260103T000000000001Z"):
        (tmp_path / f"pydoc_site-{stamp}.warc.gz").write_bytes(b"")
    (tmp_path / "crawl-run00001.warc.gz").write_bytes(b"")  # another source's archive: untouched
    current = WarcArchive(tmp_path, "pydoc_site-20260104T000000000001Z.warc.gz")
    current.close()
    _prune(current, "pydoc_site", keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "crawl-run00001.warc.gz", "pydoc_site-20260103T000000000001Z.warc.gz", "pydoc_site-20260104T000000000001Z.warc.gz"]
