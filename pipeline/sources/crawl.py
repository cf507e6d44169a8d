"""The ``crawl`` source: seeds plus an allowlist, crawled politely into rows and a WARC archive.

The crawl state (``source.state_dir``) makes reruns incremental (conditional requests,
only new or changed pages are emitted) and lets a killed crawl resume; the archive
(``source.warc_dir``) gets every response whose body was read, one WARC per run, ready to
be replayed through the ``warc`` source.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from omegaconf import OmegaConf

from pipeline.core.errors import PipelineError
from pipeline.sources.crawl_state import CrawlState
from pipeline.sources.crawler import CrawlConfig, Crawler
from pipeline.sources.warc_io import WarcArchive


def _list(value) -> list:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return list(OmegaConf.to_container(value)) if OmegaConf.is_config(value) else list(value)


def crawl_config(source, seeds: list[str]) -> CrawlConfig:
    allow_private = source.get("allow_private", False)
    if OmegaConf.is_config(allow_private):
        allow_private = OmegaConf.to_container(allow_private)
    return CrawlConfig(
        seeds=seeds,
        allow=[str(a) for a in _list(source.get("allow"))],
        deny_urls=[str(a) for a in _list(source.get("deny_urls"))],
        max_pages=int(source.max_pages),
        max_depth=int(source.max_depth),
        max_bytes=int(source.max_bytes),
        timeout=float(source.timeout),
        delay=float(source.delay),
        user_agent=str(source.user_agent),
        skip_paths=[str(p) for p in _list(source.get("skip_paths"))],
        scrub=[str(p) for p in _list(source.get("scrub"))],
        content_types=[str(c).lower() for c in _list(source.get("content_types"))] or ["text/html"],
        allow_private=allow_private,
        max_redirects=int(source.get("max_redirects", 5)),
        retries=int(source.get("retries", 2)),
        backoff=float(source.get("backoff", 1.0)),
        max_retry_after=float(source.get("max_retry_after", 120)),
        concurrency=int(source.get("concurrency", 1)),
        per_host_concurrency=int(source.get("per_host_concurrency", 1)),
        respect_robots=bool(source.get("respect_robots", True)),
        conditional=bool(source.get("incremental", False)),
    )


def _archive(source, state: CrawlState, kind: str) -> WarcArchive | None:
    warc_dir = source.get("warc_dir")
    if not warc_dir:
        return None
    if state.resumed and state.warc.get("name"):
        name, end = state.warc["name"], int(state.warc.get("end", 0))
    else:
        now = time.time()
        stamp = (f"run{state.run:05d}" if state.durable
                 else time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + f"{int(now % 1 * 1e6):06d}Z")
        name, end = f"{kind}-{stamp}.warc.gz", None
    info = {"software": "pipeline-crawler", "format": "WARC File Format 1.1", "source": kind}
    return WarcArchive(Path(str(warc_dir)), name, truncate_to=end, info=info)


def _prune(archive: WarcArchive, kind: str, keep: int) -> None:
    """At commit: publish this run's archive under its final name, drop partial archives of
    runs that were killed and will not be resumed (the state has moved past them), and keep
    the newest ``keep`` archives of this source (0 keeps all)."""
    archive.finish()
    for p in archive.directory.glob(f".{kind}-*.warc.gz.partial"):
        p.unlink(missing_ok=True)
    if keep <= 0:
        return
    old = sorted(archive.directory.glob(f"{kind}-*.warc.gz"))[:-keep]
    for p in old:
        if p != archive.path:
            p.unlink(missing_ok=True)


def run_crawl(
    source,
    ctx,
    *,
    kind: str,
    seeds: list[str],
    state: CrawlState,
    canonical: Callable[[str], str] | None = None,
    deny: Callable[[str], str | None] | None = None,
    note_key: Callable[[str], str] = lambda origin: origin,
) -> Iterator[dict]:
    """Crawl and yield raw rows; counts, bytes and crawl facts go into ``ctx``."""
    ctx.on_close.append(state.close)  # also when the run fails: a retry must be able to take the lock
    archive = _archive(source, state, kind)
    crawler = Crawler(crawl_config(source, seeds), canonical=canonical, deny=deny, state=state, warc=archive)
    started = time.perf_counter()
    try:
        for page in crawler.crawl():
            yield {
                "id": page.id,
                "url": page.canonical,
                "source": kind,
                "content_type": page.content_type,
                "http_status": page.status,
                "html": page.html,
                "text": page.text,
            }
    finally:
        if archive is not None:
            archive.close()
        for status, n in state.counts.items():
            ctx.count(status, state.bytes.get(status, 0), n=n)
        ctx.extra.update(
            crawl_seconds=round(time.perf_counter() - started, 3),
            pages_fetched=state.counts.get("fetched", 0),
            bytes_fetched=state.bytes.get("fetched", 0),
            robots={note_key(k): v for k, v in sorted(crawler.robots_note.items())},
            crawl_run=state.run,
            resumed=state.resumed,
            warc_file=str(archive.path) if archive is not None else None,
            state_file=str(state.path) if state.durable else None,
        )

    def commit() -> None:
        state.finish()
        if archive is not None:
            _prune(archive, kind, int(source.get("warc_keep", 0) or 0))

    ctx.on_commit.append(commit)


def documents(source, ctx) -> Iterator[dict]:
    if OmegaConf.is_missing(source, "seeds") or not source.seeds:
        raise PipelineError("source=crawl needs source.seeds, e.g. source.seeds='[https://example.org/]'")
    seeds = [str(s) for s in _list(source.seeds)]
    state_dir = source.get("state_dir")
    fingerprint = hashlib.sha256(
        json.dumps({"seeds": seeds, "allow": [str(a) for a in _list(source.get("allow"))]}).encode()
    ).hexdigest()[:16]
    state = CrawlState(Path(str(state_dir)) / "state.sqlite" if state_dir else None, fingerprint)
    yield from run_crawl(source, ctx, kind="crawl", seeds=seeds, state=state)
