"""Decontamination: drop training documents that share a long n-gram with held-out text.

What is held out in this project, and so what a training document must not contain:

* **the validation split** - kept documents whose id hashes into ``shard.val_fraction``
  (pipeline.core.splits.is_val; the shard stage holds them out, the eval stage scores
  bits-per-byte on them). The default fine-tuning set's held-out pairs are questions
  about these same documents (pipeline.training.sft_data splits pairs by source document), so
  their answers are val-document text and are covered by this check too;
* **held-out pairs of a custom fine-tuning set** (``finetune.data``), split the way
  pipeline.training.sft_data does (by question hash, same fraction);
* **external evaluation sets** (``clean.decontaminate.paths``: .txt, .json or .jsonl; every
  string field of a record counts).

A training document is contaminated when one of its ``ngram``-token n-grams (13 by
default, as in GPT-3's analysis; tokens as MinHash sees them: lowercased words, CJK
characters one by one) also occurs in held-out text. Documentation repeats boilerplate
("Methods inherited from builtins.object: __init__(self, /, *args, **kwargs) Initialize
self...") on hundreds of pages, so an n-gram shared with the validation split only
counts when at most ``max_train_docs`` training documents contain it: a passage copied
between a handful of pages (``os`` and ``posix``) is leakage, a sentence on every page is
template. N-grams from fine-tuning and external sets always count. A document is dropped
when the n-grams that count are more than ``min_overlap`` of its own n-grams: 0 drops on
any shared n-gram (GPT-3's rule, the `web` default); the `docs` profile uses 0.02, since
one shared docstring sentence (of 7,000 n-grams on the ``os`` page) leaks next to nothing,
while ``os``, which shares 67 % of its n-grams with the held-out ``posix`` page, is dropped.

Memory: the held-out n-gram set is held in memory (8 bytes per held-out token; held-out
sets are small by design); training documents stream shard by shard through the executor
and only their hits come back.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np

from pipeline.core.artifacts import doc_id
from pipeline.dedup.minhash import GOLDEN, mix64
from pipeline.filters.text import dedup_tokens
from pipeline.core.errors import PipelineError
from pipeline.core.parquet import iter_rows
from pipeline.core.splits import is_val


def ngram_hashes(text: str, n: int) -> np.ndarray:
    """Sorted unique 64-bit hashes of the text's n-token n-grams (empty when shorter than n)."""
    import xxhash

    toks = dedup_tokens(text)
    if len(toks) < n:
        return np.zeros(0, dtype=np.uint64)
    w = np.fromiter((xxhash.xxh3_64_intdigest(t.encode("utf-8", "surrogatepass")) for t in toks),
                    dtype=np.uint64, count=len(toks))  # fmt: skip
    h = np.zeros(len(w) - n + 1, dtype=np.uint64)
    for k in range(n):
        h = h * GOLDEN + w[k : k + len(h)]
    return np.unique(mix64(h))


def _strings(obj) -> list[str]:
    if isinstance(obj, str):
        return [obj]
    if isinstance(obj, dict):
        return [s for v in obj.values() for s in _strings(v)]
    if isinstance(obj, list):
        return [s for v in obj for s in _strings(v)]
    return []


def external_texts(paths: list[str], root: str) -> list[str]:
    """Texts of the configured evaluation sets: a .txt file is one text, JSON records give their strings."""
    out = []
    for p in paths:
        path = Path(p) if Path(p).is_absolute() else Path(root) / p
        if not path.is_file():
            raise PipelineError(f"clean.decontaminate.paths: {path} does not exist")
        raw = path.read_text(encoding="utf-8")
        if path.suffix == ".jsonl":
            for i, line in enumerate(raw.splitlines(), 1):
                if line.strip():
                    try:
                        out.append("\n".join(_strings(json.loads(line))))
                    except json.JSONDecodeError as e:
                        raise PipelineError(f"{path}:{i}: not valid JSON ({e.msg})") from e
        elif path.suffix == ".json":
            try:
                data = json.loads(raw)
            except json.JSONDecodeError as e:
                raise PipelineError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from e
            out.extend("\n".join(_strings(r)) for r in (data if isinstance(data, list) else [data]))
        else:
            out.append(raw)
    return out


def finetune_heldout_texts(cfg) -> list[str]:
    """Questions and answers of a custom fine-tuning set's held-out pairs (none for the derived default)."""
    data = cfg.get("finetune", {}).get("data") if "finetune" in cfg else None
    if not data:
        return []
    from pipeline.training import sft_data

    path = sft_data.resolve_data_path(data, cfg.paths.root)
    pairs = sft_data.load_custom(path, int(cfg.finetune.get("max_pairs", 0) or 0))
    _, held = sft_data.split_pairs(pairs, float(cfg.shard.val_fraction))
    return [f"{p['question']}\n{p['answer']}" for p in held]


def val_ngrams(task: dict) -> dict:
    """Worker: n-gram hashes of one shard's kept validation documents -> ``task['out']``."""
    drop = set(task["drop"])
    parts, n_val = [], 0
    keyed = task.get("keyed", True)  # shards carried over from an earlier run hold kept documents, without keys
    for row in iter_rows(task["path"], columns=["text", "key"] if keyed else ["text"]):
        if keyed and row["key"] in drop:
            continue
        if is_val(doc_id(row["text"]), task["val_fraction"]):
            n_val += 1
            parts.append(ngram_hashes(row["text"], task["ngram"]))
    arr = np.unique(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.uint64)
    np.save(task["out"], arr, allow_pickle=False)
    return {"val_docs": n_val}


def train_hits(task: dict) -> dict:
    """Worker: for one shard's kept training documents, the held-out n-grams each contains."""
    drop = set(task["drop"])
    held = np.load(task["held"], mmap_mode="r")
    hits = []
    for row in iter_rows(task["path"], columns=["text", "key"]):
        if row["key"] in drop or is_val(doc_id(row["text"]), task["val_fraction"]):
            continue
        h = ngram_hashes(row["text"], task["ngram"])
        if len(h) and len(held):
            pos = np.minimum(np.searchsorted(held, h), len(held) - 1)
            found = h[held[pos] == h]
            if len(found):
                hits.append((row["key"], found.tolist(), len(h)))
    return {"hits": hits}


def contaminated(results: list[dict], strict: np.ndarray, max_train_docs: int, min_overlap: float) -> dict[int, int]:
    """Training keys to drop -> number of decisive shared n-grams."""
    df: Counter[int] = Counter()
    for r in results:
        for _, found, _ in r["hits"]:
            df.update(found)
    strict_set = set(strict.tolist())
    out = {}
    for r in results:
        for key, found, total in r["hits"]:
            bad = sum(1 for g in found if g in strict_set or df[g] <= max_train_docs)
            if bad and bad / total > min_overlap:
                out[key] = bad
    return out


def settings(cfg) -> dict:
    """``clean.decontaminate`` with its defaults, unknown keys refused."""
    from omegaconf import OmegaConf

    d = cfg.clean.get("decontaminate")
    d = OmegaConf.to_container(d, resolve=True) if d is not None else {}
    known = {"enabled", "ngram", "max_train_docs", "min_overlap", "paths"}
    if set(d) - known:
        raise PipelineError(f"clean.decontaminate: unknown keys {sorted(set(d) - known)} (known: {sorted(known)})")
    return {"enabled": bool(d.get("enabled", False)), "ngram": int(d.get("ngram", 13)),
            "max_train_docs": int(d.get("max_train_docs", 5)), "min_overlap": float(d.get("min_overlap", 0.0)),
            "paths": list(d.get("paths") or [])}  # fmt: skip


def find_contaminated(cfg, dc: dict, work: Path, cand: list[Path], prev_kept: list[Path], drop: dict,
                      executor) -> tuple[dict[int, int], dict]:  # fmt: skip
    """Keys of contaminated training documents among the candidate shards ``cand`` (keys in
    ``drop`` already gone) -> shared n-gram count, and what was checked. Validation documents
    of ``cand`` and of shards kept by earlier runs (``prev_kept``) count as held out."""
    from pipeline.core.executor import map_ordered

    fraction = float(cfg.shard.val_fraction)
    dropped = sorted(drop)
    vtasks = [{"path": str(f), "drop": dropped, "val_fraction": fraction, "ngram": dc["ngram"],
               "out": str(work / f"val-{i:05d}.npy")} for i, f in enumerate(cand)]  # fmt: skip
    vtasks += [{"path": str(f), "drop": [], "keyed": False, "val_fraction": fraction, "ngram": dc["ngram"],
                "out": str(work / f"val-prev-{i:05d}.npy")} for i, f in enumerate(prev_kept)]  # fmt: skip
    vres = map_ordered(val_ngrams, vtasks, executor)
    strict_texts = external_texts(dc["paths"], cfg.paths.root) + finetune_heldout_texts(cfg)
    strict_parts = [ngram_hashes(t, dc["ngram"]) for t in strict_texts]
    strict = np.unique(np.concatenate(strict_parts)) if strict_parts else np.zeros(0, dtype=np.uint64)
    held = np.unique(np.concatenate([strict, *(np.load(t["out"]) for t in vtasks)]))
    np.save(work / "held.npy", held, allow_pickle=False)
    htasks = [{"path": str(f), "drop": dropped, "val_fraction": fraction, "ngram": dc["ngram"],
               "held": str(work / "held.npy")} for f in cand]  # fmt: skip
    hres = map_ordered(train_hits, htasks, executor)
    bad = contaminated(hres, strict, dc["max_train_docs"], dc["min_overlap"])
    info = {"ngram": dc["ngram"], "max_train_docs": dc["max_train_docs"], "min_overlap": dc["min_overlap"],
            "val_docs": sum(r["val_docs"] for r in vres),
            "external_texts": len(strict_texts), "heldout_ngrams": len(held), "contaminated": len(bad)}  # fmt: skip
    return bad, info
