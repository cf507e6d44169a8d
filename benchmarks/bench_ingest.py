"""WARC ingestion (the ``warc`` source, whole ingest stage) against a bare warcio loop.

Usage: python benchmarks/bench_ingest.py [--files 4] [--records 2500] [--repeat 3]
Writes gzip WARC files of HTML responses (plus the request record a crawler writes before
each), then times, over the same files:
  bare:  ``for rec in ArchiveIterator(f)``, reading the payload of every response record;
  reader: the warc source's reader alone (rows, no Parquet);
  stage: ``python -m pipeline ingest source=warc`` in-process (one worker): parse, decode,
         content id, provenance, zstd Parquet shards and the summary;
  stage-Nw: the same with executor.workers=N (files fanned out over N processes).
Prints records/s (wall) and records per CPU-second (steadier on a shared machine) and the
ratios to the bare loop; the goal is >= 0.8x.
"""

from __future__ import annotations

import argparse
import io
import random
import resource
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
from pipeline.core.config import load  # noqa: E402

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


def reader(paths: list[Path]) -> int:
    """The warc source's reader alone: records to raw rows (decode, content id, provenance), no Parquet."""
    from pipeline.sources.raw import IngestContext
    from pipeline.sources.warc import read_file

    ctx = IngestContext("warc", Path("."))
    types = {"text/html", "application/xhtml+xml", "text/plain"}
    return sum(1 for p in paths for _ in read_file(p, ctx, types, 10_000_000, {200}))


def stage_config(paths: list[Path], root: Path, workers: int = 1):
    plist = ",".join(f"'{p}'" for p in paths)
    return load([f"paths.root={root}", "source=warc", f"source.paths=[{plist}]", f"executor.workers={workers}"])


def cpu_seconds() -> float:
    """User+system CPU of this process and its finished children (the stage's worker processes)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def stage(cfg) -> int:
    """The whole stage as the CLI runs it, minus composing the config (a fixed ~0.3 s)."""
    return ingest.run(cfg)["docs_out"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=4)
    ap.add_argument("--records", type=int, default=2500)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2, help="executor.workers for the parallel stage run")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        paths = write_files(d, args.files, args.records)
        mb = sum(p.stat().st_size for p in paths) / 1e6
        print(f"{len(paths)} files, {args.files * args.records} responses, {mb:.1f} MB gzip")
        names = ("bare", "reader", "stage", f"stage-{args.workers}w")
        best = dict.fromkeys(names, 0.0)
        ratios: dict[str, list[float]] = {n: [] for n in names[1:]}
        cpu_ratios: dict[str, list[float]] = {n: [] for n in names[1:]}
        for r in range(args.repeat):
            rates, cpu = {}, {}
            order = names if r % 2 == 0 else names[::-1]  # neither side always first on a warm cache
            for name in order:
                cfg = stage_config(paths, d / f"out{r}-{name}", args.workers if name.endswith("w") else 1)
                t, c = time.perf_counter(), cpu_seconds()
                n = bare(paths) if name == "bare" else reader(paths) if name == "reader" else stage(cfg)
                rates[name] = n / (time.perf_counter() - t)
                cpu[name] = n / (cpu_seconds() - c)
                best[name] = max(best[name], rates[name])
                print(f"  run {r} {name:9s}: {n} records, {rates[name]:,.0f} records/s wall, "
                      f"{cpu[name]:,.0f} records per CPU-second")
            for name in names[1:]:
                ratios[name].append(rates[name] / rates["bare"])
                cpu_ratios[name].append(cpu[name] / cpu["bare"])
        for name in names:
            print(f"{name:9s}: {best[name]:,.0f} records/s (best of {args.repeat})")
        for name in names[1:]:
            print(f"{name} / bare: median of back-to-back ratios {statistics.median(ratios[name]):.2f}x wall, "
                  f"{statistics.median(cpu_ratios[name]):.2f}x per CPU-second")

if __name__ == "__main__":
    main()
