"""Tokenizer stage: train a byte-level BPE on a sample of the cleaned training documents.

Byte-level BPE (GPT-2 style) never meets an unknown character, and every token maps to a
fixed byte string, which is what makes bits-per-byte exact downstream. Validation documents
are left out of training so held-out scores are not flattered by the vocabulary.

`tokenizer.json` (Hugging Face `tokenizers`) is the single source of truth. Beside it:
`tokenizer_config.json` (special tokens and the chat template, so `transformers` loads the
directory as a chat tokenizer) and `stats.json` (compression on the validation split,
overall and per language, and against GPT-2's tokenizer when it is available offline).

`FastEncoder` runs the same BPE through `tiktoken` (ranks converted from the merges, same
split regex), which encodes several times faster; it returns the `tokenizers` ids exactly,
re-encoding with `tokenizers` any document whose result it cannot prove identical.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Iterator, Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tokenizers import (
    Regex,
    Tokenizer,
    decoders,
    models,
    pre_tokenizers,
    processors,
    trainers,
)

from pipeline.artifacts import (
    Timer,
    atomic_dir,
    parquet_files,
    require_dir,
    sha256_file,
    write_json,
    write_summary,
)
from pipeline.errors import PipelineError
from pipeline.splits import is_val

log = logging.getLogger(__name__)

EOT, PAD, SYSTEM, USER, ASSISTANT, END = (
    "<|endoftext|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>",
)

# Pre-tokenisation (split) regexes. `gpt2` is what `ByteLevel(use_regex=True)` applies; `gpt4`
# is cl100k's (digits in groups of up to 3, case-insensitive contractions, newlines kept apart).
PATTERNS = {
    "gpt2": r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""",
    "gpt4": r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+""",
}

# The fine-tuning format of `sft_data.chat_prompt` / `encode_pair`: `<|endoftext|>` (bos) opens
# the example, each turn is `<|role|>content<|end|>`, and the prompt ends with `<|assistant|>`.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown chat role ' + m['role'] + ': expected system, user or assistant') }}{% endif %}"
    "<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)



def _lang_samples_path() -> Path | None:
    """`tokenizer/lang_samples.json` of the config tree in use, else the one beside the package."""
    from pipeline.config import PACKAGE_CONF, conf_dir

    for root in (conf_dir, lambda: PACKAGE_CONF):
        try:
            path = root() / "tokenizer" / "lang_samples.json"
        except PipelineError:
            continue
        if path.is_file():
            return path
    return None


def load(path: Path) -> Tokenizer:
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise PipelineError(f"tokenizer not found at {path}: run `python -m pipeline tokenizer` first")
    return Tokenizer.from_file(str(path))


def build(cfg_tok) -> tuple[Tokenizer, trainers.BpeTrainer]:
    pattern = str(cfg_tok.get("pattern", "gpt2"))
    tok = Tokenizer(models.BPE())
    if pattern == "gpt2":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    elif pattern == "gpt4":
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(PATTERNS["gpt4"]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    else:
        raise PipelineError(f"unknown tokenizer.pattern {pattern!r}: expected one of {', '.join(PATTERNS)}")
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=int(cfg_tok.vocab_size),
        min_frequency=int(cfg_tok.min_frequency),
        special_tokens=list(cfg_tok.special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    return tok, trainer


@lru_cache(maxsize=1)
def _unicode_to_byte() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode table used by the ByteLevel pre-tokenizer."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def token_bytes(tok: Tokenizer) -> list[bytes]:
    """The exact byte string of every token id (special tokens: empty; other added tokens:
    their text, which decoding emits as is)."""
    table = _unicode_to_byte()
    added = {i: t for i, t in tok.get_added_tokens_decoder().items()}
    out = []
    for i in range(tok.get_vocab_size()):
        s = tok.id_to_token(i)
        if i in added:
            out.append(b"" if added[i].special else added[i].content.encode("utf-8"))
        else:
            out.append(b"" if s is None else bytes(table[c] for c in s))
    return out


def token_byte_lengths(tok: Tokenizer) -> np.ndarray:
    """UTF-8 byte length per token id; summing it over a token stream gives its byte count."""
    return np.array([len(b) for b in token_bytes(tok)], dtype=np.int64)


def encode_plain(tok: Tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Ids of documents as plain text: a literal "<|endoftext|>" inside a document is text,
    not a boundary token (the way tiktoken's encode_ordinary treats it)."""
    before = tok.encode_special_tokens
    tok.encode_special_tokens = True
    try:
        return [e.ids for e in tok.encode_batch(list(texts), add_special_tokens=False)]
    finally:
        tok.encode_special_tokens = before


# ---------------------------------------------------------------- tiktoken with our vocabulary


class Unconvertible(Exception):
    """The tokenizer uses a feature tiktoken cannot reproduce; callers use `tokenizers` alone."""


def split_pattern(spec: dict) -> str:
    """The split regex of a byte-level tokenizer.json, or Unconvertible."""
    pre = spec.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space"):
        return PATTERNS["gpt2"]
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
    if (
        len(steps) == 2
        and steps[0].get("type") == "Split"
        and "Regex" in steps[0].get("pattern", {})
        and steps[0].get("behavior") == "Isolated"
        and not steps[0].get("invert")
        and steps[1].get("type") == "ByteLevel"
        and not steps[1].get("use_regex", True)
        and not steps[1].get("add_prefix_space")
    ):
        return steps[0]["pattern"]["Regex"]
    raise Unconvertible(f"pre-tokenizer {pre.get('type')!r} is not a byte-level regex split")


class FastEncoder:
    """`tiktoken` over the ranks of a trained byte-level BPE, returning `tokenizers` ids.

    tiktoken merges the adjacent pair whose concatenation has the lowest rank; `tokenizers`
    merges the adjacent pair that comes first in the merge list. With rank = merge position
    they agree at every step unless tiktoken merges a pair that is *not* in the merge list
    (its concatenation being a token made from a different split). Within one output token
    tiktoken's merges are exactly those it makes on that token's bytes alone, so each token
    is simulated once here: a token reached through an unlisted merge is `unsafe`, and any
    document whose tiktoken ids contain one is re-encoded by `tokenizers`. What remains
    unproved is the regex engines agreeing (onig vs fancy-regex, same pattern), which the
    callers check by re-encoding a sample.
    """

    def __init__(self, tok: Tokenizer) -> None:
        try:
            import tiktoken
        except ImportError as e:
            raise Unconvertible("tiktoken is not installed (`pip install tiktoken`)") from e
        spec = json.loads(tok.to_str())
        model = spec["model"]
        if model.get("type") != "BPE":
            raise Unconvertible(f"model is {model.get('type')}, not BPE")
        if spec.get("normalizer") or model.get("dropout") or model.get("byte_fallback") or model.get(
            "continuing_subword_prefix"
        ) or model.get("end_of_word_suffix"):
            raise Unconvertible("normalizer, dropout, byte fallback or subword affixes are set")
        if (spec.get("decoder") or {}).get("type") != "ByteLevel":
            raise Unconvertible("decoder is not ByteLevel")
        if any(not t.special for t in tok.get_added_tokens_decoder().values()):
            raise Unconvertible("added non-special tokens are matched before BPE")
        pattern = split_pattern(spec)
        table = _unicode_to_byte()
        vocab: dict[str, int] = model["vocab"]

        def raw(s: str) -> bytes:
            try:
                return bytes(table[c] for c in s)
            except KeyError as e:
                raise Unconvertible(f"token {s!r} is not byte-level") from e

        ranks: dict[bytes, int] = {}
        rank_to_id: list[int] = []
        for b in range(256):
            s = "".join(c for c, v in table.items() if v == b)
            if s not in vocab:
                raise Unconvertible(f"byte {b} has no token (alphabet incomplete)")
            ranks[bytes([b])] = b
            rank_to_id.append(vocab[s])
        pair: list[tuple[bytes, bytes]] = []
        for m in model["merges"]:
            a, c = m if isinstance(m, list) else m.split(" ", 1)
            x, y = raw(a), raw(c)
            if x + y in ranks:
                raise Unconvertible(f"two merges make the token {a + c!r}")
            if a + c not in vocab:
                raise Unconvertible(f"merge result {a + c!r} is not in the vocabulary")
            ranks[x + y] = len(rank_to_id)
            rank_to_id.append(vocab[a + c])
            pair.append((x, y))
        if model.get("ignore_merges"):
            made = set(rank_to_id)
            special = {t.content for t in tok.get_added_tokens_decoder().values()}
            if any(i not in made for s, i in vocab.items() if s not in special):
                raise Unconvertible("ignore_merges with tokens no merge makes")
        self.unsafe = np.zeros(len(rank_to_id), dtype=bool)
        for data, r in ranks.items():
            if r >= 256 and not _merges_only_listed(data, ranks, pair):
                self.unsafe[r] = True
        self.rank_to_id = np.asarray(rank_to_id, dtype=np.uint32)
        self.id_to_rank = np.full(tok.get_vocab_size(), -1, dtype=np.int64)
        self.id_to_rank[self.rank_to_id] = np.arange(len(rank_to_id))
        self.pattern = pattern
        self.tok = tok
        name = hashlib.sha256(tok.to_str().encode()).hexdigest()[:16]
        self.enc = tiktoken.Encoding(name=f"pipeline-{name}", pat_str=pattern, mergeable_ranks=ranks, special_tokens={})
        self.fallback_docs = 0

    def ranks(self, text: str) -> np.ndarray:
        return self.enc.encode_to_numpy(text, disallowed_special=())

    def encode(self, texts: Sequence[str], threads: int = 1) -> list[np.ndarray]:
        """`tokenizers` ids (uint32) of each document, as plain text."""
        out: list[np.ndarray | None] = []
        redo = []
        if threads > 1:  # tiktoken's batch call releases the GIL per document
            all_ranks = [np.asarray(r, dtype=np.uint32) for r in self.enc.encode_ordinary_batch(list(texts), num_threads=threads)]
        else:
            all_ranks = [self.ranks(t) for t in texts]
        for i, r in enumerate(all_ranks):
            if self.unsafe[r].any():
                out.append(None)
                redo.append(i)
            else:
                out.append(self.rank_to_id[r])
        if redo:
            self.fallback_docs += len(redo)
            for i, ids in zip(redo, encode_plain(self.tok, [texts[i] for i in redo])):
                out[i] = np.asarray(ids, dtype=np.uint32)
        return out  # type: ignore[return-value]

    def decode_bytes(self, ids: np.ndarray) -> bytes:
        ranks = self.id_to_rank[np.asarray(ids, dtype=np.int64)]
        if (ranks < 0).any():
            raise ValueError("special or unknown token id in a plain-text stream")
        return self.enc.decode_bytes(ranks.tolist())


def _merges_only_listed(data: bytes, ranks: dict[bytes, int], pair: list[tuple[bytes, bytes]]) -> bool:
    """Does tiktoken's BPE on `data` alone end in `data` as one token, via listed merges only?"""
    parts = [data[i : i + 1] for i in range(len(data))]
    while len(parts) > 1:
        best, at = None, -1
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and (best is None or r < best):
                best, at = r, i
        if best is None:
            return False
        if pair[best - 256] != (parts[at], parts[at + 1]):
            return False
        parts[at : at + 2] = [parts[at] + parts[at + 1]]
    return True


def fast_encoder(tok: Tokenizer) -> tuple[FastEncoder | None, str]:
    """A FastEncoder when the tokenizer converts exactly, else None and why."""
    try:
        return FastEncoder(tok), "tiktoken"
    except Unconvertible as e:
        return None, str(e)


# ---------------------------------------------------------------- training sample


def valid_id(doc_id) -> bool:
    """Document ids are hex content hashes; the split and sample keys need at least 16 digits."""
    if not isinstance(doc_id, str) or len(doc_id) < 16:
        return False
    try:
        int(doc_id[:16], 16)
    except ValueError:
        return False
    return True


def _sample_key(seed: int, doc_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed}:{doc_id}".encode(), digest_size=8).digest(), "big")


def _train_ids_and_sizes(clean_dir: Path, val_fraction: float, seed: int):
    """Sample keys and UTF-8 sizes of the training documents (text is read, never kept),
    the readable shards, and the unreadable ones (named, counted, skipped)."""
    keys, sizes, good, bad = [], [], [], []
    for f in parquet_files(clean_dir):
        k0 = len(keys)
        try:
            for batch in pq.ParquetFile(f).iter_batches(columns=["id", "text"], batch_size=2048):
                lengths = pc.binary_length(batch.column(1)).to_pylist()
                for doc_id, n in zip(batch.column(0).to_pylist(), lengths):
                    if n is None or not valid_id(doc_id) or is_val(doc_id, val_fraction):
                        continue
                    keys.append(_sample_key(seed, doc_id))
                    sizes.append(n)
        except (OSError, ValueError, KeyError) as e:  # unreadable or malformed Parquet
            del keys[k0:], sizes[k0:]
            bad.append(f"{f.name}: {type(e).__name__}: {e}")
            log.warning("skipped unreadable clean shard %s", bad[-1])
            continue
        good.append(f)
    return np.asarray(keys, dtype=np.uint64), np.asarray(sizes, dtype=np.int64), good, bad


def sample_threshold(keys: np.ndarray, sizes: np.ndarray, max_bytes: int) -> int | None:
    """Largest sample key to keep so the kept documents total at most `max_bytes` (None: all)."""
    if int(sizes.sum()) <= max_bytes:
        return None
    order = np.argsort(keys, kind="stable")
    within = np.cumsum(sizes[order]) <= max_bytes
    n = max(1, int(within.sum()) if within.all() else int(np.argmin(within)))
    return int(keys[order[n - 1]])


def train_texts(files, val_fraction: float, seed: int, threshold: int | None, seen: dict,
                batched: bool = False) -> Iterator:
    """The training sample, streamed in shard order: training documents whose key <= threshold.

    Filtering happens on the id column, so only the kept texts become Python strings. With
    ``batched``, yields lists of up to 256 texts: the trainer then pulls one Python object per
    batch instead of per document, which is most of what it costs over a list in memory."""
    for f in [files] if isinstance(files, (str, Path)) else files:
        for batch in pq.ParquetFile(f).iter_batches(columns=["id", "text"], batch_size=256):
            keep = [
                valid_id(i) and not is_val(i, val_fraction) and (threshold is None or _sample_key(seed, i) <= threshold)
                for i in batch.column(0).to_pylist()
            ]
            texts = batch.filter(pa.array(keep)).column(1).drop_null()
            seen["bytes"] += int(pc.sum(pc.binary_length(texts)).as_py() or 0)
            seen["docs"] += len(texts)
            if batched:
                if len(texts):
                    yield texts.to_pylist()
            else:
                yield from texts.to_pylist()


def training_sample(cfg) -> tuple[list[Path], int | None, dict]:
    """(readable clean shards, sample threshold, plan) for the stage's config; benchmarks reuse it."""
    clean_dir = require_dir(cfg.paths.clean, "clean documents", "clean")
    seed = int(cfg.tokenizer.get("sample_seed", cfg.get("seed", 0)))
    keys, sizes, files, bad = _train_ids_and_sizes(clean_dir, float(cfg.shard.val_fraction), seed)
    if not files:
        raise PipelineError(f"no readable clean shards (*.parquet) in {clean_dir}" + (f": {bad[0]}" if bad else ""))
    threshold = sample_threshold(keys, sizes, int(cfg.tokenizer.max_train_bytes))
    plan = {
        "rule": "training documents (not is_val) whose blake2b-64(f'{seed}:{doc_id}') is among the smallest "
        "keys that fit in max_train_bytes; all of them when they fit",
        "seed": seed,
        "max_train_bytes": int(cfg.tokenizer.max_train_bytes),
        "available_docs": len(keys),
        "available_bytes": int(sizes.sum()),
        "bad_files": bad,
    }
    return files, threshold, plan


# ---------------------------------------------------------------- stats

_HAN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002fa1f]")
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


# ---------------------------------------------------------------- transformers interop


def tokenizer_config(tok: Tokenizer) -> dict:
    """`tokenizer_config.json` for transformers: special tokens named, chat template, no cleanup."""
    added = {
        str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized, "rstrip": t.rstrip,
                 "single_word": t.single_word, "special": t.special}
        for i, t in sorted(tok.get_added_tokens_decoder().items())
    }
    names = [t["content"] for t in added.values()]
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    if EOT in names:
        cfg.update(bos_token=EOT, eos_token=EOT)
    if PAD in names:
        cfg["pad_token"] = PAD
    roles = [t for t in (SYSTEM, USER, ASSISTANT, END) if t in names]
    if roles:
        cfg["additional_special_tokens"] = roles
    return cfg


def run(cfg) -> dict:
    timer = Timer()
    files, threshold, plan = training_sample(cfg)
    clean_dir = Path(cfg.paths.clean)
    seen = {"docs": 0, "bytes": 0}
    tok, trainer = build(cfg.tokenizer)
    seed, val_fraction = plan["seed"], float(cfg.shard.val_fraction)
    tok.train_from_iterator(train_texts(files, val_fraction, seed, threshold, seen, batched=True), trainer=trainer)
    if seen["docs"] == 0:
        raise PipelineError(f"no training documents in {clean_dir} (all held out or empty)")
    train_seconds = timer.seconds
    stats = {
        "vocab_size": tok.get_vocab_size(),
        "pattern": str(cfg.tokenizer.get("pattern", "gpt2")),
        "special_tokens": {t: tok.token_to_id(t) for t in cfg.tokenizer.special_tokens},
        "train_docs": seen["docs"],
        "train_bytes": seen["bytes"],
        "train_sample": plan,
        **compute_stats(tok, cfg, files),
    }
    out = Path(cfg.paths.tokenizer)
    with atomic_dir(out) as tmp:
        tok.save(str(tmp / "tokenizer.json"))
        write_json(tmp / "tokenizer_config.json", tokenizer_config(tok))
        write_json(tmp / "stats.json", stats)
        summary = write_summary(
            tmp, "tokenizer", cfg, {"clean": clean_dir}, timer,
            tokenizer_sha256=sha256_file(tmp / "tokenizer.json"), train_seconds=train_seconds,
            bad_files=plan["bad_files"],
            **{k: v for k, v in stats.items() if k not in ("per_language", "val", "train_sample")},
        )
    return summary
