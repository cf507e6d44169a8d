"""Crawler pages/s on loopback, politeness off, against a plain concurrent fetch loop.

Usage: python benchmarks/bench_crawl.py [--pages 600] [--concurrency 8] [--repeat 3]
A site of --pages HTML pages (~4 KB, each linking to a few others) is served by a
ThreadingHTTPServer in its own process on 127.0.0.1. Over the same URLs it times:
  plain: a ThreadPoolExecutor of --concurrency workers sharing one httpx.Client, GET + read;
  crawl: the ingest stage with source=crawl (delay 0, same concurrency per host), which also
         parses links, keeps the frontier, writes Parquet shards and the summary; once with
         its defaults (SQLite state on disk + WARC archive) and once lean (state in memory,
         no WARC).
Prints pages/s for each and the crawler's overhead relative to the plain loop.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import random
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx  # noqa: E402

from pipeline import ingest  # noqa: E402
from pipeline.core.config import load  # noqa: E402


def build_site(n: int) -> dict[str, bytes]:
    rng = random.Random(0)
    words = "crawl page link text python module data server client archive record".split()
    pages = {"/robots.txt": b"User-agent: *\nAllow: /\n"}
    pages["/"] = ("<html><body>" + "".join(f'<a href="/p{i}.html">{i}</a> ' for i in range(n)) + "</body></html>").encode()
    for i in range(n):
        links = "".join(f'<a href="/p{rng.randrange(n)}.html">x</a> ' for _ in range(5))
        text = " ".join(rng.choice(words) for _ in range(600))
        pages[f"/p{i}.html"] = f"<html><head><title>{i}</title></head><body><p>{text}</p>{links}</body></html>".encode()
    return pages


def serve(n: int, port_q) -> None:
    pages = build_site(n)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):  # noqa: N802
            body = pages.get(self.path)
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            ctype = "text/plain" if self.path == "/robots.txt" else "text/html; charset=utf-8"
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    port_q.put(server.server_address[1])
    server.serve_forever()


def plain(base: str, n: int, concurrency: int) -> int:
    urls = [f"{base}/"] + [f"{base}/p{i}.html" for i in range(n)]
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    with httpx.Client(limits=limits, trust_env=False) as client:

        def get(url: str) -> int:
            return len(client.get(url).content)

        with ThreadPoolExecutor(concurrency) as pool:
            sizes = list(pool.map(get, urls))
    return len(sizes)


def crawl_cfg(base: str, port: int, root: Path, concurrency: int, lean: bool):
    extra = ["source.state_dir=null", "source.warc_dir=null"] if lean else []
    return load([
        f"paths.root={root}", "source=crawl", f"source.seeds=['{base}/']", f"source.allow_private=['127.0.0.1:{port}']",
        "source.delay=0", f"source.concurrency={concurrency}", f"source.per_host_concurrency={concurrency}",
        "source.incremental=false", "source.max_pages=100000", *extra,
    ])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pages", type=int, default=600)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    port_q = mp.Queue()
    proc = mp.Process(target=serve, args=(args.pages, port_q), daemon=True)
    proc.start()
    port = port_q.get(timeout=30)
    base = f"http://127.0.0.1:{port}"
    names = ("plain", "crawl", "crawl-lean")
    rates: dict[str, list[float]] = {k: [] for k in names}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            plain(base, args.pages, args.concurrency)  # warm up the server
            for r in range(args.repeat):
                for name in names:
                    if name == "plain":
                        t = time.perf_counter()
                        n = plain(base, args.pages, args.concurrency)
                    else:
                        cfg = crawl_cfg(base, port, Path(tmp) / f"{name}{r}", args.concurrency, name == "crawl-lean")
                        t = time.perf_counter()
                        n = ingest.run(cfg)["docs_out"]
                    rates[name].append(n / (time.perf_counter() - t))
                    print(f"  run {r} {name:10s}: {n} pages, {rates[name][-1]:,.0f} pages/s")
    finally:
        proc.terminate()
    med = {k: statistics.median(v) for k, v in rates.items()}
    for k in names:
        print(f"{k:10s}: {med[k]:,.0f} pages/s (median of {args.repeat})")
    for k in names[1:]:
        print(f"{k} / plain: {med[k] / med['plain']:.2f}x (overhead {100 * (1 - med[k] / med['plain']):.0f}%)")


if __name__ == "__main__":
    main()
