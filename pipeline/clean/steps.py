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

from pipeline.errors import PipelineError


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


def words(text: str) -> list[str]:
    return text.split()


def non_empty_lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


# ---------------------------------------------------------------- extraction


class HtmlToText(Step):
    """Layout-preserving HTML to text (see html_text.py); documents that already have text pass."""

    needs_text = False

    def __init__(self, drop_tags=("head", "script", "style", "form", "noscript"), drop_xpath=()) -> None:
        self.drop_tags = list(drop_tags)
        self.drop_xpath = list(drop_xpath)

    def __call__(self, doc: dict) -> dict | Reject:
        from lxml.etree import ParserError

        from pipeline.clean.html_text import html_to_text

        if doc.get("text") is not None:
            return doc
        if not doc.get("html"):
            return Reject("no_content")
        try:
            text = html_to_text(doc["html"], self.drop_tags, self.drop_xpath)
        except ParserError:
            return Reject("unparseable_html")
        return {**doc, "text": text, "html": None}


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
        text = trafilatura.extract(
            doc["html"],
            include_tables=self.include_tables,
            include_comments=self.include_comments,
            favor_precision=self.favor_precision,
            deduplicate=False,
        )
        if not text:
            return Reject("no_main_content")
        return {**doc, "text": text, "html": None}


# ---------------------------------------------------------------- normalisation


class UnicodeNormalize(Step):
    """One Unicode form for equal-looking text, so dedup and tokenizer see one spelling."""

    def __init__(self, form: str = "NFC") -> None:
        if form not in ("NFC", "NFD", "NFKC", "NFKD"):
            raise PipelineError(f"UnicodeNormalize: form must be NFC, NFD, NFKC or NFKD, not {form!r}")
        self.form = form

    def __call__(self, doc: dict) -> dict | Reject:
        return {**doc, "text": unicodedata.normalize(self.form, doc["text"])}


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
        if len(words(text)) < self.min_words:
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


# ---------------------------------------------------------------- web-text quality (Gopher / C4)

STOP_WORDS = ("the", "be", "to", "of", "and", "that", "have", "with")


class GopherQuality(Step):
    """Gopher's (Rae et al. 2021) document heuristics for natural-language web text."""

    def __init__(
        self,
        min_doc_words: int = 50,
        max_doc_words: int = 100_000,
        min_avg_word_length: float = 3.0,
        max_avg_word_length: float = 10.0,
        max_symbol_word_ratio: float = 0.1,
        max_bullet_lines_ratio: float = 0.9,
        max_ellipsis_lines_ratio: float = 0.3,
        max_non_alpha_words_ratio: float = 0.8,
        min_stop_words: int = 2,
        stop_words=STOP_WORDS,
    ) -> None:
        self.min_doc_words = int(min_doc_words)
        self.max_doc_words = int(max_doc_words)
        self.min_avg_word_length = float(min_avg_word_length)
        self.max_avg_word_length = float(max_avg_word_length)
        self.max_symbol_word_ratio = float(max_symbol_word_ratio)
        self.max_bullet_lines_ratio = float(max_bullet_lines_ratio)
        self.max_ellipsis_lines_ratio = float(max_ellipsis_lines_ratio)
        self.max_non_alpha_words_ratio = float(max_non_alpha_words_ratio)
        self.min_stop_words = int(min_stop_words)
        self.stop_words = frozenset(stop_words)

    def __call__(self, doc: dict) -> dict | Reject:
        text = doc["text"]
        tokens = words(text)
        # words without surrounding punctuation, as Gopher counts them
        ws = [w for w in (t.strip("\"'()[]{}.,;:!?") for t in tokens) if w]
        n = len(ws)
        if n < self.min_doc_words:
            return Reject("gopher_short_doc")
        if n > self.max_doc_words:
            return Reject("gopher_long_doc")
        avg = sum(len(w) for w in ws) / n
        if avg < self.min_avg_word_length:
            return Reject("gopher_below_avg_word_length")
        if avg > self.max_avg_word_length:
            return Reject("gopher_above_avg_word_length")
        symbols = text.count("#") + text.count("...") + text.count("\u2026")
        if symbols / n > self.max_symbol_word_ratio:
            return Reject("gopher_symbol_word_ratio")
        lines = non_empty_lines(text)
        if lines:
            bullets = sum(1 for line in lines if line.startswith(("\u2022", "-", "*")))
            if bullets / len(lines) > self.max_bullet_lines_ratio:
                return Reject("gopher_bullet_lines")
            ellipsis = sum(1 for line in lines if line.endswith(("...", "\u2026")))
            if ellipsis / len(lines) > self.max_ellipsis_lines_ratio:
                return Reject("gopher_ellipsis_lines")
        alpha = sum(1 for w in ws if any(c.isalpha() for c in w))
        if (n - alpha) / n > self.max_non_alpha_words_ratio:
            return Reject("gopher_non_alpha_words")
        lower = {w.lower() for w in ws}
        if len(lower & self.stop_words) < self.min_stop_words:
            return Reject("gopher_too_few_stop_words")
        return doc


class C4Quality(Step):
    """C4's (Raffel et al. 2020) line rules: keep lines that end like sentences, then judge the rest."""

    TERMINAL = (".", "!", "?", '"', "'", "\u201d")
    BAD_PHRASES = ("lorem ipsum", "javascript", "terms of use", "privacy policy", "cookie policy", "uses cookies")

    def __init__(
        self,
        min_words_per_line: int = 3,
        min_sentences: int = 5,
        max_word_length: int = 1000,
        drop_curly_bracket: bool = True,
        drop_bad_phrase_lines: bool = True,
    ) -> None:
        self.min_words_per_line = int(min_words_per_line)
        self.min_sentences = int(min_sentences)
        self.max_word_length = int(max_word_length)
        self.drop_curly_bracket = bool(drop_curly_bracket)
        self.drop_bad_phrase_lines = bool(drop_bad_phrase_lines)

    def __call__(self, doc: dict) -> dict | Reject:
        text = doc["text"]
        if "lorem ipsum" in text.lower():
            return Reject("c4_lorem_ipsum")
        if self.drop_curly_bracket and "{" in text:
            return Reject("c4_curly_bracket")
        kept = []
        for line in non_empty_lines(text):
            if not line.endswith(self.TERMINAL) or line.endswith("..."):
                continue
            line_words = line.split()
            if len(line_words) < self.min_words_per_line:
                continue
            if any(len(w) > self.max_word_length for w in line_words):
                continue
            if self.drop_bad_phrase_lines and any(p in line.lower() for p in self.BAD_PHRASES):
                continue
            kept.append(line)
        if not kept:
            return Reject("c4_no_sentence_lines")
        sentences = sum(len(re.findall(r"[.!?]+(?:\s|$)", line)) for line in kept)
        if sentences < self.min_sentences:
            return Reject("c4_too_few_sentences")
        return {**doc, "text": "\n".join(kept)}
