"""Word tokenisation, CJK detection and dedup normalisation shared by the filters and dedup.

datatrove tokenises words with spaCy (a blank ``English()`` pipeline), which is most of its
filtering time. The Gopher and FineWeb rules only need word *counts*, lengths and n-grams,
so one compiled regular expression that splits the way spaCy does on ordinary text (word
runs, punctuation runs, apostrophe contractions kept whole) gives the same decisions on
nearly every document at a fraction of the cost.

Chinese and Japanese have no spaces between words, so a whitespace or ``\\w+`` split sees one
"word" per clause. Here every Han ideograph and kana is a token of its own: word counts
become character counts, n-gram repetition rules look at character n-grams, and MinHash
shingles are character n-grams, which is the usual practice for Chinese near-dup detection
(no segmenter model to ship, and a 5-character shingle is about 2-3 Chinese words).
"""

from __future__ import annotations

import re
import unicodedata

# Han (CJK unified + ext. A + compatibility), hiragana, katakana; Hangul uses spaces, so it is a word script.
CJK_RANGES = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_CJK_CHAR = re.compile(f"[{CJK_RANGES}]")
TOKEN_RE = re.compile(
    rf"[{CJK_RANGES}]"  # one CJK character = one token
    rf"|[^\W{CJK_RANGES}]+(?:['\u2019][^\W{CJK_RANGES}]+)*"  # a word, with contractions (don't, l'eau)
    r"|[^\w\s]+"  # a run of punctuation / symbols (spaCy keeps "..." and "--" together as well)
)
# datatrove.utils.text.PUNCTUATION: a "word" made only of these is a symbol, not a word.
PUNCTUATION_SET = frozenset(
    "!/\u2014\u201d:\uff05\uff11\u3008&(\u3001\u2501\\\u3010#%\u300c\u300d\uff0c\u3011\uff1b+^]~\u201c\u300a\u201e';"
    "\u2019{|\u2236\u00b4[=-`*\uff0e\uff08\u2013\uff1f\uff01\uff1a$\uff5e\u00ab\u3009,><\u300b)?\uff09\u3002\u2026@_."
    '"}\u25ba\u00bb'
) | frozenset(chr(x) for a, b in ((0, 9), (11, 13), (13, 32), (127, 160)) for x in range(a, b))
# Sentence-final marks: datatrove's ASCII set plus the CJK full-width ones.
TERMINAL = (".", "!", "?", '"', "'", "\u3002", "\uff01", "\uff1f", "\u201d", "\u300d", "\u300f")


def words(text: str) -> list[str]:
    """spaCy-like word tokens; each CJK character is one token."""
    return token_table(text).toks


class TokenTable:
    """A text's tokens, its distinct tokens (first-seen order) and each token's index into them.

    The Gopher steps run one after the other on the same string: the last table is cached
    (by identity of the string), so the text is tokenised once, and per-token properties
    are computed once per distinct token, not once per occurrence.
    """

    __slots__ = ("counts", "ids", "text", "toks", "vocab")

    def __init__(self, text: str) -> None:
        import numpy as np

        self.text = text
        self.toks = TOKEN_RE.findall(text)
        index: dict[str, int] = {}
        self.ids = np.fromiter((index.setdefault(t, len(index)) for t in self.toks), dtype=np.int64,
                               count=len(self.toks))  # fmt: skip
        self.vocab = list(index)
        self.counts = np.bincount(self.ids, minlength=len(self.vocab))


_LAST: list[TokenTable] = []


def token_table(text: str) -> TokenTable:
    if _LAST and _LAST[0].text is text:
        return _LAST[0]
    table = TokenTable(text)
    _LAST[:] = [table]
    return table


def cjk_fraction(text: str) -> float:
    """Share of CJK characters among the non-space characters (0 for an empty text)."""
    if _CJK_CHAR.search(text) is None:  # the common case, at C speed
        return 0.0
    n = len("".join(text.split()))
    return len(_CJK_CHAR.findall(text)) / n if n else 0.0


def is_cjk_token(tok: str) -> bool:
    return len(tok) == 1 and _CJK_CHAR.match(tok) is not None


# Dedup's normalisation as one str.translate: punctuation and symbols become spaces, digits 0
# (datatrove's simplify_text does the same with regexes); "_" stays, so snake_case names are words.
_DEDUP_TABLE = {ord(c): " " for c in PUNCTUATION_SET | set("!\"#$%&'()*+,-./:;<=>?@[\\]^`{|}~") if c != "_"} | {
    ord(d): "0" for d in "0123456789"
}
_CJK_SPACED = re.compile(f"([{CJK_RANGES}])")


def dedup_text(text: str) -> str:
    """What near-duplicate detection compares: NFKC, lowercase, digits as 0, punctuation as
    spaces, every CJK character standing alone; its whitespace-separated tokens are the words."""
    t = unicodedata.normalize("NFKC", text).lower().translate(_DEDUP_TABLE)
    return _CJK_SPACED.sub(r" \1 ", t) if _CJK_CHAR.search(t) else t


def dedup_tokens(text: str) -> list[str]:
    """Tokens MinHash shingles and decontamination n-grams are made of (see dedup_text)."""
    return dedup_text(text).split()


def non_empty_lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]
