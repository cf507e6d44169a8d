"""A small polite breadth-first crawler: robots.txt, same-host scope, caps, deterministic order.

Pages are fetched one at a time in discovery order, so the same site gives the same pages
in the same order on every run. Every URL the crawler meets is either yielded as a page or
counted in ``stats`` under one status (``robots_disallowed``, ``skipped_<reason>``,
``error_<kind>``).
"""

from __future__ import annotations

import ipaddress
import re
import socket
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from urllib.parse import urldefrag, urljoin, urlsplit, urlunsplit

import httpx
import lxml.html
from lxml import etree
from protego import Protego


@dataclass
class CrawlConfig:
    seeds: list[str]
    max_pages: int = 100
    max_depth: int = 3
    max_bytes: int = 2_000_000
    timeout: float = 30.0
    delay: float = 0.0
    user_agent: str = "pipeline-crawler/0.1"
    skip_paths: list[str] = field(default_factory=list)
    scrub: list[str] = field(default_factory=list)
    content_types: list[str] = field(default_factory=lambda: ["text/html", "application/xhtml+xml"])
    allow_private: bool = False


@dataclass
class Page:
    url: str  # the URL as fetched
    canonical: str  # the URL as stored (see Crawler.canonical)
    depth: int
    status: int
    content_type: str
    html: str
    nbytes: int


def normalize_url(url: str) -> str:
    """Drop the fragment, lowercase scheme and host, give an empty path '/'."""
    url, _ = urldefrag(url.strip())
    parts = urlsplit(url)
    path = parts.path or "/"
    return urlunsplit((parts.scheme.lower(), parts.netloc.lower(), path, parts.query, ""))


def extract_links(html: str, base_url: str) -> list[str]:
    """Absolute hyperlink targets (<a>/<area> href) in document order, honouring <base href>."""
    try:
        doc = lxml.html.document_fromstring(html)
    except (etree.ParserError, ValueError):
        try:
            doc = lxml.html.document_fromstring(html.encode("utf-8", "replace"))
        except (etree.ParserError, ValueError):
            return []
    base = doc.xpath("string(//base/@href)") or base_url
    base = urljoin(base_url, base)
    links = []
    for href in doc.xpath("//a/@href | //area/@href"):
        href = str(href).strip()
        if href and not href.startswith("#"):
            links.append(urljoin(base, href))
    return links


def _is_private_host(host: str) -> bool:
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    for info in infos:
        ip = ipaddress.ip_address(info[4][0].split("%")[0])
        if ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_reserved:
            return True
    return False


class Crawler:
    """BFS over one site; ``deny(url) -> reason | None`` and ``canonical(url)`` are hooks for sources."""

    def __init__(
        self,
        config: CrawlConfig,
        *,
        canonical: Callable[[str], str] | None = None,
        deny: Callable[[str], str | None] | None = None,
        client: httpx.Client | None = None,
    ) -> None:
        self.cfg = config
        self.canonical = canonical or (lambda u: u)
        self.deny = deny or (lambda u: None)
        self.client = client
        self.stats: Counter[str] = Counter()
        self.bytes = 0
        self.robots_note: dict[str, str] = {}
        self._robots: dict[str, Protego | None] = {}
        self._hosts = {urlsplit(normalize_url(s)).netloc for s in config.seeds}
        self._scrub = [re.compile(p) for p in config.scrub]
        self._last_fetch: float | None = None
        self._private_ok: dict[str, bool] = {}

    # ------------------------------------------------------------ scope and politeness

    def _skip_reason(self, url: str) -> str | None:
        """Why a discovered URL is not fetched (a status name), or None to fetch it."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https"):
            return "skipped_scheme"
        if parts.netloc not in self._hosts:
            return "skipped_offsite"
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        if any(target.startswith(p) for p in self.cfg.skip_paths):
            return "skipped_path"
        if not self.cfg.allow_private:
            host = parts.hostname or ""
            if host not in self._private_ok:
                self._private_ok[host] = not _is_private_host(host)
            if not self._private_ok[host]:
                return "skipped_private"
        if (reason := self.deny(url)) is not None:
            return f"skipped_{reason}"
        if not self._allowed_by_robots(url):
            return "robots_disallowed"
        return None

    def _allowed_by_robots(self, url: str) -> bool:
        parts = urlsplit(url)
        origin = f"{parts.scheme}://{parts.netloc}"
        if origin not in self._robots:
            self._robots[origin] = self._fetch_robots(origin)
        robots = self._robots[origin]
        return robots is None or robots.can_fetch(url, self.cfg.user_agent)

    def _fetch_robots(self, origin: str) -> Protego | None:
        """robots.txt as a parser, or None (allow all) when the site has no plain-text robots.txt."""
        url = f"{origin}/robots.txt"
        try:
            self._wait()
            r = self.client.get(url, timeout=self.cfg.timeout)
        except httpx.HTTPError as e:
            self.robots_note[origin] = f"allow-all ({type(e).__name__} fetching robots.txt)"
            return None
        ctype = r.headers.get("content-type", "").split(";")[0].strip().lower()
        if r.status_code != 200 or ctype != "text/plain":
            self.robots_note[origin] = f"allow-all (robots.txt answered {r.status_code} {ctype or 'no content-type'})"
            return None
        self.robots_note[origin] = "parsed"
        return Protego.parse(r.text)

    def _wait(self) -> None:
        delay = float(self.cfg.delay)
        for robots in self._robots.values():
            if robots is not None and (cd := robots.crawl_delay(self.cfg.user_agent)):
                delay = max(delay, float(cd))
        if self._last_fetch is not None and delay > 0:
            remaining = self._last_fetch + delay - time.monotonic()
            if remaining > 0:
                time.sleep(remaining)
        self._last_fetch = time.monotonic()

    # ------------------------------------------------------------ fetching

    def _fetch(self, url: str, depth: int) -> tuple[str, Page | str | None]:
        """(status, page | redirect target | None) for one URL."""
        self._wait()
        try:
            with self.client.stream("GET", url, timeout=self.cfg.timeout) as r:
                if r.is_redirect:
                    return "redirected", r.headers.get("location")
                if r.status_code != 200:
                    return f"error_http_{r.status_code}", None
                ctype = r.headers.get("content-type", "")
                if ctype.split(";")[0].strip().lower() not in self.cfg.content_types:
                    return "skipped_content_type", None
                length = r.headers.get("content-length")
                if length and length.isdigit() and int(length) > self.cfg.max_bytes:
                    return "skipped_too_large", None
                body = bytearray()
                for chunk in r.iter_bytes():
                    body += chunk
                    if len(body) > self.cfg.max_bytes:
                        return "skipped_too_large", None
                encoding = r.charset_encoding or "utf-8"
        except httpx.TimeoutException:
            return "error_timeout", None
        except httpx.ConnectError:
            return "error_connect", None
        except httpx.HTTPError as e:
            return f"error_{type(e).__name__}", None
        try:
            html = bytes(body).decode(encoding, errors="replace")
        except LookupError:
            html = bytes(body).decode("utf-8", errors="replace")
        for pattern in self._scrub:
            html = pattern.sub("", html)
        page = Page(url, self.canonical(url), depth, r.status_code, ctype, html, len(body))
        return "fetched", page

    def crawl(self) -> Iterator[Page]:
        """Yield fetched HTML pages in BFS (discovery) order until the caps are reached."""
        own_client = self.client is None
        if own_client:
            self.client = httpx.Client(headers={"User-Agent": self.cfg.user_agent}, follow_redirects=False)
        try:
            yield from self._bfs()
        finally:
            if own_client:
                self.client.close()
                self.client = None

    def _bfs(self) -> Iterator[Page]:
        queue: deque[tuple[str, int]] = deque()
        seen: set[str] = set()

        def discover(url: str, depth: int) -> None:
            url = normalize_url(url)
            if url in seen:
                return
            seen.add(url)
            if depth > self.cfg.max_depth:
                self.stats["skipped_max_depth"] += 1
            elif (reason := self._skip_reason(url)) is not None:
                self.stats[reason] += 1
            else:
                queue.append((url, depth))

        for seed in self.cfg.seeds:
            discover(seed, 0)
        attempts = 0
        while queue:
            if attempts >= self.cfg.max_pages:
                self.stats["skipped_max_pages"] += len(queue)
                break
            url, depth = queue.popleft()
            attempts += 1
            status, result = self._fetch(url, depth)
            self.stats[status] += 1
            if status == "redirected" and result:
                discover(urljoin(url, result), depth)
            elif isinstance(result, Page):
                self.bytes += result.nbytes
                yield result
                for link in extract_links(result.html, url):
                    discover(link, depth + 1)
