"""`stats.json` of the tokenizer: bytes per token on the validation split, overall and per
language, GPT-2's tokenizer on the same text when it is available offline, round-trip checks.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tokenizers import (
    Tokenizer,
)

from pipeline.core.errors import PipelineError
from pipeline.core.splits import is_val
from pipeline.filters.text import HAN, HAN_SUPPLEMENT
from pipeline.tokenize.bpe import encode_plain
from pipeline.tokenize.fast import fast_encoder
from pipeline.tokenize.sample import valid_id


def _lang_samples_path() -> Path | None:
    """`tokenizer/lang_samples.json` of the config tree in use, else the one beside the package."""
    from pipeline.core.config import PACKAGE_CONF, conf_dir

    for root in (conf_dir, lambda: PACKAGE_CONF):
        try:
            path = root() / "tokenizer" / "lang_samples.json"
        except PipelineError:
            continue
        if path.is_file():
            return path
    return None


_HAN = re.compile(f"[{HAN}{HAN_SUPPLEMENT}]")  # ideographs only: kana is not counted


_LATIN = re.compile(r"[A-Za-z\u00c0-\u024f]")


def language(text: str) -> str:
    """`zh` when Han characters outnumber Latin letters, `en` when Latin letters are there."""
    head = text[:4000]
    han, latin = len(_HAN.findall(head)), len(_LATIN.findall(head))
    if han and han >= latin:
        return "zh"
    return "en" if latin else "other"


def _gpt2_encoder():
    """GPT-2's tokenizer through tiktoken, from its local cache only (never downloads)."""
    try:
        import tiktoken
        import tiktoken.load as tl
    except ImportError:
        return None, "tiktoken is not installed"

    def offline(blobpath: str) -> bytes:
        raise OSError(f"{blobpath} is not in the local tiktoken cache (no download attempted)")

    real = tl.read_file
    tl.read_file = offline
    try:
        return tiktoken.get_encoding("gpt2"), "tiktoken gpt2 (local cache)"
    except Exception as e:  # noqa: BLE001 - any failure means "not available offline"
        return None, f"unavailable: {e}"
    finally:
        tl.read_file = real


def _measure(texts: list[str], nbytes: list[int], ids: list[np.ndarray], gpt2: list[int] | None) -> dict:
    total = sum(nbytes)
    ntok = int(sum(len(i) for i in ids))
    out = {"docs": len(texts), "bytes": total, "tokens": ntok, "bytes_per_token": round(total / max(1, ntok), 4)}
    if gpt2 is not None:
        g = sum(gpt2)
        out["gpt2_tokens"] = g
        out["gpt2_bytes_per_token"] = round(total / max(1, g), 4)
    return out


def _val_texts(files: Sequence[Path], val_fraction: float, cap: int) -> list[str]:
    """Validation documents in shard order, up to `cap` bytes (only their text is converted)."""
    texts, total = [], 0
    for f in files:
        for batch in pq.ParquetFile(f).iter_batches(columns=["id", "text"], batch_size=512):
            keep = [valid_id(i) and is_val(i, val_fraction) for i in batch.column(0).to_pylist()]
            for text in batch.filter(pa.array(keep)).column(1).to_pylist():
                if total >= cap:
                    return texts
                if text is not None:
                    texts.append(text)
                    total += len(text.encode("utf-8"))
    return texts


def _stats_inputs(cfg, files) -> dict:
    """What `stats.json` needs that does not depend on the trained tokenizer: the validation
    texts (capped), their UTF-8 sizes and languages, the fixed language samples and GPT-2's
    token counts, each computed once per document (the per-language numbers reuse them)."""
    texts = _val_texts(files, float(cfg.shard.val_fraction), int(cfg.tokenizer.get("stats_max_bytes", 20_000_000)))
    samples_path = _lang_samples_path()
    samples = json.loads(samples_path.read_text()) if samples_path is not None else {}
    gpt2, gpt2_note = _gpt2_encoder()
    extra = {lang: samples.get(lang) or [] for lang in ("en", "zh")}

    def gpt2_counts(ts: list[str]) -> list[int] | None:
        return None if gpt2 is None else [len(x) for x in gpt2.encode_ordinary_batch(ts, num_threads=1)]

    return {
        "texts": texts,
        "nbytes": [len(t.encode("utf-8")) for t in texts],
        "languages": [language(t) for t in texts],
        "gpt2": gpt2_counts(texts),
        "gpt2_note": gpt2_note,
        "samples": extra,
        "samples_name": samples_path.name if samples_path is not None else None,
        "samples_nbytes": {lang: [len(t.encode("utf-8")) for t in ts] for lang, ts in extra.items()},
        "samples_gpt2": {lang: gpt2_counts(ts) for lang, ts in extra.items()},
    }


def compute_stats(tok: Tokenizer, cfg, files) -> dict:
    """Bytes per token on the validation split, overall and per language, plus checks:
    every validation document decodes back to its text, and on a bounded sample (plus the
    language samples) `tokenizers` ids round-trip and equal the fast encoder's."""
    inputs = _stats_inputs(cfg, files)
    fast, why = fast_encoder(tok)
    threads = os.cpu_count() or 1  # training is over: every core is free
    encode = (lambda ts: fast.encode(ts, threads)) if fast is not None else (
        lambda ts: [np.asarray(i) for i in encode_plain(tok, ts)]
    )
    cap = int(cfg.tokenizer.get("stats_max_bytes", 20_000_000))
    texts, nbytes, gpt2 = inputs["texts"], inputs["nbytes"], inputs["gpt2"]
    ids = encode(texts)

    def pick(xs, idx):
        return None if xs is None else [xs[i] for i in idx]

    stats: dict = {"val": {**_measure(texts, nbytes, ids, gpt2), "capped_at_bytes": cap}}
    by_lang: dict[str, list[int]] = {}
    for i, lang in enumerate(inputs["languages"]):
        by_lang.setdefault(lang, []).append(i)
    per_language = {}
    for lang, idx in sorted(by_lang.items()):
        per_language[lang] = {"source": "validation split",
                              **_measure(pick(texts, idx), pick(nbytes, idx), pick(ids, idx), pick(gpt2, idx))}
    extra_texts: list[str] = []
    for lang, extra in inputs["samples"].items():
        extra_texts += extra
        if lang not in per_language and extra:
            per_language[lang] = {
                "source": f"conf/tokenizer/{inputs['samples_name']} (the validation split has no {lang} document)",
                **_measure(extra, inputs["samples_nbytes"][lang], encode(extra), inputs["samples_gpt2"][lang]),
            }
    stats["per_language"] = per_language
    stats["language_rule"] = "by script: zh when Han characters outnumber Latin letters, en when Latin letters are present"
    stats["gpt2"] = inputs["gpt2_note"]
    stats["bytes_per_token"] = stats["val"]["bytes_per_token"]

    # round trip of every validation document (the ids above), then `tokenizers` itself and
    # the fast encoder against it on a bounded sample (the first `check_chars` of each
    # validation document, up to `check_bytes`) plus the language samples
    if fast is not None:
        bad = sum(fast.decode_bytes(i) != t.encode("utf-8") for i, t in zip(ids, texts))
    else:
        bad = sum(d != t for d, t in zip(tok.decode_batch([i.tolist() for i in ids], skip_special_tokens=False), texts))
    check_cap, check_chars = int(cfg.tokenizer.get("check_bytes", 16_000)), int(cfg.tokenizer.get("check_chars", 2000))
    sample, n = [], 0
    for t in texts:
        if n >= check_cap:
            break
        sample.append(t[:check_chars])
        n += len(sample[-1].encode("utf-8"))
    sample += extra_texts
    truth = encode_plain(tok, sample)
    bad += sum(d != t for d, t in zip(tok.decode_batch(truth, skip_special_tokens=False), sample))
    checked = len(texts) + len(sample)
    stats["roundtrip"] = {"docs": checked, "val_docs": len(texts), "sample_pieces": len(sample), "failures": bad}
    if bad:
        raise PipelineError(f"tokenizer round trip failed on {bad} of {checked} checked documents")
    if fast is not None:
        same = sum(np.array_equal(a, np.asarray(b, dtype=np.uint32)) for a, b in zip(fast.encode(sample), truth))
        stats["fast_encoder"] = {
            "kind": "tiktoken", "unsafe_tokens": int(fast.unsafe.sum()), "checked_docs": len(sample),
            "identical_docs": int(same),
        }
        if same != len(sample):
            raise PipelineError(f"tiktoken conversion differs from tokenizers on {len(sample) - same} documents")
    else:
        stats["fast_encoder"] = {"kind": None, "reason": why}
    return stats
