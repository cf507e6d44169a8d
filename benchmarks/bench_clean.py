"""Clean stage vs datatrove: Gopher/C4 quality filters and MinHash near-duplicate removal.

Both tools run, in the same invocation, on the same input: pydoc text of the standard
library (about 13 MB by default, documents with 5-gram Jaccard >= 0.5 to another one
removed so that the base corpus is "distinct"), plus 10 % planted copies with 3 % of
their words edited, split into 2 input files.

* datatrove: GopherRepetitionFilter, GopherQualityFilter, C4QualityFilter, then its 4-stage
  MinHash dedup (signatures, buckets, cluster, filter; 14 x 8, 5-grams), LocalPipelineExecutor
  with 2 tasks and 2 workers (the buckets stage runs one task per bucket, as in datatrove's
  example, on the same 2 workers);
* ours: ``pipeline.stages.clean.run`` with GopherRepetition, GopherQuality, C4Quality and the dedup
  settings given (20 x 5 and 14 x 8, min_similarity 0.6 as in conf/clean), ``executor.workers=2``.

Two runs each: dedup alone on the whole input (for MB/s and precision/recall of dropped
documents against the planted copies), and filters + dedup end to end. Printed: docs/s
and MB/s of both, the ratios, and precision/recall; plus how often the two filter chains
agree on keeping a document.

datatrove lives in its own virtual environment, never in the project's:

    python3.11 -m venv /work/bench-venv
    /work/bench-venv/bin/pip install "datatrove[processing]" "xxhash<4" orjson spacy

(xxhash 4 breaks datatrove's MinHash; spaCy is its word tokenizer). Then:

    nice -n 10 .venv/bin/python benchmarks/bench_clean.py --datatrove-python /work/bench-venv/bin/python
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SKIP = ("idlelib", "tkinter", "turtle", "turtledemo", "antigravity", "this", "test", "ensurepip", "pydoc_data",
        "encodings", "lib2to3", "__phello__", "_pydev", "xxsubtype", "msilib", "winreg", "winsound", "_winapi",
        "msvcrt", "nt", "_msi", "_overlapped", "_tkinter", "curses.textpad")  # fmt: skip


def stdlib_pages(max_bytes: int) -> list[str]:
    """pydoc plain text of standard-library modules and submodules, in name order."""
    import importlib
    import pkgutil
    import pydoc
    from unittest import mock

    names = sorted(n for n in sys.stdlib_module_names if not n.startswith(SKIP))
    seen, pages, total = set(), [], 0
    with mock.patch("inspect.getcomments", lambda obj: None):  # pydoc re-parses sources for comments: slow
        queue = list(names)
        while queue and total < max_bytes:
            name = queue.pop(0)
            if name in seen or name.startswith(SKIP):
                continue
            seen.add(name)
            try:
                with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                    mod = importlib.import_module(name)
                    text = pydoc.render_doc(mod, renderer=pydoc.plaintext)
            except BaseException:  # noqa: BLE001 - platform-specific or side-effecting modules
                continue
            if hasattr(mod, "__path__"):
                queue[:0] = sorted(f"{name}.{m.name}" for m in pkgutil.iter_modules(mod.__path__))
            pages.append(text)
            total += len(text.encode())
    return pages


def distinct(pages: list[str], max_jaccard: float = 0.5) -> list[str]:
    """Drop pages whose exact 5-gram Jaccard with an earlier kept page reaches ``max_jaccard``."""
    from pipeline.filters.text import dedup_tokens

    out, sizes, postings = [], [], {}
    for text in pages:
        t = dedup_tokens(text)
        s = {hash(tuple(t[i : i + 5])) for i in range(len(t) - 4)}
        if not s:
            continue
        shared = Counter(i for g in s for i in postings.get(g, ()))
        if any(c / (len(s) + sizes[i] - c) >= max_jaccard for i, c in shared.items()):
            continue
        for g in s:
            postings.setdefault(g, []).append(len(out))
        out.append(text)
        sizes.append(len(s))
    return out


def edit_words(text: str, frac: float, rng: random.Random) -> str:
    w = text.split()
    for _ in range(max(1, round(len(w) * frac))):
        i = rng.randrange(len(w))
        op = rng.random()
        if op < 1 / 3:
            w[i] = f"edit{rng.randrange(10**6)}"
        elif op < 2 / 3 and len(w) > 1:
            del w[i]
        else:
            w.insert(i, f"ins{rng.randrange(10**6)}")
    return " ".join(w)


def build_corpus(mb: float, cache: Path) -> list[dict]:
    if cache.is_file():
        return [json.loads(line) for line in cache.read_text().splitlines()]
    rng = random.Random(0)
    base = distinct(stdlib_pages(int(mb * 1e6 / 1.1)))
    docs = [{"id": f"d{i:05d}", "text": t, "copy_of": None} for i, t in enumerate(base)]
    for i in sorted(rng.sample(range(len(base)), len(base) // 10)):
        docs.append({"id": f"d{len(docs):05d}", "text": edit_words(base[i], 0.03, rng), "copy_of": f"d{i:05d}"})
    order = list(range(len(docs)))
    rng.shuffle(order)  # copies spread over both input files, originals not always first
    docs = [docs[i] for i in order]
    cache.write_text("".join(json.dumps(d) + "\n" for d in docs))
    return docs


def precision_recall(dropped: set[str], docs: list[dict]) -> dict:
    """Dropped documents vs planted copies: of each (original, copy) pair exactly one should go."""
    pairs = [(d["copy_of"], d["id"]) for d in docs if d["copy_of"]]
    caught = sum(1 for a, b in pairs if a in dropped or b in dropped)
    planted_ids = {x for p in pairs for x in p}
    good = len(dropped & planted_ids)
    return {"dropped": len(dropped), "recall": round(caught / len(pairs), 3),
            "precision": round(good / len(dropped), 3) if dropped else 1.0}  # fmt: skip


# ---------------------------------------------------------------- datatrove (runs in its own venv)

DATATROVE = r"""
import json, sys, time, shutil
from pathlib import Path
from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.writers import JsonlWriter
from datatrove.pipeline.filters import GopherRepetitionFilter, GopherQualityFilter, C4QualityFilter
from datatrove.pipeline.dedup import MinhashDedupSignature, MinhashDedupBuckets, MinhashDedupCluster, MinhashDedupFilter
from datatrove.pipeline.dedup.minhash import MinhashConfig


def main():

    inp, work = Path(sys.argv[1]), Path(sys.argv[2])
    cfg = MinhashConfig(n_grams=5, num_buckets=14, hashes_per_bucket=8)

    def run(pipeline, tasks, name, workers=2):
        LocalPipelineExecutor(pipeline=pipeline, tasks=tasks, workers=workers,
                              logging_dir=str(work / "logs" / name)).run()

    def minhash(src, tag):
        base = work / tag
        run([JsonlReader(str(src)), MinhashDedupSignature(output_folder=str(base / "sigs"), config=cfg)], 2, tag + "-sig")
        run([MinhashDedupBuckets(input_folder=str(base / "sigs"), output_folder=str(base / "buckets"), config=cfg)],
            cfg.num_buckets, tag + "-buckets")
        run([MinhashDedupCluster(input_folder=str(base / "buckets"), output_folder=str(base / "remove"), config=cfg)],
            1, tag + "-cluster", workers=1)
        run([JsonlReader(str(src)), MinhashDedupFilter(input_folder=str(base / "remove")),
             JsonlWriter(str(base / "out"))], 2, tag + "-filter")
        return base / "out"

    def ids(folder):
        import gzip
        out = set()
        for f in Path(folder).glob("*.jsonl*"):
            op = gzip.open if f.suffix == ".gz" else open
            with op(f, "rt") as fh:
                out.update(json.loads(line)["id"] for line in fh)
        return out

    res = {}
    t = time.perf_counter()
    out = minhash(inp, "dedup_only")
    res["dedup_s"] = time.perf_counter() - t
    res["dedup_kept"] = sorted(ids(out))
    t = time.perf_counter()
    run([JsonlReader(str(inp)), GopherRepetitionFilter(), GopherQualityFilter(), C4QualityFilter(),
         JsonlWriter(str(work / "filtered"))], 2, "filters")
    res["filters_s"] = time.perf_counter() - t
    res["filters_kept"] = sorted(ids(work / "filtered"))
    t = time.perf_counter()
    out = minhash(work / "filtered", "e2e")
    res["e2e_s"] = res["filters_s"] + time.perf_counter() - t
    res["e2e_kept"] = len(ids(out))
    print("RESULT " + json.dumps(res))


if __name__ == "__main__":  # datatrove's workers (forkserver) re-import this module
    main()
"""


def run_datatrove(python: str, docs: list[dict], work: Path) -> dict:
    inp = work / "dt_input"
    inp.mkdir(parents=True)
    half = (len(docs) + 1) // 2
    for k, part in enumerate((docs[:half], docs[half:])):
        with open(inp / f"part-{k}.jsonl", "w") as f:
            for d in part:
                f.write(json.dumps({"id": d["id"], "text": d["text"]}) + "\n")
    script = work / "dt.py"
    script.write_text(DATATROVE)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    p = subprocess.run([python, str(script), str(inp), str(work / "dt")], capture_output=True, text=True, env=env)
    line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        raise SystemExit(f"datatrove run failed:\n{p.stderr[-3000:]}")
    return json.loads(line[len("RESULT ") :])


# ---------------------------------------------------------------- ours


def run_ours(
    docs: list[dict], work: Path, filters: bool, bands: int, rows: int, min_sim: float, workers: int = 2
) -> dict:
    from omegaconf import OmegaConf, open_dict

    from pipeline.stages import clean
    from pipeline.core.parquet import ShardWriter, iter_rows
    from pipeline.core.config import load
    from pipeline.sources.raw import RAW_SCHEMA

    root = work / f"ours-{'e2e' if filters else 'dedup'}-{bands}x{rows}"
    w = ShardWriter(root / "data" / "raw", RAW_SCHEMA, (len(docs) + 1) // 2)  # 2 input files
    for d in docs:
        w.write({"id": d["id"], "url": d["id"], "source": "bench", "content_type": "text/plain",
                 "http_status": None, "html": None, "text": d["text"]})  # fmt: skip
    w.close()
    cfg = load([f"paths.root={root}", f"executor.workers={workers}", "clean.decontaminate.enabled=false",
                f"clean.dedup.bands={bands}", f"clean.dedup.rows={rows}", f"clean.dedup.min_similarity={min_sim}",
                "clean.rows_per_shard=100000"])  # fmt: skip
    steps = [{"_target_": f"pipeline.filters.steps.{s}"} for s in ("GopherRepetition", "GopherQuality", "C4Quality")]
    with open_dict(cfg):
        cfg.clean.steps = OmegaConf.create(steps if filters else [])
    t = time.perf_counter()
    summary = clean.run(cfg)
    seconds = time.perf_counter() - t
    rejected = list(iter_rows(root / "data" / "clean" / "rejected", columns=["url", "step"]))
    return {
        "seconds": seconds,
        "kept": summary["kept"],
        "dedup_dropped": {r["url"] for r in rejected if r["step"] == "dedup"},
        "filter_dropped": {r["url"] for r in rejected if r["step"] != "dedup"},
    }


def profile_report(raw_dir: Path) -> None:
    """Per filter, what each profile rejects on a raw corpus: in profile order (what the stage
    does) and each filter alone on the extracted text (what it would reject by itself)."""
    from omegaconf import OmegaConf

    from pipeline.core.parquet import iter_rows
    from pipeline.core.config import load
    from pipeline.filters.apply import apply_steps, build_steps, step_name

    raws = list(iter_rows(raw_dir))
    for profile in ("docs", "web"):
        cfg = OmegaConf.to_container(load([f"clean={profile}"]).clean.steps, resolve=True)
        steps = build_steps(cfg)
        names = [step_name(s) for s in steps]
        in_order: Counter[str] = Counter()
        alone: Counter[str] = Counter()
        for raw in raws:
            doc, where, why = apply_steps(steps, dict(raw), [])
            if why:
                in_order[f"{names[where] if where < len(names) else 'end'}: {why}"] += 1
            extracted = steps[0](dict(raw))
            if isinstance(extracted, dict) and extracted.get("text"):
                for name, step in zip(names[1:], steps[1:], strict=True):
                    r = step(dict(extracted))
                    if not isinstance(r, dict):
                        alone[f"{name}: {r.reason}"] += 1
        kept = len(raws) - sum(in_order.values())
        print(f"\nclean={profile}: {len(raws)} documents, {kept} kept by the filters (before dedup)")
        print("  rejected in profile order: " + ", ".join(f"{k} {v}" for k, v in sorted(in_order.items())))
        print("  each filter alone:         " + ", ".join(f"{k} {v}" for k, v in sorted(alone.items())))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--datatrove-python", default="/work/bench-venv/bin/python")
    ap.add_argument("--profile-report", type=Path, metavar="RAW_DIR",
                    help="only report what each profile's filters reject on the raw shards in RAW_DIR")  # fmt: skip
    ap.add_argument("--mb", type=float, default=13.0, help="approximate corpus size")
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "bench_clean_corpus.jsonl")
    args = ap.parse_args()
    if args.profile_report:
        profile_report(args.profile_report)
        return

    t = time.perf_counter()
    docs = build_corpus(args.mb, args.cache)
    mb = sum(len(d["text"].encode()) for d in docs) / 1e6
    n = len(docs)
    print(f"corpus: {n} docs, {mb:.1f} MB ({sum(1 for d in docs if d['copy_of'])} planted copies), "
          f"built in {time.perf_counter() - t:.0f} s")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="bench_clean-") as tmp:
        work = Path(tmp)
        dt = run_datatrove(args.datatrove_python, docs, work)
        dt_dedup = precision_recall({d["id"] for d in docs} - set(dt["dedup_kept"]), docs)
        ours = {}
        for bands, rows, ms in ((20, 5, 0.6), (14, 8, 0.6)):
            r = run_ours(docs, work, False, bands, rows, ms)
            ours[f"{bands}x{rows}"] = (r, precision_recall(r["dedup_dropped"], docs))
        e2e = run_ours(docs, work, True, 20, 5, 0.6)

    dt_keep = set(dt["filters_kept"])
    our_keep = {d["id"] for d in docs} - e2e["filter_dropped"]
    agree = sum(1 for d in docs if (d["id"] in dt_keep) == (d["id"] in our_keep)) / n

    def rate(seconds: float) -> str:
        return f"{n / seconds:8.0f} docs/s {mb / seconds:7.2f} MB/s ({seconds:6.2f} s)"

    print(f"\n{'':34s}{'datatrove':>40s}   {'ours':>40s}   ratio")
    for label, (r, pr) in ours.items():
        print(f"dedup alone, ours {label:6s}{'':10s}{rate(dt['dedup_s'])}   {rate(r['seconds'])}   "
              f"{dt['dedup_s'] / r['seconds']:5.1f}x")  # fmt: skip
    print(f"filters + dedup (ours 20x5){'':7s}{rate(dt['e2e_s'])}   {rate(e2e['seconds'])}   "
          f"{dt['e2e_s'] / e2e['seconds']:5.1f}x")  # fmt: skip
    print(f"\nplanted copies (dropped docs):  datatrove 14x8 {dt_dedup}")
    for label, (_, pr) in ours.items():
        print(f"{'':32s}ours {label}      {pr}")
    print(f"filters: datatrove kept {len(dt_keep)}, ours kept {len(our_keep)}; same decision on {agree:.1%} of docs")
    print(f"end to end kept: datatrove {dt['e2e_kept']}, ours {e2e['kept']}")


if __name__ == "__main__":
    main()
