"""Bytes to text for every source: declared charset, then UTF-8, then detection.

A file or response that is mostly UTF-8 with a few bad bytes is decoded as UTF-8 with
U+FFFD replacements (and the caller counts it); one with no UTF-8 multi-byte sequence at
all is in a legacy encoding, which charset-normalizer detects (Latin-1, cp1252, ...),
instead of turning every accented letter into U+FFFD.
"""

from __future__ import annotations

import codecs
import re

_UTF8_MULTIBYTE = re.compile(rb"[\xc2-\xdf][\x80-\xbf]|[\xe0-\xef][\x80-\xbf]{2}|[\xf0-\xf4][\x80-\xbf]{3}")
_META_CHARSET = re.compile(rb"""<meta[^>]+charset\s*=\s*["']?\s*([A-Za-z0-9_.:-]+)""", re.I)


def html_charset(data: bytes) -> str | None:
    """The charset a page declares in a <meta> tag within its first 4 KiB."""
    m = _META_CHARSET.search(data[:4096])
    return m.group(1).decode("ascii", "replace") if m else None


def _codec(name: str | None) -> str | None:
    if not name:
        return None
    try:
        return codecs.lookup(name).name
    except LookupError:
        return None


def decode_bytes(data: bytes, declared: str | None = None, *, html: bool = False, detect: bool = True):
    """``(text, encoding, replaced)``: replaced is True when invalid bytes became U+FFFD."""
    if data.startswith(codecs.BOM_UTF8):
        text = data[len(codecs.BOM_UTF8) :].decode("utf-8", errors="replace")
        return text, "utf-8-sig", "\ufffd" in text and b"\xef\xbf\xbd" not in data
    for enc in (_codec(declared), _codec(html_charset(data)) if html else None):
        if enc is None:
            continue
        try:
            return data.decode(enc), enc, False
        except UnicodeDecodeError:
            return data.decode(enc, errors="replace"), enc, True
    try:
        return data.decode("utf-8"), "utf-8", False
    except UnicodeDecodeError:
        pass
    if detect and not _UTF8_MULTIBYTE.search(data):
        from charset_normalizer import from_bytes

        best = from_bytes(data).best()
        if best is not None and _codec(best.encoding) not in ("utf-8", None):
            try:
                return data.decode(best.encoding), _codec(best.encoding), False
            except (UnicodeDecodeError, LookupError):
                pass
    return data.decode("utf-8", errors="replace"), "utf-8", True
