"""Crawler limits tests/test_crawl.py does not reach, against a live local server: a body
dripped slowly enough that no single read times out, and a gzip bomb.

The rest of crawler safety (allowlist, robots.txt, private/loopback/link-local addresses
after redirects and DNS, size cap, redirect loops) is tested in tests/test_crawl.py; the
README's Reliability table names those tests.
"""

from __future__ import annotations

import gzip
import logging
import time

from pipeline.stages import ingest
from tests.test_crawl import crawl_cfg, make_site, page, rows_of  # noqa: F401 - make_site is a fixture


def drip(handler, n):
    """Headers at once, then 20 bytes every 0.1 s for up to 30 s: each read is quick."""
    handler.send_response(200)
    handler.send_header("Content-Type", "text/html")
    handler.send_header("Content-Length", "6000")
    handler.end_headers()
    end = time.monotonic() + 30
    while time.monotonic() < end:
        handler.wfile.write(b"x" * 20)
        handler.wfile.flush()
        time.sleep(0.1)
    raise ConnectionAbortedError("drip over")  # the response was written here, not by the Site


def test_slow_drip_body_is_cut_at_the_total_time_cap(tmp_path, make_site, caplog):
    site = make_site()
    site.html("/", page("/slow.html", "/ok.html"))
    site.html("/ok.html", page(body="fine"))
    site.routes["/slow.html"] = drip
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="pipeline.stages.ingest"):
        summary = ingest.run(crawl_cfg(tmp_path, site, "source.timeout=1", "source.retries=0"))
    assert time.monotonic() - start < 15  # not the 30 s the server would take
    assert summary["statuses"]["error_timeout"] == 1
    assert sorted(r["url"].rsplit("/", 1)[1] for r in rows_of(tmp_path)) == ["", "ok.html"]
    assert f"{site.base}/slow.html" in caplog.text and "total time is capped" in caplog.text


def test_gzip_bomb_response_is_capped_after_decoding(tmp_path, make_site):
    site = make_site()
    bomb = gzip.compress(b"<html>" + b" " * (64 << 20), compresslevel=9, mtime=0)  # 64 MiB from ~64 KiB
    site.html("/", page("/bomb.html", "/ok.html"))
    site.html("/ok.html", page(body="fine"))
    site.fixed("/bomb.html", 200, {"Content-Type": "text/html", "Content-Encoding": "gzip"}, bomb)
    summary = ingest.run(crawl_cfg(tmp_path, site, "source.max_bytes=100000", "source.retries=0"))
    assert summary["statuses"]["skipped_too_large"] == 1
    assert sorted(r["url"].rsplit("/", 1)[1] for r in rows_of(tmp_path)) == ["", "ok.html"]


def test_a_killed_crawl_never_leaves_a_finished_looking_archive(tmp_path, make_site):
    """SIGKILL mid-crawl: the WARC written so far is `.crawl-run00001.warc.gz.partial`, which a
    `*.warc.gz` replay glob does not match; the resumed run publishes it under its final name."""
    from pipeline.core.config import load
    from tests.test_crawl import fan_site, kill_crawl_after

    site = make_site()
    fan_site(site, n=24)
    args = [f"paths.root={tmp_path}", "source=crawl", f"source.seeds=['{site.base}/']",
            f"source.allow_private=['127.0.0.1:{site.port}']"]
    kill_crawl_after(site, [*args, "source.delay=0.1"], pages=5)
    warc_dir = tmp_path / "data" / "warc" / "crawl"
    assert list(warc_dir.glob("*.warc.gz")) == []
    assert [p.name for p in warc_dir.iterdir()] == [".crawl-run00001.warc.gz.partial"]
    assert not (tmp_path / "data" / "raw").exists()
    summary = ingest.run(load([*args, "source.delay=0"]))
    assert summary["resumed"] is True
    assert [p.name for p in warc_dir.iterdir()] == ["crawl-run00001.warc.gz"]
    assert summary["warc_file"] == str(warc_dir / "crawl-run00001.warc.gz")
