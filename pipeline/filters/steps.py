"""Cleaning steps: one small class per job, composed in order from ``cfg.clean.steps``.

A step is called with a document (a dict with at least ``html`` or ``text``) and returns it,
possibly changed, or a :class:`Reject` with a short reason that the funnel counts. To add a
filter, write a subclass of :class:`Step` here (or anywhere importable) and add one
``- _target_: module.ClassName`` line to the profile in ``conf/clean/``.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

import numpy as np

from pipeline.filters.text import (
    PUNCTUATION_SET, TERMINAL, cjk_fraction, non_empty_lines, text_hash, token_table, words,
)
from pipeline.core.errors import PipelineError


@dataclass(frozen=True)
class Reject:
    reason: str


class Step:
    """Base class: ``name`` is what the funnel shows; ``needs_text`` steps get documents with text."""

    needs_text = True

    @property
    def name(self) -> str:
        return type(self).__name__

    def __call__(self, doc: dict) -> dict | Reject:  # pragma: no cover - interface
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{self.name}({args})"


def whitespace_words(text: str) -> list[str]:
    """Whitespace-separated words, for the `docs` profile's simple length rules (text.words is
    the spaCy-like tokeniser the Gopher/C4 rules use)."""
    return text.split()


# ---------------------------------------------------------------- extraction


class HtmlToText(Step):
    """Layout-preserving HTML to text (see html_text.py); documents that already have text pass."""

    needs_text = False

    def __init__(self, drop_tags=("head", "script", "style", "form", "noscript"), drop_xpath=()) -> None:
        self.drop_tags = list(drop_tags)
        self.drop_xpath = list(drop_xpath)

    def __call__(self, doc: dict) -> dict | Reject:
        from lxml.etree import ParserError

        from pipeline.filters.html_text import extract, lang_hint

        if doc.get("text") is not None:
            return doc
        if not doc.get("html"):
            return Reject("no_content")
        try:
            text, title = extract(doc["html"], self.drop_tags, self.drop_xpath)
        except ParserError:
            return Reject("unparseable_html")
        return {**doc, "text": text, "html": None, "title": title, "language": lang_hint(doc["html"])}


class TrafilaturaExtract(Step):
    """Main-content extraction for web pages (drops navigation, ads, comments)."""

    needs_text = False

    def __init__(self, include_tables: bool = True, include_comments: bool = False, favor_precision: bool = False):
        try:
            import trafilatura  # noqa: F401
        except ImportError as e:  # pragma: no cover - installed by default
            raise PipelineError("TrafilaturaExtract needs `pip install trafilatura`") from e
        self.include_tables = include_tables
        self.include_comments = include_comments
        self.favor_precision = favor_precision

    def __call__(self, doc: dict) -> dict | Reject:
        import trafilatura

        if doc.get("text") is not None:
            return doc
        if not doc.get("html"):
            return Reject("no_content")
        import json

        from pipeline.filters.html_text import lang_hint

        out = trafilatura.extract(
            doc["html"],
            include_tables=self.include_tables,
            include_comments=self.include_comments,
            favor_precision=self.favor_precision,
            deduplicate=False,
            with_metadata=True,
            output_format="json",
        )
        meta = json.loads(out) if out else {}
        if not meta.get("text"):
            return Reject("no_main_content")
        return {**doc, "text": meta["text"], "html": None, "title": meta.get("title") or None,
                "language": lang_hint(doc["html"])}  # fmt: skip


class ResiliparseExtract(Step):
    """Main-content extraction with Resiliparse (C++; several times faster than trafilatura)."""

    needs_text = False

    def __init__(self, main_content: bool = True, alt_texts: bool = False, links: bool = False) -> None:
        try:
            import resiliparse  # noqa: F401
        except ImportError as e:  # pragma: no cover - installed by default
            raise PipelineError("ResiliparseExtract needs `pip install resiliparse`") from e
        self.main_content = bool(main_content)
        self.alt_texts = bool(alt_texts)
        self.links = bool(links)

    def __call__(self, doc: dict) -> dict | Reject:
        from resiliparse.extract.html2text import extract_plain_text
        from resiliparse.parse.html import HTMLTree

        from pipeline.filters.html_text import lang_hint

        if doc.get("text") is not None:
            return doc
        if not doc.get("html"):
            return Reject("no_content")
        tree = HTMLTree.parse(doc["html"])
        text = extract_plain_text(
            tree, main_content=self.main_content, alt_texts=self.alt_texts, links=self.links, preserve_formatting=True
        )
        if not text.strip():
            return Reject("no_main_content")
        return {**doc, "text": text, "html": None, "title": tree.title or None, "language": lang_hint(doc["html"])}


# ---------------------------------------------------------------- filters


class MinLength(Step):
    """Too little text to teach anything (index stubs, error pages)."""

    def __init__(self, min_words: int = 50, min_chars: int = 200) -> None:
        self.min_words = int(min_words)
        self.min_chars = int(min_chars)

    def __call__(self, doc: dict) -> dict | Reject:
        text = doc["text"]
        if len(text.strip()) < self.min_chars:
            return Reject("too_few_chars")
        if len(whitespace_words(text)) < self.min_words:
            return Reject("too_few_words")
        return doc


class MaxLength(Step):
    """Giant documents are usually dumps, not prose; they would also dominate a small corpus."""

    def __init__(self, max_chars: int = 2_000_000) -> None:
        self.max_chars = int(max_chars)

    def __call__(self, doc: dict) -> dict | Reject:
        return Reject("too_long") if len(doc["text"]) > self.max_chars else doc


class SymbolRatio(Step):
    """Mostly punctuation/symbols means tables of data or markup debris, not language."""

    def __init__(self, max_non_alnum_frac: float = 0.45) -> None:
        self.max_non_alnum_frac = float(max_non_alnum_frac)

    def __call__(self, doc: dict) -> dict | Reject:
        chars = [c for c in doc["text"] if not c.isspace()]
        if not chars:
            return Reject("empty")
        frac = sum(1 for c in chars if not c.isalnum()) / len(chars)
        return Reject("too_many_symbols") if frac > self.max_non_alnum_frac else doc


class RepeatedLines(Step):
    """Boilerplate-heavy pages repeat the same lines (Gopher's duplicate-line fraction)."""

    def __init__(self, max_dup_line_frac: float = 0.3) -> None:
        self.max_dup_line_frac = float(max_dup_line_frac)

    def __call__(self, doc: dict) -> dict | Reject:
        lines = non_empty_lines(doc["text"])
        if not lines:
            return Reject("empty")
        dups = len(lines) - len(set(lines))
        return Reject("repeated_lines") if dups / len(lines) > self.max_dup_line_frac else doc


# ---------------------------------------------------------------- normalisation and language


_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b\u200e\u200f\u2028\u2029\ufeff\ufffe]")
_TRAILING = re.compile(r"[ \t\u00a0\u3000]+$", re.MULTILINE)
_BLANK_RUNS = re.compile(r"\n{3,}")


class Normalize(Step):
    """Mojibake repair (ftfy), one Unicode form, no control characters, tidy line ends.

    ftfy only runs on non-ASCII text (mojibake needs non-ASCII bytes, and most English
    documentation is pure ASCII, which keeps the step at memory speed there). It does not
    unescape HTML entities: documentation quotes ``&amp;`` on purpose. Indentation and
    runs of spaces inside lines are kept (code), trailing spaces and 3+ blank lines are not.
    """

    def __init__(self, fix_mojibake: bool = True, form: str | None = "NFC", strip_control: bool = True,
                 whitespace: bool = True) -> None:  # fmt: skip
        if form not in (None, "NFC", "NFD", "NFKC", "NFKD"):
            raise PipelineError(f"Normalize: form must be NFC, NFD, NFKC, NFKD or null, not {form!r}")
        if fix_mojibake:
            try:
                import ftfy  # noqa: F401
            except ImportError as e:  # pragma: no cover - installed by default
                raise PipelineError("Normalize(fix_mojibake=true) needs `pip install ftfy`") from e
        self.fix_mojibake = bool(fix_mojibake)
        self.form = form
        self.strip_control = bool(strip_control)
        self.whitespace = bool(whitespace)

    def __call__(self, doc: dict) -> dict | Reject:
        text = doc["text"]
        if self.fix_mojibake and not text.isascii():
            import ftfy

            text = ftfy.fix_text(text, unescape_html=False, uncurl_quotes=False, normalization=self.form or "NFC",
                                 fix_line_breaks=True)  # fmt: skip
        if self.form:
            text = unicodedata.normalize(self.form, text)
        if self.whitespace:
            text = text.replace("\r\n", "\n").replace("\r", "\n")
        if self.strip_control:
            text = _CONTROL.sub("", text)
        if self.whitespace:
            text = _BLANK_RUNS.sub("\n\n", _TRAILING.sub("", text)).strip("\n")
        if not text.strip():
            return Reject("empty")
        return {**doc, "text": text}


_LANGID = None


def _langid():
    """langid.py's identifier (its model ships inside the wheel), loaded once per process.

    The wheel stores the model as base64 + bz2 + pickle, which takes 1.5 s (10 s on a busy
    machine) to unpack; the unpacked arrays are cached in ``$PIPELINE_CACHE_DIR`` (default
    ``~/.cache/pipeline``), keyed by the model's hash, and load from there in milliseconds.
    """
    global _LANGID
    if _LANGID is None:
        import base64
        import bz2
        import hashlib
        import os
        import pickle
        from pathlib import Path

        from langid.langid import LanguageIdentifier, model

        key = hashlib.sha256(model.encode() if isinstance(model, str) else model).hexdigest()[:16]
        cache = Path(os.environ.get("PIPELINE_CACHE_DIR") or Path.home() / ".cache" / "pipeline") / f"langid-{key}.pkl"
        parts = None
        try:
            parts = pickle.loads(cache.read_bytes())
        except (OSError, EOFError, pickle.UnpicklingError, ValueError):
            parts = None
        if parts is None:
            nb_ptc, nb_pc, nb_classes, tk_nextmove, tk_output = pickle.loads(bz2.decompress(base64.b64decode(model)))
            parts = (np.array(nb_ptc), np.array(nb_pc), list(nb_classes), tk_nextmove, tk_output)
            try:
                cache.parent.mkdir(parents=True, exist_ok=True)
                tmp = cache.with_name(f".{cache.name}.{os.getpid()}")
                tmp.write_bytes(pickle.dumps(parts, protocol=5))
                os.replace(tmp, cache)
            except OSError:
                pass  # a read-only home: load from the wheel every time
        nb_ptc, nb_pc, nb_classes, tk_nextmove, tk_output = parts
        feats = len(nb_ptc) // len(nb_pc)
        _LANGID = LanguageIdentifier(nb_ptc.reshape(feats, len(nb_pc)), nb_pc, feats, nb_classes, tk_nextmove,
                                     tk_output, norm_probs=True)  # fmt: skip
    return _LANGID


def classify_language(text: str) -> tuple[str, float]:
    """langid.py's naive-Bayes decision, with the class scores summed over the text's
    non-zero features only (langid multiplies a dense 7,480 x 97 matrix per document, which
    is 20+ ms on a busy 2-core machine; this is well under 1 ms, same answer)."""
    ident = _langid()
    fv = ident.instance2fv(text)
    nz = np.flatnonzero(fv)
    pd = fv[nz] @ ident.nb_ptc[nz] + ident.nb_pc
    best = int(np.argmax(pd))
    return str(ident.nb_classes[best]), float(1.0 / np.exp(pd - pd[best]).sum())


class LanguageFilter(Step):
    """Offline language identification (langid.py, 97 languages) with a keep-list.

    Sets ``language`` and ``language_score`` on kept documents; a document is dropped when
    its language is not in ``keep`` or the identifier is less sure than ``min_score``.
    Only the first ``max_chars`` characters are classified (plenty for a language, and the
    cost stays flat for long pages).
    """

    def __init__(self, keep=("en",), min_score: float = 0.5, max_chars: int = 2000) -> None:
        try:
            import langid  # noqa: F401
        except ImportError as e:  # pragma: no cover - installed by default
            raise PipelineError("LanguageFilter needs `pip install langid`") from e
        self.keep = [str(k) for k in keep] if keep else []
        self.min_score = float(min_score)
        self.max_chars = int(max_chars)
        # Load the model now (~1.5 s, mostly bz2): the stage builds its steps in the driver
        # before forking workers, so local workers inherit the loaded model.
        _langid()

    def __call__(self, doc: dict) -> dict | Reject:
        # lowercased: langid's byte n-grams were trained on mixed case, and shouting pages
        # ("PLEASE READ") otherwise come out as a random language
        lang, score = classify_language(doc["text"][: self.max_chars].lower())
        if self.keep and lang not in self.keep:
            return Reject(f"language_{lang}")
        if score < self.min_score:
            return Reject("language_low_score")
        return {**doc, "language": lang, "language_score": round(float(score), 4)}


# ---------------------------------------------------------------- PII

_EMAIL = re.compile(r"(?<![\w.+-])[\w.+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
_IPV4 = re.compile(r"(?<![\w.])(?:(?:25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(?:25[0-5]|2[0-4]\d|1?\d?\d)(?![\w.]|\.\d)")
# +1 415 555 0100, (030) 1234-5678, 415.555.0100: separators required, 9-15 digits in all.
_PHONE = re.compile(r"(?<![\w+.-])(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,5}\)[ .-]?)?\d{2,5}(?:[ .-]\d{2,5}){1,3}(?![\w.-]*\d)")


class PIIRedact(Step):
    """Replace e-mail addresses, public IPv4 addresses and phone numbers with placeholders.

    Private, loopback and documentation addresses (127.0.0.1, 10.x, 192.168.x, 0.0.0.0)
    are not personal and stay, as in datatrove's PIIFormatter. Phone numbers need
    separators and 9-15 digits, so version numbers and plain integers are left alone.
    """

    def __init__(self, emails: bool = True, ips: bool = True, phones: bool = True, email_replacement: str = "<email>",
                 ip_replacement: str = "<ip>", phone_replacement: str = "<phone>") -> None:  # fmt: skip
        self.emails, self.ips, self.phones = bool(emails), bool(ips), bool(phones)
        self.email_replacement = email_replacement
        self.ip_replacement = ip_replacement
        self.phone_replacement = phone_replacement

    def _ip(self, m: re.Match) -> str:
        import ipaddress

        return self.ip_replacement if ipaddress.ip_address(m.group(0)).is_global else m.group(0)

    def _phone(self, m: re.Match) -> str:
        digits = sum(c.isdigit() for c in m.group(0))
        return self.phone_replacement if 9 <= digits <= 15 else m.group(0)

    def __call__(self, doc: dict) -> dict | Reject:
        text = doc["text"]
        if self.emails and "@" in text:
            text = _EMAIL.sub(self.email_replacement, text)
        if self.ips:
            text = _IPV4.sub(self._ip, text)
        if self.phones:
            text = _PHONE.sub(self._phone, text)
        return doc if text == doc["text"] else {**doc, "text": text}


# ---------------------------------------------------------------- web-text quality (Gopher / C4 / FineWeb)
#
# Same rules, thresholds, order and rejection reasons as datatrove's filters (which follow
# Rae et al. 2021 Table A1, Raffel et al. 2020 and Penedo et al. 2024), with the spaCy word
# tokenizer replaced by pipeline.filters.text.words. Chinese/Japanese text (more than
# ``cjk_threshold`` of its characters CJK) is measured in characters: see each class.

STOP_WORDS = ("the", "be", "to", "of", "and", "that", "have", "with")
# The most frequent Chinese function characters, for the same "is this running text" test.
CJK_STOP_WORDS = ("的", "了", "是", "在", "和", "有", "我", "不", "这", "也", "就", "人", "都", "一", "们", "个")


def _ngram_hashes(n: int, vals: np.ndarray) -> np.ndarray:
    h = np.zeros(len(vals) - n + 1, dtype=np.uint64)
    for k in range(n):  # sum of per-token random 64-bit values times position weights (wrapping)
        h = h * np.uint64(0x9E3779B97F4A7C15) + vals[k : k + len(h)]
    return h


class GopherRepetition(Step):
    """Gopher's repetition rules (duplicate lines/paragraphs, top and duplicated n-grams).

    Semantics of datatrove's GopherRepetitionFilter, computed on integer n-gram hashes
    instead of joined strings; the greedy duplicated-n-gram scan only runs when a cheap
    upper bound (characters covered by any repeated n-gram) could exceed the threshold.
    For CJK text n-grams are of characters, with sizes multiplied by ``cjk_ngram_scale``
    (a Chinese word is about two characters) and joined without spaces.
    """

    def __init__(
        self,
        dup_line_frac: float | None = 0.3,
        dup_para_frac: float | None = 0.3,
        dup_line_char_frac: float | None = 0.2,
        dup_para_char_frac: float | None = 0.2,
        top_n_grams=((2, 0.2), (3, 0.18), (4, 0.16)),
        dup_n_grams=((5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.10)),
        cjk_threshold: float = 0.3,
        cjk_ngram_scale: int = 2,
    ) -> None:
        self.dup_line_frac = dup_line_frac
        self.dup_para_frac = dup_para_frac
        self.dup_line_char_frac = dup_line_char_frac
        self.dup_para_char_frac = dup_para_char_frac
        self.top_n_grams = [(int(n), float(f)) for n, f in top_n_grams or ()]
        self.dup_n_grams = [(int(n), float(f)) for n, f in dup_n_grams or ()]
        self.cjk_threshold = float(cjk_threshold)
        self.cjk_ngram_scale = int(cjk_ngram_scale)

    @staticmethod
    def _duplicates(parts: list[str]) -> tuple[int, int]:
        seen: set[str] = set()
        n = chars = 0
        for p in parts:
            if p in seen:
                n += 1
                chars += len(p)
            else:
                seen.add(p)
        return n, chars

    def __call__(self, doc: dict) -> dict | Reject:
        text = doc["text"]
        if not text:
            return Reject("empty")
        paragraphs = re.split(r"\n{2,}", text.strip())
        dups, chars = self._duplicates(paragraphs)
        if self.dup_para_frac and dups / len(paragraphs) > self.dup_para_frac:
            return Reject("dup_para_frac")
        if self.dup_para_char_frac and chars / len(text) > self.dup_para_char_frac:
            return Reject("dup_para_char_frac")
        lines = re.split(r"\n+", text)
        dups, chars = self._duplicates(lines)
        if self.dup_line_frac and dups / len(lines) > self.dup_line_frac:
            return Reject("dup_line_frac")
        if self.dup_line_char_frac and chars / len(text) > self.dup_line_char_frac:
            return Reject("dup_line_char_frac")

        table = token_table(text)
        if not table.n:
            return doc
        cjk = cjk_fraction(text) > self.cjk_threshold
        scale, sep = (self.cjk_ngram_scale, 0) if cjk else (1, 1)
        vals, lens = table.hashes, table.lens
        cum = np.concatenate([[0], np.cumsum(lens)])
        n_text = len(text)
        for n0, frac in self.top_n_grams:
            n = n0 * scale
            if table.n < n:
                continue
            h = _ngram_hashes(n, vals)
            _uniq, first, counts = np.unique(h, return_index=True, return_counts=True)
            best = counts.max()
            i = int(first[counts == best].min())  # Counter.most_common: the first seen among ties
            length = int(cum[i + n] - cum[i]) + sep * (n - 1)
            if length * int(best) / n_text > frac:
                return Reject(f"top_{n0}_gram")
        for n0, frac in self.dup_n_grams:
            n = n0 * scale
            if table.n < n:
                continue
            if self._dup_chars(_ngram_hashes(n, vals), cum, n, n_text * frac) / n_text > frac:
                return Reject(f"duplicated_{n0}_n_grams")
        return doc

    @staticmethod
    def _dup_chars(h, cum, n: int, limit: float) -> int:
        """datatrove's find_all_duplicate: greedy left-to-right, skip n tokens after a repeat."""
        _uniq, first, inverse = np.unique(h, return_index=True, return_inverse=True)
        repeat = np.nonzero(np.arange(len(h)) != first[inverse])[0]
        if len(repeat) == 0:
            return 0
        cover = np.zeros(len(cum), dtype=np.int64)  # tokens inside any repeated n-gram bound the count
        np.add.at(cover, repeat, 1)
        np.add.at(cover, repeat + n, -1)
        covered = np.cumsum(cover)[:-1] > 0
        if int((np.diff(cum)[covered]).sum()) <= limit:
            return int((np.diff(cum)[covered]).sum())
        hl = h.tolist()
        seen: set[int] = set()
        chars, i, end = 0, 0, len(hl)
        while i < end:
            if hl[i] in seen:
                chars += int(cum[i + n] - cum[i])
                i += n
            else:
                seen.add(hl[i])
                i += 1
        return chars


class GopherQuality(Step):
    """Gopher's (Rae et al. 2021) document heuristics, with datatrove's semantics.

    Words are tokens with at least one non-punctuation character. For CJK text a word is a
    character, so the mean-word-length rule (3-10 characters, meaningless for characters)
    is skipped and the stop-word test uses ``cjk_stop_words``.
    """

    def __init__(
        self,
        min_doc_words: int | None = 50,
        max_doc_words: int | None = 100_000,
        min_avg_word_length: float | None = 3,
        max_avg_word_length: float | None = 10,
        max_symbol_word_ratio: float | None = 0.1,
        max_bullet_lines_ratio: float | None = 0.9,
        max_ellipsis_lines_ratio: float | None = 0.3,
        max_non_alpha_words_ratio: float | None = 0.8,
        min_stop_words: int | None = 2,
        stop_words=STOP_WORDS,
        cjk_stop_words=CJK_STOP_WORDS,
        cjk_threshold: float = 0.3,
    ) -> None:
        self.min_doc_words = min_doc_words
        self.max_doc_words = max_doc_words
        self.min_avg_word_length = min_avg_word_length
        self.max_avg_word_length = max_avg_word_length
        self.max_symbol_word_ratio = max_symbol_word_ratio
        self.max_bullet_lines_ratio = max_bullet_lines_ratio
        self.max_ellipsis_lines_ratio = max_ellipsis_lines_ratio
        self.max_non_alpha_words_ratio = max_non_alpha_words_ratio  # datatrove's name; it is a minimum alpha ratio
        self.min_stop_words = min_stop_words
        self.stop_words = frozenset(stop_words)
        self.cjk_stop_words = frozenset(cjk_stop_words)
        self.cjk_threshold = float(cjk_threshold)
        self._stop_hashes = np.array(sorted(text_hash(w) for w in self.stop_words), dtype=np.uint64)
        self._cjk_stop_hashes = np.array(sorted(text_hash(w) for w in self.cjk_stop_words), dtype=np.uint64)

    def __call__(self, doc: dict) -> dict | Reject:
        text = doc["text"]
        table = token_table(text)
        n_words = table.n
        n = int(table.is_word.sum())
        if self.min_doc_words and n < self.min_doc_words:
            return Reject("gopher_short_doc")
        if self.max_doc_words and n > self.max_doc_words:
            return Reject("gopher_long_doc")
        if n == 0:
            return Reject("gopher_short_doc")
        cjk = cjk_fraction(text) > self.cjk_threshold
        if not cjk:
            avg = float(table.lens[table.is_word].sum()) / n
            if self.min_avg_word_length and avg < self.min_avg_word_length:
                return Reject("gopher_below_avg_threshold")
            if self.max_avg_word_length and avg > self.max_avg_word_length:
                return Reject("gopher_above_avg_threshold")
        if self.max_symbol_word_ratio and text.count("#") / n_words > self.max_symbol_word_ratio:
            return Reject("gopher_too_many_hashes")
        if (
            self.max_symbol_word_ratio
            and (text.count("...") + text.count("\u2026")) / n_words > self.max_symbol_word_ratio
        ):
            return Reject("gopher_too_many_ellipsis")
        lines = text.splitlines()
        if self.max_bullet_lines_ratio and lines:
            bullets = sum(1 for s in lines if s.lstrip().startswith(("\u2022", "-")))
            if bullets / len(lines) > self.max_bullet_lines_ratio:
                return Reject("gopher_too_many_bullets")
        if self.max_ellipsis_lines_ratio and lines:
            ell = sum(1 for s in lines if s.rstrip().endswith(("...", "\u2026")))
            if ell / len(lines) > self.max_ellipsis_lines_ratio:
                return Reject("gopher_too_many_end_ellipsis")
        if self.max_non_alpha_words_ratio and int(table.has_alpha.sum()) / n_words < self.max_non_alpha_words_ratio:
            return Reject("gopher_below_alpha_threshold")
        if self.min_stop_words:
            stop = self._cjk_stop_hashes if cjk else self._stop_hashes
            if int(np.isin(stop, table.hashes).sum()) < self.min_stop_words:
                return Reject("gopher_enough_stop_words")
        return doc


_CITATION = re.compile(r"\[\d*]|\[edit]|\[citation needed]")
# A sentence ends at ./!/? before a space or the line end; CJK full stops need no space after them.
_SENTENCE_END = re.compile(r"[.!?]+[\"'\u201d)]*(?=\s|$)|[\u3002\uff01\uff1f]+[\u201d\u300d\u300f]*")
POLICY_SUBSTRINGS = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies", "use cookies")


class C4Quality(Step):
    """C4's (Raffel et al. 2020) line rules with datatrove's C4QualityFilter semantics.

    Keeps lines that end in terminal punctuation (CJK full stops count), have at least
    ``min_words_per_line`` words (characters for CJK lines) and no policy/javascript
    phrases; drops the page for "lorem ipsum", a curly bracket in a kept line, or fewer
    than ``min_sentences`` sentences in what is left. The text becomes the kept lines.
    """

    def __init__(
        self,
        min_words_per_line: int = 3,
        min_sentences: int = 5,
        max_word_length: int = 1000,
        remove_citations: bool = True,
        filter_no_terminal_punct: bool = True,
        filter_lorem_ipsum: bool = True,
        filter_javascript: bool = True,
        drop_curly_bracket: bool = True,
        filter_policy: bool = True,
        cjk_threshold: float = 0.3,
    ) -> None:
        self.min_words_per_line = int(min_words_per_line)
        self.min_sentences = int(min_sentences)
        self.max_word_length = int(max_word_length)
        self.remove_citations = bool(remove_citations)
        self.filter_no_terminal_punct = bool(filter_no_terminal_punct)
        self.filter_lorem_ipsum = bool(filter_lorem_ipsum)
        self.filter_javascript = bool(filter_javascript)
        self.drop_curly_bracket = bool(drop_curly_bracket)
        self.filter_policy = bool(filter_policy)
        self.cjk_threshold = float(cjk_threshold)

    def __call__(self, doc: dict) -> dict | Reject:
        sentences = 0
        kept = []
        for line in doc["text"].splitlines():
            line = line.strip()
            ws = line.split()
            if self.max_word_length != -1 and any(len(w) > self.max_word_length for w in ws):
                continue
            if self.remove_citations:
                line = _CITATION.sub("", line)
            if self.filter_no_terminal_punct and (not line.endswith(TERMINAL) or line.endswith("...")):
                continue
            if cjk_fraction(line) > self.cjk_threshold:
                n_words = sum(1 for t in words(line) if not PUNCTUATION_SET.issuperset(t))
            else:
                n_words = len(ws)
            if n_words < self.min_words_per_line:
                continue
            low = line.lower()
            if self.filter_lorem_ipsum and "lorem ipsum" in low:
                return Reject("lorem_ipsum")
            if self.filter_javascript and "javascript" in low:
                continue
            if self.drop_curly_bracket and "{" in line:
                return Reject("curly_bracket")
            if self.filter_policy and any(p in low for p in POLICY_SUBSTRINGS):
                continue
            sentences += max(1, len(_SENTENCE_END.findall(line)))
            kept.append(line)
        if sentences < self.min_sentences:
            return Reject("too_few_sentences")
        return {**doc, "text": "\n".join(kept).strip()}


FINEWEB_STOP_CHARS = (".", "!", "?", "\u3002", "\uff01", "\uff1f", "\uff0e", "\uff61", "\u0589", "\u06d4", "\u0964",
                      "\u0965", "\u061f")  # fmt: skip


class FineWebQuality(Step):
    """FineWeb's (Penedo et al. 2024) line-level rules, datatrove's FineWebQualityFilter semantics.

    For CJK text a "short line" is ``cjk_short_line_length`` characters (10), not 30: a
    Chinese character carries about what three Latin characters do, and an ordinary
    Chinese sentence is 15-25 characters long.
    """

    def __init__(
        self,
        line_punct_thr: float = 0.12,
        line_punct_exclude_zero: bool = False,
        stop_chars=FINEWEB_STOP_CHARS,
        short_line_thr: float = 0.67,
        short_line_length: int = 30,
        char_duplicates_ratio: float = 0.01,
        new_line_ratio: float = 0.3,
        cjk_short_line_length: int = 10,
        cjk_threshold: float = 0.3,
    ) -> None:
        self.cjk_short_line_length = int(cjk_short_line_length)
        self.cjk_threshold = float(cjk_threshold)
        self.line_punct_thr = float(line_punct_thr)
        self.line_punct_exclude_zero = bool(line_punct_exclude_zero)
        self.stop_chars = tuple(stop_chars)
        self.short_line_thr = float(short_line_thr)
        self.short_line_length = int(short_line_length)
        self.char_duplicates_ratio = float(char_duplicates_ratio)
        self.new_line_ratio = float(new_line_ratio)

    def __call__(self, doc: dict) -> dict | Reject:
        text = doc["text"]
        lines = [line for line in text.split("\n") if line.strip() != ""]
        if not lines:
            return Reject("empty")
        ratio = sum(1 for line in lines if line.endswith(self.stop_chars)) / len(lines)
        if ratio < self.line_punct_thr and not (ratio == 0 and self.line_punct_exclude_zero):
            return Reject("line_punct_ratio")
        short = self.cjk_short_line_length if cjk_fraction(text) > self.cjk_threshold else self.short_line_length
        if sum(1 for line in lines if len(line) <= short) / len(lines) > self.short_line_thr:
            return Reject("short_line_ratio")
        seen: set[str] = set()
        dup_chars = 0
        for line in lines:
            if line in seen:
                dup_chars += len(line)
            else:
                seen.add(line)
        if dup_chars / max(1, len(text.replace("\n", ""))) > self.char_duplicates_ratio:
            return Reject("char_dup_ratio")
        if text.count("\n") / max(1, token_table(text).n) > self.new_line_ratio:
            return Reject("list_ratio")
        return doc
