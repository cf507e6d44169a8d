"""Near-duplicate dedup on a planted set, incremental dedup against the persisted index,
decontamination, and the funnel's in == kept + rejected on every run."""

from __future__ import annotations

import inspect
import random
from itertools import combinations
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from omegaconf import OmegaConf, open_dict

from pipeline.stages import clean
from pipeline.core.artifacts import doc_id, read_json
from pipeline.core.parquet import ShardWriter, iter_rows
from pipeline.dedup.index import INDEX
from pipeline.dedup.minhash import DedupParams, Signer, band_links, band_tasks, make_key, write_band_files
from pipeline.filters.text import dedup_tokens
from pipeline.core.config import load
from pipeline.sources.raw import RAW_SCHEMA
from pipeline.core.splits import is_val

ROOT = Path(__file__).resolve().parent.parent

MODULES = ["argparse", "collections", "csv", "datetime", "functools", "inspect", "itertools", "json", "logging",
           "pathlib", "random", "re", "shutil", "string", "subprocess", "textwrap", "typing", "os", "enum", "heapq",
           "bisect", "fractions", "decimal", "statistics", "difflib", "zipfile", "tarfile", "gzip", "base64",
           "calendar", "copy", "pprint", "html", "unittest", "contextlib", "abc", "dataclasses", "ast", "dis",
           "tokenize", "uuid", "hashlib", "hmac", "secrets", "sched", "queue", "threading", "socket", "selectors",
           "ssl", "email", "smtplib", "urllib.parse", "http.client", "sqlite3", "pickle", "shelve", "tempfile",
           "asyncio", "multiprocessing", "xml.etree.ElementTree", "configparser", "optparse", "getopt", "mailbox",
           "imaplib", "ftplib", "poplib", "wave", "codecs", "locale", "gettext", "numbers", "operator", "weakref",
           "types", "graphlib", "ipaddress", "plistlib", "shlex", "cmd", "code", "pdb", "profile", "pstats",
           "timeit", "trace", "traceback", "warnings", "pkgutil", "runpy", "sysconfig", "platform", "glob",
           "fnmatch", "filecmp", "linecache", "fileinput", "quopri", "zipapp", "venv", "webbrowser", "wsgiref.util",
           "xml.dom.minidom", "http.server", "socketserver", "urllib.request", "concurrent.futures", "asyncio.tasks",
           "email.message", "json.decoder", "logging.handlers", "unittest.mock", "importlib.abc", "tomllib"]  # fmt: skip


def shingle_set(text: str, n: int = 5) -> set[tuple]:
    t = dedup_tokens(text)
    return {tuple(t[i : i + n]) for i in range(len(t) - n + 1)}


def distinct_docs(limit: int = 400, min_words: int = 100, max_jaccard: float = 0.3) -> list[str]:
    """pydoc text of stdlib functions and classes, keeping only documents whose exact 5-gram
    Jaccard with every other kept one is below ``max_jaccard`` (the ground truth of "distinct":
    class pages that share half their inherited methods are related, not near-duplicates)."""
    import importlib
    import pydoc
    from unittest import mock

    with mock.patch("inspect.getcomments", lambda obj: None):  # pydoc re-parses module sources for comments
        return _distinct_docs(limit, min_words, max_jaccard, importlib, pydoc)


def _distinct_docs(limit, min_words, max_jaccard, importlib, pydoc):
    from collections import Counter

    docs, sizes, postings = [], [], {}  # postings: shingle -> indices of kept docs (exact Jaccard, fast)
    for name in MODULES:
        mod = importlib.import_module(name)
        for attr, obj in sorted(vars(mod).items()):
            if attr.startswith("_") or getattr(obj, "__module__", None) != mod.__name__:
                continue
            if not (inspect.isfunction(obj) or inspect.isclass(obj)):
                continue
            text = pydoc.plaintext.document(obj, attr)
            if len(text.split()) < min_words:
                continue
            s = shingle_set(text)
            shared = Counter(i for g in s for i in postings.get(g, ()))
            if any(c / (len(s) + sizes[i] - c) >= max_jaccard for i, c in shared.items()):
                continue
            for g in s:
                postings.setdefault(g, []).append(len(docs))
            docs.append(text)
            sizes.append(len(s))
            if len(docs) >= limit:
                return docs
    return docs


def edit_words(text: str, frac: float, rng: random.Random) -> str:
    """Replace, delete or insert ``frac`` of the words at random positions (about 0.75 5-gram Jaccard at 3 %)."""
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


@pytest.fixture(scope="module")
def planted():
    """Distinct documents plus 10 % copies with 3 % of their words edited: (docs, true pairs)."""
    rng = random.Random(7)
    docs = distinct_docs()
    n = len(docs)
    pairs = set()
    for i in rng.sample(range(n), n // 10):
        docs.append(edit_words(docs[i], 0.03, rng))
        pairs.add((i, len(docs) - 1))
    return docs, pairs


def candidate_pairs(docs: list[str], p: DedupParams, tmp_path) -> set[tuple[int, int]]:
    """Pairs the LSH stage links (band files -> band_links), kept when their signatures agree on
    ``p.min_similarity`` of the rows (what cluster() checks), as document indices."""
    signer = Signer(p)
    keys = np.array([make_key(0, 0, i) for i in range(len(docs))], dtype=np.uint64)
    sig, has = signer.signatures([signer.shingles(d) for d in docs])
    assert has.all()
    bh = signer.band_hashes(sig)
    write_band_files(tmp_path, 0, keys, {f"b{b:03d}": bh[:, b] for b in range(p.bands)})
    links = [band_links(t) for t in band_tasks([tmp_path], p)]
    groups: dict[int, set[int]] = {}
    for r in links:
        for a, b in r["links"].tolist():
            groups.setdefault(b, {b}).add(a)
    found = set()
    for members in groups.values():
        found |= {(int(x) & 0xFFFFFFFF, int(y) & 0xFFFFFFFF) for x, y in combinations(sorted(members), 2)}
    return {(a, b) for a, b in found if (sig[a] == sig[b]).mean() >= p.min_similarity}


def test_planted_near_duplicates_precision_recall(planted, tmp_path):
    docs, truth = planted
    assert len(docs) >= 300 and len(truth) >= 25
    found = candidate_pairs(docs, DedupParams(bands=20, rows=5, min_similarity=0.5), tmp_path / "b20")
    tp = len(found & truth)
    precision, recall = tp / max(1, len(found)), tp / len(truth)
    assert precision >= 0.97 and recall >= 0.95, (precision, recall, len(found), len(truth))
    # datatrove's 14 x 8 is stricter: same precision, lower recall at 3 % edits (about 0.8)
    found = candidate_pairs(docs, DedupParams(bands=14, rows=8), tmp_path / "b14")
    tp = len(found & truth)
    assert tp / max(1, len(found)) >= 0.97 and 0.6 <= tp / len(truth) <= 0.95


@pytest.fixture(scope="module")
def all_copied():
    """Distinct documents, then a copy of each with 3 % of its words substituted, deleted or
    inserted (fixed seed): (docs, indices of the copies). One miss moves recall by < 0.5 %."""
    rng = random.Random(19)
    docs = distinct_docs()
    copies = [edit_words(d, 0.03, rng) for d in docs]
    return docs + copies, set(range(len(docs), len(docs) + len(copies)))


@pytest.mark.parametrize("profile", ["docs", "web"])
def test_shipped_dedup_default_catches_lightly_edited_copies(all_copied, profile, tmp_path):
    """What a user gets without tuning: the dedup block of conf/clean/<profile>.yaml, through the
    stage with the filters off (only dedup drops). Precision: dropped documents that are copies;
    recall: copies dropped."""
    docs, copies = all_copied
    assert len(copies) >= 200
    shipped = DedupParams.from_cfg(OmegaConf.load(ROOT / "conf" / "clean" / f"{profile}.yaml").dedup)
    cfg = load([f"paths.root={tmp_path}", f"clean={profile}", "clean.decontaminate.enabled=false"])
    assert DedupParams.from_cfg(cfg.clean.dedup) == shipped
    with open_dict(cfg):
        cfg.clean.steps = {}
    write_raw(tmp_path / "data" / "raw", raw_docs(docs, "d"), 200)
    clean.run(cfg)
    rejected = list(iter_rows(tmp_path / "data" / "clean" / "rejected", columns=["url", "step"]))
    assert {r["step"] for r in rejected} == {"dedup"}
    dropped = {int(r["url"][1:]) for r in rejected}
    precision, recall = len(dropped & copies) / max(1, len(dropped)), len(dropped & copies) / len(copies)
    assert precision >= 0.97 and recall >= 0.95, (shipped, precision, recall, len(dropped), len(copies))


def test_signatures_estimate_jaccard_and_handle_short_docs():
    p = DedupParams(bands=20, rows=5)
    signer = Signer(p)
    rng = random.Random(1)
    base = " ".join(f"w{rng.randrange(5000)}" for _ in range(2000))
    other = edit_words(base, 0.05, rng)
    s1, s2 = shingle_set(base), shingle_set(other)
    true_j = len(s1 & s2) / len(s1 | s2)
    sig, has = signer.signatures([signer.shingles(base), signer.shingles(other), signer.shingles(""),
                                  signer.shingles("just three words")])  # fmt: skip
    assert has.tolist() == [True, True, False, True]
    est = float((sig[0] == sig[1]).mean())
    assert abs(est - true_j) < 0.12, (est, true_j)
    # identical text -> identical signature, also for short texts with empty bins (densified)
    again, _ = signer.signatures([signer.shingles("just three words"), signer.shingles("Just  three WORDS!")])
    assert (again[0] == again[1]).all() and (again[0] == sig[3]).all()


def test_cjk_shingles_are_characters():
    signer = Signer(DedupParams())
    zh = "今天的天气非常好，我们一家人决定去公园散步。公园里有很多人在锻炼身体。"
    assert dedup_tokens(zh)[:4] == ["今", "天", "的", "天"]
    assert len(signer.shingles(zh)) == len(dedup_tokens(zh)) - 4  # character 5-grams


# ------------------------------------------------------------------ through the stage


def raw_docs(texts: list[str], prefix: str) -> list[dict]:
    return [{"id": doc_id(t), "url": f"{prefix}{i}", "source": "test", "content_type": "text/plain",
             "http_status": None, "html": None, "text": t} for i, t in enumerate(texts)]  # fmt: skip


def write_raw(raw_dir, docs, rows_per_shard, prefix="part"):
    w = ShardWriter(raw_dir, RAW_SCHEMA, rows_per_shard, prefix=prefix)
    for d in docs:
        w.write(d)
    return w.close()


def stage(root, *extra):
    return load([f"paths.root={root}", "clean.dedup.bands=20", "clean.dedup.rows=5", "clean.dedup.min_similarity=0.5",
                 *extra])  # fmt: skip


def test_stage_drops_planted_copies_and_funnel_adds_up(planted, tmp_path):
    docs, truth = planted
    write_raw(tmp_path / "data" / "raw", raw_docs(docs, "d"), 100)
    summary = clean.run(stage(tmp_path, "clean.decontaminate.enabled=false"))
    f = summary["funnel"]
    assert f["in"] == len(docs) == f["kept"] + sum(f["rejected"].values())
    assert f["bytes_in"] == f["bytes_kept_in"] + sum(f["rejected_bytes"].values())
    rejected = {r["url"]: r["reason"] for r in iter_rows(tmp_path / "data" / "clean" / "rejected")}
    copies = {f"d{j}" for _, j in truth}
    dropped = {u for u, r in rejected.items() if r in ("near_duplicate", "duplicate")}
    assert len(dropped & copies) >= 0.95 * len(copies)  # the later copy goes, the original stays
    assert len(dropped - copies) <= 0.03 * len(dropped)
    assert not {f"d{i}" for i, _ in truth} & dropped  # and the first occurrence survives


def test_incremental_run_dedups_against_kept_index(planted, tmp_path):
    docs, _ = planted
    first = docs[:150]
    raw = tmp_path / "data" / "raw"
    write_raw(raw, raw_docs(first, "a"), 50)
    s1 = clean.run(stage(tmp_path, "clean.decontaminate.enabled=false"))
    kept1 = sorted(p.name for p in (tmp_path / "data" / "clean").glob("*.parquet"))
    # a second ingest: edited copies of documents kept in run 1, an exact copy, and new documents
    rng = random.Random(3)
    again = [edit_words(t, 0.02, rng) for t in first[:20]] + [first[30]] + docs[150:170]
    write_raw(raw, raw_docs(again, "b"), 50, prefix="zz-new")
    s2 = clean.run(stage(tmp_path, "clean.incremental=true"))  # decontaminated against run 1's val docs too
    out = tmp_path / "data" / "clean"
    assert s2["incremental"]["run"] == 1 and s2["incremental"]["new_shards"] == ["zz-new-00000.parquet"]
    assert s2["this_run"]["in"] == len(again)
    assert s2["this_run"]["rejected"].get("near_duplicate", 0) >= 19
    assert s2["this_run"]["rejected"].get("duplicate", 0) == 1
    assert s2["funnel"]["in"] == 150 + len(again) == s2["funnel"]["kept"] + sum(s2["funnel"]["rejected"].values())
    assert set(kept1) <= {p.name for p in out.glob("*.parquet")}  # run 1's shards carried over unchanged
    assert s2["funnel"]["kept"] == s1["kept"] + s2["this_run"]["kept"]
    assert s2["decontaminate"]["val_docs"] >= 1
    assert read_json(out / INDEX / "index.json")["run"] == 1
    # nothing new: a third incremental run changes nothing
    s3 = clean.run(stage(tmp_path, "clean.decontaminate.enabled=false", "clean.incremental=true"))
    assert s3["this_run"]["in"] == 0 and s3["funnel"]["kept"] == s2["funnel"]["kept"]
    # different LSH parameters cannot reuse the index
    with pytest.raises(Exception, match="rebuild with clean.incremental=false"):
        clean.run(stage(tmp_path, "clean.incremental=true", "clean.dedup.rows=6"))


def test_decontamination_drops_training_docs_sharing_heldout_ngrams(planted, tmp_path):
    from pipeline.filters.steps import Normalize

    docs, _ = planted
    base = [Normalize()({"text": t})["text"] for t in docs[:120]]  # so the split is decided on what clean keeps
    val = [i for i, t in enumerate(base) if is_val(doc_id(t), 0.1)]
    train = [i for i, t in enumerate(base) if not is_val(doc_id(t), 0.1)]
    assert val and len(train) > 10
    # a training page that quotes 40 words of a validation page, and one that quotes an external eval set
    v = base[val[0]].split()
    leak = base[train[0]] + "\n" + " ".join(v[10:50])
    secret = "the quick zebra jumps over seven lazy hippos while the orchestra plays a long slow waltz tonight"
    ext = tmp_path / "eval.jsonl"
    ext.write_text(f'{{"question": "q1", "answer": "{secret}"}}\n')
    texts = [leak if i == train[0] else t for i, t in enumerate(base)]
    texts[train[1]] = texts[train[1]] + "\n" + secret.upper() + "."
    write_raw(tmp_path / "data" / "raw", raw_docs(texts, "d"), 60)
    summary = clean.run(stage(tmp_path, "clean.decontaminate.min_overlap=0.0", f"clean.decontaminate.paths=[{ext}]"))
    rejected = {r["url"]: (r["step"], r["reason"]) for r in iter_rows(tmp_path / "data" / "clean" / "rejected")}
    assert rejected[f"d{train[0]}"] == ("decontaminate", "contaminated")
    assert rejected[f"d{train[1]}"] == ("decontaminate", "contaminated")
    kept = {r["url"] for r in iter_rows(tmp_path / "data" / "clean", columns=["url"])}
    assert f"d{val[0]}" in kept  # held-out documents themselves stay (the shard stage holds them out)
    assert summary["decontaminate"]["external_texts"] == 1 and summary["decontaminate"]["val_docs"] >= 1
    f = summary["funnel"]
    assert f["steps"][-1]["step"] == "decontaminate" and f["rejected_by_step"]["decontaminate"]["contaminated"] >= 2
    assert f["in"] == f["kept"] + sum(f["rejected"].values())
    assert pq.read_schema(tmp_path / "data" / "clean" / "rejected" / "part-00000.parquet").field("text")
