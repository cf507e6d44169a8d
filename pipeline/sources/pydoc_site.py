"""The embedded default corpus: Python's own documentation server, crawled like any site.

This module only starts ``python -m pydoc -p 0`` on loopback and configures the crawl;
robots, caps and fetching live in :mod:`pipeline.sources.crawler`.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import queue
import re
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from urllib.parse import urlsplit

from pipeline.core.errors import PipelineError
from pipeline.sources.crawl import run_crawl
from pipeline.sources.crawl_state import CrawlState

READY = re.compile(r"Server ready at (http://\S+?)/?\s*$")
CANONICAL_PREFIX = "pydoc://"


@contextlib.contextmanager
def pydoc_server(startup_timeout: float = 30.0, cmd: list[str] | None = None) -> Iterator[str]:
    """Run the pydoc HTTP server for the stdlib only and yield its base URL; always stops it."""
    # A minimal, fixed environment: pages render default arguments, and some default to
    # os.environ (cgi.FieldStorage), which would put the caller's variables (secrets included)
    # into the corpus and make it differ between a shell, a DVC stage and a Prefect task.
    env = {"PATH": os.defpath, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "HOME": "/nonexistent", "TZ": "UTC"}
    # A fixed hash seed keeps set reprs in rendered pages stable. pydoc adds its cwd to
    # sys.path unless it is already there: running from the stdlib directory (already on the
    # path) keeps our checkout out of the index and the page text independent of where we run.
    env.update(PYTHONHASHSEED="0", PYTHONSAFEPATH="1", PYTHONDONTWRITEBYTECODE="1", PYTHONIOENCODING="utf-8")
    cmd = cmd or [sys.executable, "-S", "-m", "pydoc", "-n", "127.0.0.1", "-p", "0"]
    cwd = os.path.dirname(os.__file__)
    proc = subprocess.Popen(
        cmd,
        stdin=subprocess.PIPE,  # kept open: pydoc's server quits on stdin EOF
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=cwd,
        env=env,
        text=True,
        encoding="utf-8",
        errors="replace",
    )
    lines: queue.Queue[str | None] = queue.Queue()
    tail: deque[str] = deque(maxlen=20)

    def drain() -> None:
        # Keep reading for the server's whole life so imports that print never block it.
        for line in proc.stdout:
            tail.append(line.rstrip())
            lines.put(line)
        lines.put(None)

    threading.Thread(target=drain, name="pydoc-stdout", daemon=True).start()
    try:
        yield _wait_ready(proc, lines, tail, startup_timeout)
    finally:
        with contextlib.suppress(OSError):
            proc.stdin.close()
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_ready(proc: subprocess.Popen, lines: queue.Queue, tail: deque, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise PipelineError(
                f"pydoc server did not print 'Server ready at ...' within {timeout:g}s"
                f" (output: {' | '.join(tail) or 'none'})"
            )
        try:
            line = lines.get(timeout=min(left, 0.5))
        except queue.Empty:
            continue
        if line is None:
            code = proc.wait()
            raise PipelineError(
                f"pydoc server exited with code {code} before it was ready (output: {' | '.join(tail) or 'none'})"
            )
        if m := READY.search(line.strip()):
            return m.group(1)


def module_of(url: str) -> str | None:
    """The module a pydoc page documents: ``/tkinter.ttk.html`` -> ``tkinter.ttk``."""
    path = urlsplit(url).path.lstrip("/")
    if not path.endswith(".html") or "/" in path:
        return None
    name = path[: -len(".html")]
    return name if name and name not in ("index", "topics", "keywords") else None


def denier(deny: list[str]):
    """Hook for the crawler: skip pages whose module or a parent package matches a deny pattern."""
    patterns = [str(p) for p in deny]

    def check(url: str) -> str | None:
        module = module_of(url)
        if module is None:
            return None
        parts = module.split(".")
        prefixes = [".".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatchcase(m, p) for m in prefixes for p in patterns):
            return "deny"
        return None

    return check


def canonicalizer(base_url: str):
    """Port-independent URLs (``pydoc:///json.html``) so raw data is identical across runs."""
    base = base_url.rstrip("/")

    def canonical(url: str) -> str:
        return CANONICAL_PREFIX + url[len(base) :] if url.startswith(base) else url

    return canonical


def documents(source, ctx) -> Iterator[dict]:
    """Start the server, crawl it, yield raw rows; statuses and bytes go into ``ctx``.

    The state lives in memory (the server's port changes every run, and the corpus must be
    the same on every run anyway); responses are still archived to ``source.warc_dir``.
    """
    with pydoc_server(float(source.get("startup_timeout", 30))) as base_url:
        canonical = canonicalizer(base_url)
        yield from run_crawl(
            source,
            ctx,
            kind="pydoc_site",
            seeds=[base_url + "/"],
            state=CrawlState(None),
            canonical=canonical,
            deny=denier(list(source.deny)),
            note_key=canonical,
        )
