"""Clean: each step on hand-made documents, then the stage's funnel, dedup and determinism."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest
from omegaconf import OmegaConf, open_dict

from pipeline.stages import clean
from pipeline.core.artifacts import doc_id, read_json
from pipeline.core.parquet import ShardWriter, parquet_files
from pipeline.dedup.index import INDEX
from pipeline.dedup.minhash import normalized_hash
from pipeline.filters.apply import build_steps
from pipeline.filters.schema import CLEAN_SCHEMA
from pipeline.filters.steps import (
    C4Quality,
    GopherQuality,
    HtmlToText,
    MaxLength,
    MinLength,
    Reject,
    RepeatedLines,
    SymbolRatio,
    TrafilaturaExtract,
)
from pipeline.core.config import load
from pipeline.core.errors import PipelineError
from pipeline.sources.raw import RAW_SCHEMA

PYDOC_SNIPPET = """<!DOCTYPE>
<html lang="en"><head><title>Pydoc: module json</title><style>body {}</style></head><body>
<div style='float:left'>Python 3.11.7 [main, GCC 12.2.0]</div>
<div style='float:right'><form action="get"><input type=text name=key></form></div>
<table class="heading"><tr class="heading-text decor">
<td class="title">&nbsp;<br><strong class="title">json</strong> (version 2.0.9)</td>
<td class="extra"><a href=".">index</a><br><a href="file:/x/json/__init__.py">/x/json/__init__.py</a></td></tr></table>
<p><span class="code">JSON&nbsp;is&nbsp;a&nbsp;subset&nbsp;of<br>
JavaScript&nbsp;syntax.<br>
&nbsp;<br>
&nbsp;&nbsp;&nbsp;&nbsp;&gt;&gt;&gt;&nbsp;import&nbsp;json<br>
&nbsp;&nbsp;&nbsp;&nbsp;&gt;&gt;&gt;&nbsp;json.<a href="#-dumps">dumps</a>([1,&nbsp;2])<br>
&nbsp;</span></p>
<table class="section"><tr class="decor functions-decor heading-text">
<td class="section-title" colspan=3>&nbsp;<br><strong class="bigsection">Functions</strong></td></tr>
<tr><td class="decor functions-decor"><span class="code">&nbsp;&nbsp;&nbsp;&nbsp;&nbsp;&nbsp;</span></td><td>&nbsp;</td>
<td class="singlecolumn"><dl><dt><a name="-dumps"><strong>dumps</strong></a>(obj, *, skipkeys=False, **kw)</dt><dd><span class="code">Serialize&nbsp;``obj``&nbsp;to&nbsp;a&nbsp;JSON&nbsp;formatted&nbsp;``str``.<br>
&nbsp;<br>
If&nbsp;``skipkeys``&nbsp;is&nbsp;true:<br>
&nbsp;&nbsp;&nbsp;&nbsp;keys&nbsp;are&nbsp;skipped.</span></dd></dl>
<dl><dt><a name="-loads"><strong>loads</strong></a>(s)</dt></dl>
</td></tr></table><!-- a comment --><script>var x = 1;</script>
</body></html>"""

PYDOC_TEXT = """json (version 2.0.9)

JSON is a subset of
JavaScript syntax.

    >>> import json
    >>> json.dumps([1, 2])

Functions

dumps(obj, *, skipkeys=False, **kw)
    Serialize ``obj`` to a JSON formatted ``str``.

    If ``skipkeys`` is true:
        keys are skipped.
loads(s)"""

PROSE = (
    "The quick brown fox jumps over the lazy dog near the river bank. "
    "It was one of the warmest days of the year, and the fox wanted to rest. "
    "Many animals came to the water to drink and to cool down in the shade. "
    "The dog watched them with interest but did not move from his place. "
    "Later that evening the wind changed and the air became cool and fresh. "
    "Everyone agreed that it had been a good day to be outside with friends."
)


def text_doc(text: str, url: str = "u") -> dict:
    return {"id": doc_id(text), "url": url, "source": "test", "content_type": "text/plain",
            "http_status": None, "html": None, "text": text}  # fmt: skip


def html_doc(html: str, url: str = "u") -> dict:
    return {**text_doc("", url), "id": doc_id(html), "content_type": "text/html", "html": html, "text": None}


# ------------------------------------------------------------------ steps


def test_html_to_text_keeps_pydoc_layout():
    step = HtmlToText(
        drop_tags=["head", "script", "style", "form", "noscript"],
        drop_xpath=["//body/div[@style='float:left' or @style='float:right']", "//td[@class='extra']"],
    )
    out = step(html_doc(PYDOC_SNIPPET))
    assert out["text"] == PYDOC_TEXT
    assert out["html"] is None


def test_html_to_text_details():
    def html_to_text(html: str, drop_tags=()) -> str:
        return HtmlToText(drop_tags=drop_tags)(html_doc(html))["text"]

    assert html_to_text("<p>a  \n  b</p><p>c<br>d</p>") == "a b\n\nc\nd"
    assert html_to_text("<pre>x = 1\n    y = 2\n</pre>tail") == "x = 1\n    y = 2\n\ntail"
    assert html_to_text("<ul><li>one</li><li>two</li></ul>") == "one\ntwo"
    assert html_to_text("<div>a</div>\n\n\n<p></p><p></p><div>b</div>") == "a\n\nb"
    assert html_to_text("<dl><dt>f()</dt><dd>does<dl><dt>g()</dt><dd>inner</dd></dl></dd></dl>") == (
        "f()\n    does\n    g()\n        inner"
    )
    assert html_to_text("<p>keep</p><script>drop()</script>", drop_tags=["script"]) == "keep"
    assert html_to_text('<?xml version="1.0" encoding="utf-8"?><html><body>x</body></html>') == "x"


def test_html_to_text_passes_text_and_rejects_empty():
    doc = text_doc("already text")
    assert HtmlToText()(doc) is doc
    assert HtmlToText()({**html_doc(""), "html": ""}) == Reject("no_content")
    assert HtmlToText()(html_doc("   ")) == Reject("unparseable_html")


def test_trafilatura_extract():
    page = (
        "<html><head><title>t</title></head><body><nav><a href='/'>Home</a> | <a href='/x'>About</a></nav>"
        f"<article><h1>A day by the river</h1><p>{PROSE}</p><p>{PROSE}</p></article>"
        "<footer>Copyright 2024 Example Corp. All rights reserved.</footer></body></html>"
    )
    out = TrafilaturaExtract()(html_doc(page))
    assert "quick brown fox" in out["text"] and "About" not in out["text"]
    empty = html_doc("<html><body><script>var a = 1;</script></body></html>")
    assert TrafilaturaExtract()(empty) == Reject("no_main_content")


def test_length_filters():
    assert MinLength(min_words=3, min_chars=5)(text_doc("one two")) == Reject("too_few_words")
    assert MinLength(min_words=1, min_chars=50)(text_doc("one two")) == Reject("too_few_chars")
    doc = text_doc("one two three")
    assert MinLength(min_words=3, min_chars=5)(doc) is doc
    assert MaxLength(max_chars=5)(doc) == Reject("too_long")
    assert MaxLength(max_chars=50)(doc) is doc


def test_symbol_ratio():
    assert SymbolRatio(0.45)(text_doc("{}[]();;==>> a")) == Reject("too_many_symbols")
    assert SymbolRatio(0.45)(text_doc("def f(x): return x + 1")) == text_doc("def f(x): return x + 1")
    assert SymbolRatio(0.45)(text_doc("   ")) == Reject("empty")


def test_repeated_lines():
    assert RepeatedLines(0.3)(text_doc("a\nb\na\na\n")) == Reject("repeated_lines")  # 2 of 4 lines repeat
    doc = text_doc("a\nb\nc\na\n")  # 1 of 4
    assert RepeatedLines(0.3)(doc) is doc


def test_gopher_quality():
    # datatrove's GopherQualityFilter reasons and semantics (more cases, and Chinese, in test_clean_quality.py)
    prose = text_doc(PROSE)
    assert GopherQuality()(prose) is prose
    assert GopherQuality()(text_doc("word " * 10)) == Reject("gopher_short_doc")
    code = text_doc("\n".join(f"Compute value number {i} quickly using alpha beta gamma" for i in range(60)))
    assert GopherQuality()(code) == Reject("gopher_enough_stop_words")
    assert GopherQuality()(text_doc("a b c d " * 30 + " the and")) == Reject("gopher_below_avg_threshold")
    dots = text_doc("\n".join(f"the story of day {i} and what came next..." for i in range(20)))
    assert GopherQuality(max_symbol_word_ratio=1.0)(dots) == Reject("gopher_too_many_end_ellipsis")


def test_c4_quality():
    text = "Home\nMenu | Login\n" + PROSE + "\nShort one.\nClick here"
    out = C4Quality(min_sentences=3)(text_doc(text))
    assert out["text"] == PROSE  # lines without terminal punctuation or under 3 words are dropped
    assert C4Quality()(text_doc(PROSE + "\nUse the {x} placeholder here.")) == Reject("curly_bracket")
    assert C4Quality()(text_doc(PROSE + "\n{x}"))["text"] == PROSE  # a bracket in a dropped line is harmless
    assert C4Quality(min_sentences=10)(text_doc(PROSE)) == Reject("too_few_sentences")
    assert C4Quality()(text_doc("no punctuation here\nnor here")) == Reject("too_few_sentences")


def test_build_steps_errors():
    with pytest.raises(PipelineError, match=r"clean.steps\[0\] \(pipeline.filters.steps.Nope\) could not be built"):
        build_steps([{"_target_": "pipeline.filters.steps.Nope"}])
    with pytest.raises(PipelineError, match="no _target_"):
        build_steps([{"min_words": 3}])
    steps = build_steps([{"_target_": "pipeline.filters.steps.HtmlToText", "drop_tags": ["head"]}])
    assert steps[0].drop_tags == ["head"] and type(steps[0].drop_tags) is list


# ------------------------------------------------------------------ the stage


def write_raw(root: Path, docs: list[dict], rows_per_shard: int = 3) -> None:
    writer = ShardWriter(root / "data" / "raw", RAW_SCHEMA, rows_per_shard)
    for d in docs:
        writer.write(d)
    writer.close()


PROSE2 = (
    "Rivers carry water from the mountains to the sea over many thousands of years. "
    "Along the way they shape valleys, feed forests and give towns a reason to exist. "
    "People have always built bridges, mills and harbours on their banks. "
    "Today engineers measure the flow of each river to predict floods and droughts. "
    "Their records show how the climate of a region changes from one decade to the next."
)


def sample_docs() -> list[dict]:
    long_html = "<html><body><h1>Module</h1><p>" + PROSE2 + "</p><dl><dt>f(x)</dt><dd>Return x.</dd></dl></body></html>"
    return [
        text_doc(PROSE, "doc0"),
        text_doc("too short", "doc1"),
        html_doc(long_html, "doc2"),
        # doc0 again, differing only by case and whitespace
        text_doc(PROSE.replace("The quick", "  THE QUICK").replace(" fox", "\n\tfox"), "doc3"),
        text_doc(("{}[]<>;;== " * 40) + PROSE[:200], "doc4"),
        text_doc(PROSE.upper(), "doc5"),  # another duplicate of doc0, in a later shard
        text_doc(PROSE + " Extra sentence at the end.", "doc6"),  # a near-duplicate of doc0
    ]


def stage_cfg(root: Path, *extra: str):
    return load([f"paths.root={root}", "clean.steps.min_length.min_words=10", "clean.steps.min_length.min_chars=40",
                 "clean.decontaminate.enabled=false", *extra])  # fmt: skip


def test_clean_stage_funnel_and_dedup(tmp_path):
    docs = sample_docs()
    write_raw(tmp_path, docs)
    summary = clean.run(stage_cfg(tmp_path, "executor.workers=2"))
    out = tmp_path / "data" / "clean"
    funnel = read_json(out / "funnel.json")
    assert funnel["in"] == 7
    assert funnel["in"] == funnel["kept"] + sum(funnel["rejected"].values())
    assert funnel["rejected"] == {"duplicate": 2, "near_duplicate": 1, "too_few_chars": 1, "too_many_symbols": 1}
    assert funnel["kept"] == 2
    assert [s["step"] for s in funnel["steps"]] == [
        "HtmlToText", "Normalize", "MinLength", "MaxLength", "LanguageFilter", "SymbolRatio", "RepeatedLines",
        "PIIRedact", "dedup",
    ]  # fmt: skip
    assert funnel["steps"][2] == {"step": "MinLength", "in": 7, "out": 6}
    assert funnel["steps"][-1] == {"step": "dedup", "in": 5, "out": 2}
    assert funnel["rejected_by_step"] == {
        "MinLength": {"too_few_chars": 1}, "SymbolRatio": {"too_many_symbols": 1},
        "dedup": {"duplicate": 2, "near_duplicate": 1},
    }  # fmt: skip
    sizes = [len((d["html"] or d["text"]).encode()) for d in docs]
    assert funnel["bytes_in"] == sum(sizes) == funnel["bytes_kept_in"] + sum(funnel["rejected_bytes"].values())
    assert funnel["rejected_bytes"]["duplicate"] == sizes[3] + sizes[5]
    assert summary["funnel"] == funnel and summary["kept"] == 2 and summary["docs_in"] == 7

    kept = [r for f in parquet_files(out) for r in pq.read_table(f).to_pylist()]
    assert pq.read_schema(parquet_files(out)[0]).remove_metadata().equals(CLEAN_SCHEMA)
    assert [r["url"] for r in kept] == ["doc0", "doc2"]  # the first occurrence wins
    by_url = {r["url"]: r for r in kept}
    assert by_url["doc0"]["text"] == PROSE and by_url["doc0"]["id"] == doc_id(PROSE)
    assert by_url["doc0"]["raw_id"] == docs[0]["id"] and by_url["doc0"]["language"] == "en"
    assert by_url["doc2"]["text"].startswith("Module\n\nRivers") and "f(x)\n    Return x." in by_url["doc2"]["text"]

    rejected = pq.read_table(out / "rejected").to_pylist()
    assert {(r["url"], r["step"], r["reason"]) for r in rejected} == {
        ("doc1", "MinLength", "too_few_chars"),
        ("doc4", "SymbolRatio", "too_many_symbols"),
        ("doc3", "dedup", "duplicate"),
        ("doc5", "dedup", "duplicate"),
        ("doc6", "dedup", "near_duplicate"),
    }
    assert {r["url"]: r["text"] for r in rejected}["doc1"] == "too short"  # rejected docs keep their text
    index = read_json(out / INDEX / "index.json")
    assert index["run"] == 0 and index["params"]["bands"] == 20 and len(index["shards_in"]) == 3
    assert summary["dedup"]["index_entries"]["exact"] == 2
    assert not (out / clean.WORK).exists()
    # raw shard 1 held only rejected docs, so the kept shard descends from raw shards 0 and 0
    assert summary["lineage"] == {"part-00000.parquet": ["part-00000.parquet"]}


def test_normalized_hash_ignores_case_space_and_compat_forms():
    assert normalized_hash("Hello   World\n") == normalized_hash("hello world")
    assert normalized_hash("\ufb01ne") == normalized_hash("fine")
    assert normalized_hash("hello world") != normalized_hash("hello  worlds")


def test_clean_is_deterministic_across_runs_and_workers(tmp_path):
    outs = []
    for i, workers in enumerate((1, 2)):
        root = tmp_path / f"r{i}"
        write_raw(root, sample_docs(), rows_per_shard=2)
        clean.run(stage_cfg(root, f"executor.workers={workers}", "clean.rows_per_shard=2"))
        outs.append(root / "data" / "clean")
    files = [sorted(p.relative_to(o) for p in o.rglob("*") if p.is_file() and p.name != "_summary.json") for o in outs]
    assert files[0] == files[1] and len(files[0]) >= 5
    for rel in files[0]:
        assert (outs[0] / rel).read_bytes() == (outs[1] / rel).read_bytes(), rel


def test_all_rejected_raises(tmp_path):
    write_raw(tmp_path, [text_doc("tiny", "a"), text_doc("small", "b")])
    with pytest.raises(PipelineError, match=r"clean kept 0 of 2 documents \(rejected: too_few_words=2\)"):
        clean.run(load([f"paths.root={tmp_path}", "clean.steps.min_length.min_words=10", "clean.steps.min_length.min_chars=1"]))
    assert not (tmp_path / "data" / "clean").exists()


def test_missing_raw_raises(tmp_path):
    with pytest.raises(PipelineError, match="raw documents not found at .*: run `python -m pipeline ingest` first"):
        clean.run(stage_cfg(tmp_path))


class Explode:
    """A user-written step (one class + one config entry) that fails on some documents."""

    name = "Explode"

    def __call__(self, doc):
        if "Extra sentence" in doc["text"]:
            raise ValueError("boom")
        return doc


def test_custom_step_and_step_errors_are_counted(tmp_path):
    write_raw(tmp_path, sample_docs())
    cfg = stage_cfg(tmp_path, "executor.workers=1", "clean.steps.pii.enabled=false")  # PIIRedact off
    with open_dict(cfg):
        cfg.clean.steps.explode = OmegaConf.create({"_target_": f"{Explode.__module__}.Explode"})
    summary = clean.run(cfg)
    assert "PIIRedact" not in [s["step"] for s in summary["funnel"]["steps"]]
    assert summary["rejected"]["step_error"] == 1
    assert summary["funnel"]["steps"][-2] == {"step": "Explode", "in": 5, "out": 4}
    assert summary["step_errors"] == ["doc6: Explode failed: ValueError: boom"]
    assert summary["funnel"]["in"] == summary["kept"] + sum(summary["rejected"].values())


def test_web_profile_composes(tmp_path):
    write_raw(tmp_path, [html_doc(f"<html><body><article><p>{PROSE}</p></article></body></html>", "w")])
    summary = clean.run(load([f"paths.root={tmp_path}", "clean=web"]))
    assert [s["step"] for s in summary["funnel"]["steps"]][:1] == ["TrafilaturaExtract"]
    assert summary["kept"] == 1
