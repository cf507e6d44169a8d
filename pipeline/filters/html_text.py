"""HTML to plain text that keeps the layout code documentation depends on.

Block elements and <br> become line breaks, ``&nbsp;`` survives as a space (pydoc indents
code with it), <dt> starts its own line and <dd> content is indented four spaces, so a
pydoc entry reads ``dumps(obj, ...)`` followed by its indented docstring.
"""

from __future__ import annotations

import re

import lxml.html
from lxml import etree

BLOCK = {
    "address", "article", "aside", "blockquote", "body", "caption", "center", "dd", "details", "dialog",
    "div", "dl", "dt", "fieldset", "figcaption", "figure", "footer", "form", "h1", "h2", "h3", "h4", "h5",
    "h6", "header", "hr", "html", "li", "main", "nav", "ol", "p", "pre", "section", "summary", "table",
    "tbody", "td", "tfoot", "th", "thead", "tr", "ul",
}  # fmt: skip
PARAGRAPH = {"p", "pre", "blockquote", "h1", "h2", "h3", "h4", "h5", "h6", "table", "hr"}
INDENT = "    "
_SPACES = re.compile(r"[ \t\n\r\f\v]+")  # HTML whitespace; U+00A0 (&nbsp;) is deliberately not in it
_BLANKS = re.compile(r"\n{3,}")


class _Lines:
    """Accumulates text into lines, collapsing HTML whitespace and applying indentation."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.cur: list[str] = []
        self.indent = 0
        self.line_indent = 0

    def text(self, s: str, pre: bool) -> None:
        if not s:
            return
        if pre:
            first, *rest = s.split("\n")
            self._append(first, collapse=False)
            for part in rest:
                self.newline(force=True)
                self._append(part, collapse=False)
            return
        self._append(_SPACES.sub(" ", s), collapse=True)

    def _append(self, s: str, collapse: bool) -> None:
        if not s:
            return
        if not self.cur:
            if collapse:
                s = s.lstrip(" ")
                if not s:
                    return
            self.line_indent = self.indent
        elif collapse and s.startswith(" ") and self.cur[-1].endswith(" "):
            s = s.lstrip(" ")
        self.cur.append(s)

    def newline(self, force: bool = False) -> None:
        """End the current line; ``force`` also emits an empty line (used for <br> and <pre>)."""
        if self.cur or force:
            line = "".join(self.cur)
            self.lines.append((INDENT * self.line_indent + line) if line.strip() else "")
            self.cur = []

    def blank(self) -> None:
        self.newline()
        if self.lines and self.lines[-1] != "":
            self.lines.append("")

    def result(self) -> str:
        self.newline()
        text = "\n".join(line.replace("\xa0", " ").rstrip() for line in self.lines)
        return _BLANKS.sub("\n\n", text).strip("\n")


def _parse(html: str):
    try:
        return lxml.html.document_fromstring(html)
    except ValueError:  # a str with an XML encoding declaration
        return lxml.html.document_fromstring(html.encode("utf-8", "replace"))


# libxml2's HTML parser stops building the tree at nesting depth 256 and silently drops the
# rest of the page; hostile or broken pages nest that deep. Such a page is parsed again with
# the tags beyond MAX_DEPTH removed (their text kept), so nothing after the deep block is lost.
MAX_DEPTH = 200
_TAG = re.compile(r"<(/?)([A-Za-z][A-Za-z0-9]*)\b[^>]*?(/?)>")
_VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "param", "source", "track", "wbr"}


def _depth(root) -> int:
    depth = deepest = 0
    for event, _ in etree.iterwalk(root, events=("start", "end")):
        depth += 1 if event == "start" else -1
        deepest = max(deepest, depth)
    return deepest


def flatten_deep(html: str, limit: int = MAX_DEPTH) -> str:
    """``html`` without the tags that open (or close) deeper than ``limit``."""
    depth = 0

    def keep(m: re.Match) -> str:
        nonlocal depth
        closing, name, selfclose = m.group(1), m.group(2).lower(), m.group(3)
        if name in _VOID or selfclose:
            return m.group(0)
        if closing:
            depth = max(0, depth - 1)
            return m.group(0) if depth < limit else ""
        depth += 1
        return m.group(0) if depth <= limit else ""

    return _TAG.sub(keep, html)


def parse(html: str):
    root = _parse(html)
    if _depth(root) >= 250:
        root = _parse(flatten_deep(html))
    return root


_LANG_ATTR = re.compile(r"<html\b[^>]*?\blang\s*=\s*[\"']?([A-Za-z]{2,3}(?:[-_][A-Za-z0-9]+)*)", re.IGNORECASE)


def lang_hint(html: str) -> str | None:
    """The page's declared language (``<html lang="zh-CN">`` -> ``zh``), lowercased primary subtag."""
    m = _LANG_ATTR.search(html[:4096])
    return m.group(1).split("-")[0].split("_")[0].lower() if m else None


def extract(html: str, drop_tags=(), drop_xpath=()) -> tuple[str, str | None]:
    """(plain text, <title>) of an HTML document; raises lxml's ParserError on one with no content."""
    root = parse(html)
    title_el = root.find(".//title")
    title = " ".join(title_el.text_content().split()) if title_el is not None else None
    for xp in drop_xpath:
        for el in root.xpath(xp):
            if el.getparent() is not None:
                el.drop_tree()
    drop = set(drop_tags)
    for el in list(root.iter()):
        if not isinstance(el.tag, str) or el.tag in drop:  # comments, processing instructions
            if el.getparent() is not None:
                el.drop_tree()
    out = _Lines()
    pre = 0
    for event, el in etree.iterwalk(root, events=("start", "end")):
        tag = el.tag
        if event == "start":
            if tag == "br":
                out.newline(force=True)
            elif tag in BLOCK:
                out.blank() if tag in PARAGRAPH else out.newline()
                if tag == "dd":
                    out.indent += 1
                if tag == "pre":
                    pre += 1
            out.text(el.text or "", pre > 0)
        else:
            if tag in BLOCK and tag != "br":
                out.blank() if tag in PARAGRAPH else out.newline()
                if tag == "dd":
                    out.indent -= 1
                if tag == "pre":
                    pre -= 1
            out.text(el.tail or "", pre > 0)
    return out.result(), title or None
