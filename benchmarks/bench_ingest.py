"""WARC ingestion (the ``warc`` source, whole ingest stage) against a bare warcio loop.

Usage: python benchmarks/bench_ingest.py [--files 4] [--records 2500] [--repeat 3]
Writes gzip WARC files of HTML responses (plus the request record a crawler writes before
each), then times, over the same files:
  bare:  ``for rec in ArchiveIterator(f)``, reading the payload of every response record;
  stage: ``python -m pipeline ingest source=warc`` in-process: parse, decode, content id,
         provenance, zstd Parquet shards and the summary.
Prints response records/s for both and the ratio (stage / bare); the goal is >= 0.8.
"""

from __future__ import annotations

import argparse
import io
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from warcio.archiveiterator import ArchiveIterator  # noqa: E402
from warcio.statusandheaders import StatusAndHeaders  # noqa: E402
from warcio.warcwriter import WARCWriter  # noqa: E402

from pipeline import ingest  # noqa: E402
from pipeline.config import load  # noqa: E402

WORDS = ("data pipeline model token shard crawl archive record parquet python module function value "
         "error network server client request response header body text html page link").split()


def write_files(d: Path, files: int, records: int, seed: int = 0) -> list[Path]:
    rng = random.Random(seed)
    paths = []
    for fi in range(files):
        p = d / f"bench-{fi:03d}.warc.gz"
        with open(p, "wb") as f:
            w = WARCWriter(f, gzip=True)
            w.write_record(w.create_warcinfo_record(p.name, {"software": "bench"}))
            for i in range(records):
                uri = f"http://bench.example/{fi}/{i}.html"
                paras = "".join(
                    "<p>" + " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 80))) + "</p>"
                    for _ in range(rng.randint(3, 12))
                )
                body = f"<html><head><title>{i}</title></head><body>{paras}</body></html>".encode()
                req = StatusAndHeaders("GET /x HTTP/1.1", [("Host", "bench.example")], protocol="HTTP/1.1",
                                       is_http_request=True)
                w.write_record(w.create_warc_record(uri, "request", http_headers=req))
                http = StatusAndHeaders(
                    "200 OK", [("Content-Type", "text/html; charset=utf-8"), ("Content-Length", str(len(body)))],
                    protocol="HTTP/1.1",
                )
                w.write_record(w.create_warc_record(uri, "response", payload=io.BytesIO(body), length=len(body),
                                                    http_headers=http))
        paths.append(p)
    return paths


def bare(paths: list[Path]) -> int:
    n = 0
    for p in paths:
        with open(p, "rb") as f:
            for rec in ArchiveIterator(f):
                if rec.rec_type == "response":
                    rec.content_stream().read()
                    n += 1
    return n


def stage_config(paths: list[Path], root: Path):
    plist = ",".join(f"'{p}'" for p in paths)
    return load([f"paths.root={root}", "source=warc", f"source.paths=[{plist}]"])


def stage(cfg) -> int:
    """The whole stage as the CLI runs it, minus composing the config (a fixed ~0.3 s)."""
    return ingest.run(cfg)["docs_out"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=4)
    ap.add_argument("--records", type=int, default=2500)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        paths = write_files(d, args.files, args.records)
        mb = sum(p.stat().st_size for p in paths) / 1e6
        print(f"{len(paths)} files, {args.files * args.records} responses, {mb:.1f} MB gzip")
        best = {"bare": 0.0, "stage": 0.0}
        ratios = []
        for r in range(args.repeat):
            # alternate the order so neither side always runs on a warm page cache first
            rates = {}
            for name in (("bare", "stage") if r % 2 == 0 else ("stage", "bare")):
                cfg = stage_config(paths, d / f"out{r}")
                t = time.perf_counter()
                n = bare(paths) if name == "bare" else stage(cfg)
                rates[name] = n / (time.perf_counter() - t)
                best[name] = max(best[name], rates[name])
                print(f"  run {r} {name:5s}: {n} records, {rates[name]:,.0f} records/s")
            ratios.append(rates["stage"] / rates["bare"])
        print(f"bare warcio loop : {best['bare']:,.0f} records/s (best of {args.repeat})")
        print(f"warc ingest stage: {best['stage']:,.0f} records/s (best of {args.repeat})")
        print(f"ratio (stage / bare): best/best {best['stage'] / best['bare']:.2f}x, "
              f"median of back-to-back pairs {statistics.median(ratios):.2f}x")

if __name__ == "__main__":
    main()
