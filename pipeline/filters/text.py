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

# The one home of the CJK code point ranges, as character-class bodies for regexes.
# Han in the BMP: CJK unified ideographs, extension A, compatibility ideographs.
HAN = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
# Han beyond the BMP: extensions B-F and the compatibility supplement.
HAN_SUPPLEMENT = "\U00020000-\U0002fa1f"
KANA = "\u3040-\u30ff"  # hiragana, katakana
# One character = one token for the filters and dedup: kana and BMP Han; Hangul uses spaces,
# so it is a word script.
CJK_RANGES = KANA + HAN
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
    """spaCy-like word tokens; each CJK character is one token (TokenTable: the same, as arrays)."""
    return TOKEN_RE.findall(text)


class TokenTable:
    """A text's tokens as numpy arrays, computed from its code points without a Python loop.

    Same tokens as ``words()`` (runs of word characters joined across apostrophes, runs of
    punctuation, single CJK characters), but what the Gopher rules need comes out as arrays:
    per token a 64-bit hash (equal tokens, equal hashes), its length in characters, whether
    it has a character outside datatrove's punctuation set (a "word", not a symbol) and
    whether it has a letter. The Gopher steps run one after another on the same string,
    so the last table is cached by the string's identity.
    """

    __slots__ = ("has_alpha", "hashes", "is_word", "lens", "n", "text")

    def __init__(self, text: str) -> None:
        import numpy as np

        self.text = text
        cp = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        cls, nonpunct, alpha = _char_tables(cp)
        c = cls[cp] if len(cp) and int(cp.max()) < len(cls) else _classes(cp, cls)
        apos = c == _APOS
        if apos.any():  # an apostrophe between word characters joins them (don't), else it is punctuation
            prev_w = np.concatenate(([False], c[:-1] == _WORD))
            next_w = np.concatenate((c[1:] == _WORD, [False]))
            c = np.where(apos, np.where(prev_w & next_w, _WORD, _PUNCT), c).astype(np.uint8)
        bound = np.ones(len(c), dtype=bool)
        bound[1:] = (c[1:] != c[:-1]) | (c[1:] == _CJK)
        b = np.flatnonzero(bound)
        starts = b[c[b] != _SPACE]
        ends = np.append(b, len(c))[np.searchsorted(b, starts) + 1]
        self.n = len(starts)
        self.lens = ends - starts
        small = np.minimum(cp, len(nonpunct) - 1)
        npre = np.concatenate(([0], np.cumsum(nonpunct[small] | (cp >= len(nonpunct)))))
        apre = np.concatenate(([0], np.cumsum(alpha[small] | ((cp >= len(alpha)) & (c == _WORD)))))
        self.is_word = (npre[ends] - npre[starts]) > 0
        self.has_alpha = (apre[ends] - apre[starts]) > 0
        self.hashes = span_hashes(cp, starts, ends)


_SPACE, _WORD, _PUNCT, _CJK, _APOS = 0, 1, 2, 3, 4
_TABLES: list = []


def _char_class(ch: str) -> int:
    if ch.isspace():
        return _SPACE
    if _CJK_CHAR.match(ch):
        return _CJK
    if ch in "'\u2019":
        return _APOS
    return _WORD if (ch.isalnum() or ch == "_") else _PUNCT  # exactly re's \w for str patterns


def _char_tables(cp):
    """Per code point of the Basic Multilingual Plane: class, not-punctuation, is-letter."""
    import numpy as np

    if not _TABLES:
        chars = [chr(i) for i in range(0x10000)]
        cls = np.array([_char_class(ch) for ch in chars], dtype=np.uint8)
        nonpunct = np.array([ch not in PUNCTUATION_SET for ch in chars], dtype=np.int32)
        alpha = np.array([ch.isalpha() for ch in chars], dtype=np.int32)
        _TABLES[:] = [cls, nonpunct, alpha]
    return _TABLES


def _classes(cp, cls):
    """Classes for text with characters beyond the BMP (emoji, rare CJK): looked up one by one."""
    import numpy as np

    out = cls[np.minimum(cp, len(cls) - 1)].copy()
    high = cp >= len(cls)
    for v in np.unique(cp[high]).tolist():
        out[cp == v] = _char_class(chr(v))
    return out


_POW: list = []


def span_hashes(cp, starts, ends):
    """64-bit hash of each span ``cp[starts[i]:ends[i]]``: polynomial prefix sums over the code
    points, differenced and shifted back to power 0 (wrapping uint64 arithmetic), then mixed."""
    import numpy as np

    n = len(cp)
    if not _POW or len(_POW[0]) < n + 1:
        m = max(n + 1, 2 * len(_POW[0]) if _POW else 1 << 16)
        p = np.uint64(0x100000001B3)
        inv = np.uint64(pow(int(p), -1, 2**64))
        one = np.ones(1, dtype=np.uint64)
        _POW[:] = [np.concatenate([one, np.cumprod(np.full(m - 1, p, dtype=np.uint64), dtype=np.uint64)]),
                   np.concatenate([one, np.cumprod(np.full(m - 1, inv, dtype=np.uint64), dtype=np.uint64)])]  # fmt: skip
    pw, ipw = _POW
    pre = np.concatenate([np.zeros(1, dtype=np.uint64),
                          np.cumsum((cp.astype(np.uint64) + np.uint64(1)) * pw[:n], dtype=np.uint64)])  # fmt: skip
    h = (pre[ends] - pre[starts]) * ipw[starts]
    h = h ^ (h >> np.uint64(31))
    h = h * np.uint64(0x94D049BB133111EB)
    return h ^ (h >> np.uint64(29))


def text_hash(token: str) -> int:
    """The hash TokenTable gives ``token`` (for looking words up, e.g. stop words)."""
    import numpy as np

    cp = np.frombuffer(token.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    return int(span_hashes(cp, np.array([0]), np.array([len(cp)]))[0])


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
