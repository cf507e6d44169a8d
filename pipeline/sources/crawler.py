"""A polite web crawler: robots.txt, scope, private-address guard, retries, WARC, resumable state.

Fetches run concurrently (a thread pool, bounded per host), but results are *processed* one
at a time in frontier order: links are discovered, caps applied and pages yielded in the
same order on every run, whatever the network timing. That is what makes the output of a
crawl of an unchanged site byte-identical, and what makes the persisted state (frontier,
seen URLs, ETag/Last-Modified, see :mod:`pipeline.sources.crawl_state`) a clean prefix of
the crawl that a killed run resumes from.

Every URL the crawler meets is either yielded as a page or counted under one status:
``fetched``, ``not_modified`` (304 to a conditional request), ``unchanged`` (same content as
last run), ``redirected``, ``robots_disallowed``, ``skipped_<reason>`` or ``error_<kind>``.
"""

from __future__ import annotations

import email.utils
import fnmatch
import ipaddress
import logging
import re
import socket
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from urllib.parse import urldefrag, urljoin, urlsplit, urlunsplit

import httpcore
import httpx
import lxml.html
from lxml import etree
from protego import Protego

from pipeline.core.artifacts import doc_id
from pipeline.sources.crawl_state import CrawlState, Page

log = logging.getLogger("pipeline.stages.ingest")

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
_DISALLOW_ALL = Protego.parse("User-agent: *\nDisallow: /\n")
HTML_TYPES = ("text/html", "application/xhtml+xml")


@dataclass
class CrawlConfig:
    seeds: list[str]
    # scope: "host", "host:port", "*.example.org" (netloc patterns) or URL patterns with "://";
    # empty means the seeds' hosts
    allow: list[str] = field(default_factory=list)
    deny_urls: list[str] = field(default_factory=list)  # URL fnmatch patterns never fetched
    max_pages: int = 100
    max_depth: int = 3
    max_bytes: int = 2_000_000
    timeout: float = 30.0
    delay: float = 0.0  # seconds between two requests to one host (robots crawl-delay wins if larger)
    user_agent: str = "pipeline-crawler/0.1"
    skip_paths: list[str] = field(default_factory=list)  # path prefixes never fetched
    scrub: list[str] = field(default_factory=list)  # regexes removed from fetched HTML
    content_types: list[str] = field(default_factory=lambda: list(HTML_TYPES))
    # False: refuse every non-global address; True: allow all; or a list of exceptions:
    # "host:port" / "host" (the URL's host as written), an IP or CIDR, or "loopback"
    allow_private: bool | str | list = False
    max_redirects: int = 5
    retries: int = 2  # extra attempts on 429/5xx/timeouts/connection errors
    backoff: float = 1.0  # first retry waits this long, doubling each time (unless Retry-After says)
    max_retry_after: float = 120.0  # a longer Retry-After gives up instead of waiting
    concurrency: int = 1  # requests in flight in total
    per_host_concurrency: int = 1
    respect_robots: bool = True
    conditional: bool = False  # send If-None-Match/If-Modified-Since from the state, skip unchanged


@dataclass
class Fetch:
    """What one worker brings back for one URL (all network I/O happens in workers)."""

    status: str  # a crawl status name
    http_status: int | None = None
    reason: str = ""
    http_version: str = "HTTP/1.1"
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes | None = None  # None: not read (skipped, error)
    location: str | None = None
    message: str = ""
    encoding: str | None = None


_DEFAULT_PORTS = {"http": ":80", "https": ":443"}


def normalize_url(url: str) -> str:
    """Drop the fragment and a default port, lowercase scheme and host, give an empty path '/'."""
    url, _ = urldefrag(url.strip())
    parts = urlsplit(url)
    scheme, netloc = parts.scheme.lower(), parts.netloc.lower()
    default = _DEFAULT_PORTS.get(scheme)
    if default and netloc.endswith(default) and "@" not in netloc:
        netloc = netloc[: -len(default)]
    return urlunsplit((scheme, netloc, parts.path or "/", parts.query, ""))


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
            try:
                links.append(urljoin(base, href))
            except ValueError:  # e.g. an invalid IPv6 literal: kept, so the crawler counts it as a bad URL
                links.append(href)
    return links


def effective_port(parts) -> int:
    try:
        port = parts.port
    except ValueError:
        port = None
    return port or (443 if parts.scheme == "https" else 80)


# ---------------------------------------------------------------- private addresses


class RefusedAddress(httpcore.ConnectError):
    """Raised inside the connection layer: httpx turns it into a ConnectError with our message."""


class AddressPolicy:
    """Which destinations may be connected to; a refusal never opens a socket.

    Private, loopback, link-local and other non-global addresses are refused unless
    ``allow_private`` is True or lists an exception. A "host:port" or "host" exception
    matches the host as written in the URL (so allowing ``127.0.0.1:8000`` does not allow
    ``localhost:8000``); an IP/CIDR exception or ``loopback`` matches the resolved address.
    """

    def __init__(self, allow_private: bool | str | list) -> None:
        self.allow_all = allow_private is True or (isinstance(allow_private, str) and allow_private == "all")
        entries = [] if isinstance(allow_private, bool) or allow_private is None else allow_private
        if isinstance(entries, str):
            entries = [entries]
        self.hosts: set[tuple[str, int | None]] = set()
        self.networks: list = []
        self.loopback = False
        for raw in entries:
            entry = str(raw).strip().lower()
            if entry == "loopback":
                self.loopback = True
                continue
            try:
                self.networks.append(ipaddress.ip_network(entry, strict=False))
                continue
            except ValueError:
                pass
            host, sep, port = entry.rpartition(":")
            if sep and port.isdigit() and not host.endswith(":"):
                self.hosts.add((host.strip("[]"), int(port)))
            else:
                self.hosts.add((entry.strip("[]"), None))
        self._cache: dict[tuple[str, int], list[str]] = {}
        self._lock = threading.Lock()

    @staticmethod
    def is_public(ip) -> bool:
        if getattr(ip, "ipv4_mapped", None):
            ip = ip.ipv4_mapped
        return ip.is_global and not ip.is_multicast

    def resolve(self, host: str, port: int) -> list[str]:
        """Addresses for host (an IP literal is its own address); cached per run."""
        host = host.strip("[]")
        try:
            return [str(ipaddress.ip_address(host))]
        except ValueError:
            pass
        key = (host, port)
        with self._lock:
            if key in self._cache:
                return self._cache[key]
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        addrs = list(dict.fromkeys(info[4][0].split("%")[0] for info in infos))
        with self._lock:
            self._cache[key] = addrs
        return addrs

    def _excepted(self, host: str, port: int, ip) -> bool:
        if (host, port) in self.hosts or (host, None) in self.hosts:
            return True
        if self.loopback and ip.is_loopback:
            return True
        return any(ip in net for net in self.networks if net.version == ip.version)

    def check(self, host: str, port: int) -> tuple[str | None, str]:
        """(address to connect to, or None when refused; a reason when refused)."""
        host = host.lower().strip("[]")
        addrs = self.resolve(host, port)
        if not addrs:
            return None, f"{host} has no address"
        if self.allow_all:
            return addrs[0], ""
        for a in addrs:
            ip = ipaddress.ip_address(a)
            if not self.is_public(ip) and not self._excepted(host, port, ip):
                return None, f"refused: {host}:{port} resolves to non-public address {a}"
        return addrs[0], ""


class _GuardedBackend(httpcore.SyncBackend):
    """Checks (and pins) the address at connect time too: a redirect or a DNS answer that
    changed since discovery still cannot reach a refused address."""

    def __init__(self, policy: AddressPolicy) -> None:
        self.policy = policy

    def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
        try:
            addr, why = self.policy.check(host, port)
        except (OSError, ValueError) as e:
            raise httpcore.ConnectError(f"dns: {host}: {e}") from e
        if addr is None:
            raise RefusedAddress(why)
        return super().connect_tcp(addr, port, timeout, local_address, socket_options)


def guarded_client(cfg: CrawlConfig, policy: AddressPolicy) -> httpx.Client:
    """An httpx client that never follows redirects itself and checks every connection."""
    limits = httpx.Limits(max_connections=max(1, cfg.concurrency), max_keepalive_connections=max(1, cfg.concurrency))
    transport = httpx.HTTPTransport(limits=limits)
    if not hasattr(transport, "_pool") or not hasattr(transport._pool, "_network_backend"):
        raise RuntimeError("httpx/httpcore layout changed: cannot install the private-address guard")
    transport._pool._network_backend = _GuardedBackend(policy)
    # trust_env=False: an environment proxy would hide the real destination from the guard
    return httpx.Client(
        headers={"User-Agent": cfg.user_agent}, follow_redirects=False, transport=transport, trust_env=False
    )


# ---------------------------------------------------------------- politeness


class _HostSlots:
    """Per-host concurrency and spacing: request starts to one host are ``delay`` apart."""

    def __init__(self, concurrency: int) -> None:
        self.concurrency = max(1, concurrency)
        self._lock = threading.Lock()
        self._hosts: dict[str, tuple[threading.Semaphore, list[float]]] = {}

    def _get(self, host: str):
        with self._lock:
            if host not in self._hosts:
                self._hosts[host] = (threading.Semaphore(self.concurrency), [0.0])
            return self._hosts[host]

    def acquire(self, host: str, delay: float) -> None:
        sem, nxt = self._get(host)
        sem.acquire()
        with self._lock:
            now = time.monotonic()
            start = max(now, nxt[0])
            nxt[0] = start + delay
        if start > now:
            time.sleep(start - now)

    def release(self, host: str) -> None:
        self._get(host)[0].release()

    def hold_off(self, host: str, seconds: float) -> None:
        """No request to host before ``seconds`` from now (Retry-After applies to the host)."""
        _, nxt = self._get(host)
        with self._lock:
            nxt[0] = max(nxt[0], time.monotonic() + seconds)


def retry_after_seconds(value: str | None) -> float | None:
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


# ---------------------------------------------------------------- the crawler


class Crawler:
    """BFS from the seeds within scope; ``deny(url) -> reason | None`` and ``canonical(url)`` are source hooks.

    ``state`` (a :class:`~pipeline.sources.crawl_state.CrawlState`) persists the frontier and
    validators; ``warc`` (a :class:`~pipeline.sources.warc_io.WarcArchive`) receives every
    response whose body was read.
    """

    def __init__(
        self,
        config: CrawlConfig,
        *,
        canonical: Callable[[str], str] | None = None,
        deny: Callable[[str], str | None] | None = None,
        client: httpx.Client | None = None,
        state=None,
        warc=None,
    ) -> None:
        self.cfg = config
        self.canonical = canonical or (lambda u: u)
        self.deny = deny or (lambda u: None)
        self.client = client
        self.state = state if state is not None else CrawlState(None)
        self.warc = warc
        self.policy = AddressPolicy(config.allow_private)
        self.robots_note: dict[str, str] = {}
        self._robots: dict[str, Protego | None] = {}
        self._scrub = [re.compile(p) for p in config.scrub]
        self._slots = _HostSlots(config.per_host_concurrency)
        self._private_ok: dict[tuple[str, int], str | None] = {}
        allow = [str(a).lower() for a in config.allow] or sorted({urlsplit(normalize_url(s)).netloc for s in config.seeds})
        self._allow_urls = [a for a in allow if "://" in a]
        self._allow_hosts = [a for a in allow if "://" not in a]

    @property
    def stats(self) -> Counter:
        return self.state.counts

    @property
    def bytes(self) -> int:
        return self.state.bytes.get("fetched", 0)

    # ------------------------------------------------------------ scope and politeness

    def in_scope(self, url: str) -> bool:
        parts = urlsplit(url)
        netloc = parts.netloc
        host_port = f"{parts.hostname or ''}:{effective_port(parts)}"
        if any(fnmatch.fnmatchcase(netloc, p) or fnmatch.fnmatchcase(host_port, p) for p in self._allow_hosts):
            return True
        return any(fnmatch.fnmatchcase(url, p) for p in self._allow_urls)

    def _private_reason(self, url: str) -> str | None:
        parts = urlsplit(url)
        key = ((parts.hostname or "").lower(), effective_port(parts))
        if key not in self._private_ok:
            try:
                addr, why = self.policy.check(*key)
                self._private_ok[key] = None if addr else "skipped_private"
            except (OSError, ValueError):  # no answer, or a name IDNA cannot encode
                self._private_ok[key] = "error_dns"
            if self._private_ok[key]:
                log.info("crawl: %s: %s", key, why if self._private_ok[key] == "skipped_private" else "no DNS answer")
        return self._private_ok[key]

    def _skip_reason(self, url: str) -> str | None:
        """Why a discovered URL is not fetched (a status name), or None to fetch it."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            return "skipped_scheme"
        if not self.in_scope(url):
            return "skipped_offsite"
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        if any(target.startswith(p) for p in self.cfg.skip_paths):
            return "skipped_path"
        if any(fnmatch.fnmatchcase(url, p) for p in self.cfg.deny_urls):
            return "skipped_deny"
        if (reason := self.deny(url)) is not None:
            return f"skipped_{reason}"
        # before robots: robots.txt is fetched from the host, so the host must pass first
        if (reason := self._private_reason(url)) is not None:
            return reason
        if self.cfg.respect_robots and not self._allowed_by_robots(url):
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
        """robots.txt as a parser, or None (allow all), following RFC 9309.

        Up to 5 redirects are followed; a 4xx (or a body that is not plain text, as pydoc's
        HTML answer) means no rules; a 5xx, 429 or an unreachable server means disallow all,
        since the site may be down or overloaded and we cannot know what it forbids.
        """
        url = f"{origin}/robots.txt"
        for _ in range(6):
            host = urlsplit(url).netloc
            self._slots.acquire(host, self.cfg.delay)
            try:
                r = self.client.get(url, timeout=self.cfg.timeout)
            except (httpx.HTTPError, httpx.InvalidURL, ValueError) as e:
                self.robots_note[origin] = f"disallow-all ({type(e).__name__} fetching robots.txt)"
                return _DISALLOW_ALL
            finally:
                self._slots.release(host)
            location = r.headers.get("location")
            if r.status_code in (301, 302, 303, 307, 308) and location:
                url = urljoin(url, location)
                continue
            break
        if r.status_code >= 500 or r.status_code == 429:
            self.robots_note[origin] = f"disallow-all (robots.txt answered {r.status_code})"
            return _DISALLOW_ALL
        ctype = r.headers.get("content-type", "").split(";")[0].strip().lower()
        if r.status_code != 200 or ctype not in ("text/plain", ""):
            self.robots_note[origin] = f"allow-all (robots.txt answered {r.status_code} {ctype or 'no content-type'})"
            return None
        self.robots_note[origin] = "parsed"
        return Protego.parse(r.text)

    def host_delay(self, url: str) -> float:
        parts = urlsplit(url)
        delay = float(self.cfg.delay)
        robots = self._robots.get(f"{parts.scheme}://{parts.netloc}")
        if robots is not None and (cd := robots.crawl_delay(self.cfg.user_agent)):
            delay = max(delay, float(cd))
        return delay

    # ------------------------------------------------------------ fetching (worker threads)

    def _fetch(self, url: str, validators: dict, delay: float) -> Fetch:
        host = urlsplit(url).netloc
        headers = {}
        if self.cfg.conditional:
            if validators.get("etag"):
                headers["If-None-Match"] = validators["etag"]
            if validators.get("last_modified"):
                headers["If-Modified-Since"] = validators["last_modified"]
        attempt = 0
        while True:
            self._slots.acquire(host, delay)
            try:
                result = self._fetch_once(url, headers)
            finally:
                self._slots.release(host)
            retryable = result.http_status in RETRY_STATUSES or result.status in ("error_timeout", "error_connect")
            if not retryable or attempt >= self.cfg.retries:
                return result
            wait = self.cfg.backoff * (2**attempt)
            after = retry_after_seconds({k.lower(): v for k, v in result.headers}.get("retry-after"))
            if after is not None:
                if after > self.cfg.max_retry_after:
                    result.message = f"Retry-After {after:g}s > max_retry_after {self.cfg.max_retry_after:g}s"
                    return result
                wait = max(wait, after) if result.http_status == 429 else after
            self._slots.hold_off(host, wait)
            attempt += 1

    def _fetch_once(self, url: str, headers: dict) -> Fetch:
        # httpx's timeout bounds each read, not the response: a server dripping a byte at a time
        # would hold a fetch forever, so the whole body must also arrive within `timeout`
        deadline = time.monotonic() + self.cfg.timeout
        try:
            with self.client.stream("GET", url, headers=headers, timeout=self.cfg.timeout) as r:
                out = Fetch(
                    status="",
                    http_status=r.status_code,
                    reason=r.reason_phrase,
                    http_version=r.http_version,
                    headers=[(k.decode("latin-1"), v.decode("latin-1")) for k, v in r.headers.raw],
                    encoding=r.charset_encoding,
                )
                lower = {k.lower(): v for k, v in out.headers}
                if r.status_code == 304:
                    out.status = "not_modified"
                elif r.status_code in (301, 302, 303, 307, 308):
                    out.status, out.location = "redirected", lower.get("location")
                elif r.status_code != 200:
                    out.status = f"error_http_{r.status_code}"
                else:
                    ctype = lower.get("content-type", "").split(";")[0].strip().lower()
                    if ctype not in self.cfg.content_types:
                        out.status = "skipped_content_type"
                        return out
                    out.status = "fetched"
                length = lower.get("content-length", "")
                if length.isdigit() and int(length) > self.cfg.max_bytes:
                    out.status = "skipped_too_large" if out.status == "fetched" else out.status
                    return out
                body = bytearray()
                for chunk in r.iter_bytes():
                    body += chunk
                    if len(body) > self.cfg.max_bytes:
                        if out.status == "fetched":
                            out.status = "skipped_too_large"
                        return out
                    if time.monotonic() > deadline:
                        return Fetch(status="error_timeout", message=f"{url}: body not complete after "
                                     f"{self.cfg.timeout}s ({len(body)} bytes so far); total time is capped by timeout")
                out.body = bytes(body)
                return out
        except RefusedAddress as e:
            return Fetch(status="skipped_private", message=str(e))
        except httpx.TimeoutException as e:
            return Fetch(status="error_timeout", message=str(e) or type(e).__name__)
        except httpx.ConnectError as e:
            if str(e).startswith("refused:"):
                return Fetch(status="skipped_private", message=str(e))
            return Fetch(status="error_connect", message=str(e))
        except httpx.HTTPError as e:
            return Fetch(status=f"error_{type(e).__name__}", message=str(e))
        except (httpx.InvalidURL, ValueError) as e:  # e.g. a URL httpx cannot encode
            return Fetch(status="error_invalid_url", message=str(e))

    # ------------------------------------------------------------ processing (main thread, in order)

    def _decode(self, body: bytes, encoding: str | None) -> str:
        try:
            text = body.decode(encoding or "utf-8", errors="replace")
        except LookupError:
            text = body.decode("utf-8", errors="replace")
        for pattern in self._scrub:
            text = pattern.sub("", text)
        return text

    def crawl(self) -> Iterator[Page]:
        """Yield pages in frontier (BFS discovery) order until the frontier or the caps run out."""
        own_client = self.client is None
        if own_client:
            self.client = guarded_client(self.cfg, self.policy)
        pool = ThreadPoolExecutor(max_workers=max(1, self.cfg.concurrency), thread_name_prefix="crawl")
        try:
            yield from self.state.replay_pages()  # pages a killed run had already fetched
            yield from self._bfs(pool)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            if own_client:
                self.client.close()
                self.client = None

    def _discover(self, url: str, depth: int, chain: tuple[str, ...] = ()) -> str | None:
        """Add url to the frontier or record why not; returns the status of a new URL, None if seen."""
        try:
            url = normalize_url(url)
        except ValueError:
            self.state.skip(url, "skipped_bad_url")
            return "skipped_bad_url"
        if self.state.seen(url):
            return None
        if depth > self.cfg.max_depth:
            reason = "skipped_max_depth"
        else:
            reason = self._skip_reason(url)
        if reason is not None:
            self.state.skip(url, reason)
            return reason
        self.state.enqueue(url, depth, chain)
        return "queued"

    def _bfs(self, pool: ThreadPoolExecutor) -> Iterator[Page]:
        if self.state.fresh_run:
            with self.state.transaction():
                for seed in self.cfg.seeds:
                    self._discover(seed, 0)
        window = max(1, self.cfg.concurrency) * 2
        inflight: deque[tuple[tuple, Future]] = deque()
        while True:
            while len(inflight) < window and self.state.attempts < self.cfg.max_pages:
                item = self.state.next_queued()
                if item is None:
                    break
                self.state.attempts += 1
                url = item[1]
                fut = pool.submit(self._fetch, url, self.state.validators(url), self.host_delay(url))
                inflight.append((item, fut))
            if not inflight:
                break
            item, fut = inflight.popleft()
            page = self._process(item, fut.result())
            if page is not None:
                yield page
        with self.state.transaction():
            left = self.state.queued_left()
            if left:
                self.state.count("skipped_max_pages", n=left)

    def _process(self, item: tuple, res: Fetch) -> Page | None:
        seq, url, depth, chain = item
        page = None
        status = res.status
        links: list[str] | None = None
        if res.body is not None and self.warc is not None:
            self.warc.write_response(url, res)
        with self.state.transaction():
            if status == "redirected":
                try:
                    target_n = normalize_url(urljoin(url, res.location)) if res.location else None
                except ValueError:
                    target_n = ""
                if target_n is None:
                    self.state.count("error_redirect_without_location")
                elif not target_n:
                    self.state.count("error_bad_redirect")
                else:
                    new_chain = (*chain, url)
                    if target_n in new_chain:
                        self.state.count("error_redirect_loop")
                        log.warning("crawl: redirect loop %s", " -> ".join([*new_chain, target_n]))
                    elif len(new_chain) > self.cfg.max_redirects:
                        self.state.count("error_too_many_redirects")
                    elif self._discover(target_n, depth, new_chain) is None:
                        self.state.count("skipped_redirect_to_seen")
            elif status == "not_modified":
                links = self.state.stored_links(url)
            elif status == "fetched":
                ctype = {k.lower(): v for k, v in res.headers}.get("content-type", "")
                content = self._decode(res.body, res.encoding)
                is_html = ctype.split(";")[0].strip().lower() in HTML_TYPES
                cid = doc_id(content)
                links = extract_links(content, url) if is_html else []
                if self.cfg.conditional and self.state.content_id(url) == cid:
                    status = "unchanged"
                else:
                    page = Page(
                        url,
                        self.canonical(url),
                        depth,
                        res.http_status,
                        ctype,
                        content if is_html else None,
                        len(res.body),
                        text=None if is_html else content,
                        id=cid,
                    )
                hdrs = {k.lower(): v for k, v in res.headers}
                self.state.remember(url, hdrs.get("etag"), hdrs.get("last-modified"), cid, links)
            elif res.message:
                log.warning("crawl: %s: %s: %s", url, status, res.message)
            nbytes = len(res.body) if res.body is not None else 0
            self.state.count(status, nbytes=nbytes)
            self.state.done(seq, status, page)
            if self.warc is not None:
                self.state.warc = self.warc.position()
            for link in links or []:
                self._discover(link, depth + 1)
        return page
