"""Crawl state in SQLite: frontier, seen URLs, validators (ETag/Last-Modified), counters.

The crawler processes URLs strictly in frontier order and commits each one (its status, the
URLs it discovered, its page, the WARC end offset) in a single transaction. So after a
SIGKILL the database holds an exact prefix of the crawl: a rerun finds the run still
marked ``running``, yields the pages that run had already fetched, and carries on with the
URLs still queued without fetching anything twice. When the output has been written the
run is marked ``complete``; the next run starts again from the seeds, sending conditional
requests with the validators kept per URL (incremental crawl).

With no path the state lives in memory (one run, nothing resumable): the ``pydoc_site``
source uses that, since its server gets a new port on every run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from dataclasses import dataclass

log = logging.getLogger("pipeline.stages.ingest")

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS frontier (
    seq INTEGER PRIMARY KEY, url TEXT UNIQUE NOT NULL, depth INTEGER, chain TEXT, status TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS docs (seq INTEGER PRIMARY KEY, page TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS pages (
    url TEXT PRIMARY KEY, etag TEXT, last_modified TEXT, content_id TEXT, links TEXT, run INTEGER
);
"""


class CrawlState:
    def __init__(self, path: Path | str | None, fingerprint: str = "") -> None:
        self.path = Path(path) if path else None
        self.durable = self.path is not None
        self._lock = None
        if self.durable:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._lock = _exclusive_lock(self.path.with_name(self.path.name + ".lock"))
        self.db = sqlite3.connect(str(self.path) if self.durable else ":memory:", isolation_level=None)
        if self.durable:
            # WAL + NORMAL: a committed transaction survives a killed process (not a power cut)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(SCHEMA)
        self.counts: Counter[str] = Counter()
        self.bytes: Counter[str] = Counter()
        self.attempts = 0
        self.warc: dict = {}
        self._queue: deque[tuple] = deque()
        self._seen: set[str] = set()
        self._in_tx = False
        meta = dict(self.db.execute("SELECT key, value FROM meta").fetchall())
        self.run = int(meta.get("run", 0))
        self.resumed = meta.get("status") == "running" and meta.get("fingerprint") == fingerprint
        if self.resumed and not self._left_to_do():
            # it crawled everything and produced nothing (e.g. the site was down): start over
            log.info("crawl state %s: unfinished run %s had nothing left to resume; starting afresh", self.path,
                     meta.get("run"))
            self.resumed = False
        if meta.get("status") == "running" and not self.resumed:
            log.warning("crawl state %s: unfinished run was for another configuration; starting afresh", self.path)
        if self.resumed:
            self.counts.update(json.loads(meta.get("counts", "{}")))
            self.bytes.update(json.loads(meta.get("bytes", "{}")))
            self.attempts = int(meta.get("attempts", 0))
            self.warc = json.loads(meta.get("warc", "{}"))
            for (url,) in self.db.execute("SELECT url FROM frontier"):
                self._seen.add(url)
            for seq, url, depth, chain in self.db.execute(
                "SELECT seq, url, depth, chain FROM frontier WHERE status = 'queued' ORDER BY seq"
            ):
                self._queue.append((seq, url, depth, tuple(json.loads(chain or "[]"))))
            log.info("crawl state %s: resuming run %d (%d done, %d queued)", self.path, self.run, self.attempts,
                     len(self._queue))
        else:
            self.run += 1
            with self.transaction():
                self.db.execute("DELETE FROM frontier")
                self.db.execute("DELETE FROM docs")
                self._set("run", str(self.run))
                self._set("status", "running")
                self._set("fingerprint", fingerprint)
        self.fresh_run = not self.resumed

    def _left_to_do(self) -> bool:
        queued = self.db.execute("SELECT 1 FROM frontier WHERE status = 'queued' LIMIT 1").fetchone()
        docs = self.db.execute("SELECT 1 FROM docs LIMIT 1").fetchone()
        return bool(queued or docs)

    # ------------------------------------------------------------ transactions

    def _set(self, key: str, value: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        if self._in_tx:
            yield
            return
        self._in_tx = True
        self.db.execute("BEGIN")
        try:
            yield
            self._set("counts", json.dumps(self.counts, sort_keys=True))
            self._set("bytes", json.dumps(self.bytes, sort_keys=True))
            self._set("attempts", str(self.attempts))
            self._set("warc", json.dumps(self.warc))
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        finally:
            self._in_tx = False

    # ------------------------------------------------------------ frontier

    def seen(self, url: str) -> bool:
        return url in self._seen

    def skip(self, url: str, reason: str) -> None:
        self._seen.add(url)
        self.db.execute("INSERT OR IGNORE INTO frontier (url, status) VALUES (?, ?)", (url, reason))
        self.count(reason)

    def enqueue(self, url: str, depth: int, chain: tuple[str, ...] = ()) -> None:
        self._seen.add(url)
        cur = self.db.execute(
            "INSERT INTO frontier (url, depth, chain, status) VALUES (?, ?, ?, 'queued')",
            (url, depth, json.dumps(list(chain)) if chain else None),
        )
        self._queue.append((cur.lastrowid, url, depth, tuple(chain)))

    def next_queued(self) -> tuple | None:
        return self._queue.popleft() if self._queue else None

    def queued_left(self) -> int:
        return len(self._queue)

    def count(self, status: str, nbytes: int = 0, n: int = 1) -> None:
        self.counts[status] += n
        if nbytes:
            self.bytes[status] += nbytes

    def done(self, seq: int, status: str, page=None) -> None:
        self.db.execute("UPDATE frontier SET status = ? WHERE seq = ?", (status, seq))
        if page is not None and self.durable:
            self.db.execute("INSERT OR REPLACE INTO docs (seq, page) VALUES (?, ?)", (seq, json.dumps(asdict(page))))

    def replay_pages(self) -> Iterator:
        """Pages an interrupted run had already fetched, in order (nothing on a fresh run)."""
        pass

        if not self.resumed:
            return
        last = -1
        while True:  # in batches: bounded memory, and no cursor left open across yields
            rows = self.db.execute("SELECT seq, page FROM docs WHERE seq > ? ORDER BY seq LIMIT 64", (last,)).fetchall()
            if not rows:
                return
            for seq, page in rows:
                last = seq
                yield Page(**json.loads(page))

    # ------------------------------------------------------------ validators (kept across runs)

    def _page(self, url: str):
        return self.db.execute(
            "SELECT etag, last_modified, content_id, links FROM pages WHERE url = ?", (url,)
        ).fetchone()

    def validators(self, url: str) -> dict:
        row = self._page(url)
        return {"etag": row[0], "last_modified": row[1]} if row else {}

    def content_id(self, url: str) -> str | None:
        row = self._page(url)
        return row[2] if row else None

    def stored_links(self, url: str) -> list[str]:
        row = self._page(url)
        return json.loads(row[3]) if row and row[3] else []

    def remember(self, url: str, etag: str | None, last_modified: str | None, cid: str, links: list[str]) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO pages (url, etag, last_modified, content_id, links, run) VALUES (?, ?, ?, ?, ?, ?)",
            (url, etag, last_modified, cid, json.dumps(links), self.run),
        )

    # ------------------------------------------------------------ end of run

    def finish(self) -> None:
        """The run's output is safely written: the next run starts from the seeds again."""
        with self.transaction():
            self._set("status", "complete")
            self.db.execute("DELETE FROM docs")

    def close(self) -> None:
        self.db.close()
        if self._lock is not None:
            self._lock.close()  # releases the flock
            self._lock = None


def _exclusive_lock(path: Path):
    """One crawl per state at a time: a second one gets a clear error instead of a locked database."""
    import fcntl

    from pipeline.core.errors import PipelineError

    f = open(path, "a+")  # noqa: SIM115 - held open for the crawl's lifetime
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        f.close()
        raise PipelineError(f"crawl state {path.parent} is in use by another crawl (lock {path})") from e
    return f


@dataclass
class Page:
    url: str  # the URL as fetched
    canonical: str  # the URL as stored (see Crawler.canonical)
    depth: int
    status: int
    content_type: str
    html: str | None
    nbytes: int
    text: str | None = None  # non-HTML text responses (text/plain)
    id: str = ""
