"""The files source's JSON/CSV/encodings, the hf source offline, and size-bounded shards."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.stages import ingest
from pipeline.core.artifacts import doc_id
from pipeline.core.parquet import parquet_files
from pipeline.core.config import load
from pipeline.core.errors import PipelineError

LATIN = "Les na\u00effs r\u00eavent d'\u00e9t\u00e9s \u00e0 la campagne, o\u00f9 l'on mange des cr\u00eapes. " * 3


def rows_of(root: Path) -> list[dict]:
    return [r for f in parquet_files(root / "data" / "raw") for r in pq.read_table(f).to_pylist()]


def files_run(root: Path, *paths, extra=()):
    plist = ",".join(f"'{p}'" for p in paths)
    return ingest.run(load([f"paths.root={root}", "source=files", f"source.paths=[{plist}]", *extra]))


def test_json_csv_and_encodings(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    (d / "a.json").write_text(json.dumps([{"text": "first"}, {"body": "no text"}, "a bare string", {"text": 3}]))
    (d / "b.json").write_text(json.dumps({"text": "one object"}))
    (d / "c.json").write_text('{"text": "broken",')
    (d / "d.csv").write_text('id,text\n1,"a, quoted\nmultiline cell"\n2,\n3,plain\n')
    (d / "e.csv").write_text("id,body\n1,x\n")
    (d / "f.txt").write_bytes(LATIN.encode("latin-1"))  # no UTF-8 at all: detected
    (d / "g.html").write_bytes('<html><head><meta charset="windows-1252"></head><body>\u201cquoted\u201d</body></html>'
                               .encode("cp1252"))
    (d / "h.txt").write_bytes("mostly utf-8 caf\u00e9 ".encode() + b"\xff and a stray byte")
    summary = files_run(tmp_path / "out", d)
    rows = {r["url"]: r for r in rows_of(tmp_path / "out")}
    assert rows[f"{d}/a.json#0"]["text"] == "first" and rows[f"{d}/a.json#2"]["text"] == "a bare string"
    assert rows[f"{d}/b.json"]["text"] == "one object"
    assert rows[f"{d}/d.csv#row0"]["text"] == "a, quoted\nmultiline cell"
    assert rows[f"{d}/d.csv#row2"]["text"] == "plain" and f"{d}/d.csv#row1" not in rows  # empty cell
    assert rows[f"{d}/f.txt"]["text"] == LATIN
    assert "\u201cquoted\u201d" in rows[f"{d}/g.html"]["html"]  # declared in <meta>
    h = rows[f"{d}/h.txt"]["text"]
    assert "caf\u00e9" in h and "\ufffd" in h
    st = summary["statuses"]
    assert st["read"] == 8
    assert st["skipped_missing_field"] == 2 and st["skipped_bad_field_type"] == 1 and st["error_bad_json"] == 1
    ex = summary["problem_examples"]
    assert ex["error_bad_json"] == [f"{d}/c.json:1: Expecting property name enclosed in double quotes (column 19)"]
    assert f"{d}/e.csv: no 'text' column (has ['id', 'body'])" in ex["skipped_missing_field"]
    assert summary["repairs"] == {"invalid_utf8_replaced": 1}
    assert summary["repair_examples"] == [f"{d}/h.txt: invalid utf-8 bytes replaced with U+FFFD"]
    assert sum(summary["encodings_detected"].values()) == 2  # f.txt (detected), g.html (declared)


def test_unreadable_file_is_counted_and_the_rest_read(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    (d / "a.txt").write_text("readable")
    (d / "b.txt").symlink_to(d / "gone.txt")  # a dangling link: listed, cannot be opened
    summary = files_run(tmp_path / "out", d)
    assert summary["docs_out"] == 1 and summary["statuses"]["error_unreadable"] == 1
    assert summary["problem_examples"]["error_unreadable"][0].startswith(f"{d}/b.txt: ")


def test_shards_are_size_bounded_and_stable(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    docs = [f"document {i} " + "word " * (40 + i) for i in range(30)]
    (d / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    extra = ("source.max_shard_bytes=1000", "source.rows_per_shard=1000")
    s1 = files_run(tmp_path / "r1", d, extra=extra)
    files = parquet_files(tmp_path / "r1" / "data" / "raw")
    assert len(files) == len(s1["shards"]) > 5
    for f in files:
        t = pq.read_table(f)
        assert sum(len(x.encode()) for x in t.column("text").to_pylist()) <= 1000 or t.num_rows == 1
    got = [r["text"] for r in rows_of(tmp_path / "r1")]
    assert got == docs and [r["id"] for r in rows_of(tmp_path / "r1")] == [doc_id(t) for t in docs]
    files_run(tmp_path / "r2", d, extra=extra)
    assert [f.read_bytes() for f in files] == [f.read_bytes() for f in parquet_files(tmp_path / "r2" / "data" / "raw")]


# ------------------------------------------------------------------ hf, offline


@pytest.fixture
def offline(monkeypatch):
    """No network at all: any socket connect fails, and the HF libraries are told they are offline."""
    import datasets.config
    import huggingface_hub.constants

    def refuse(self, address):
        raise OSError(f"network disabled in this test (connect to {address})")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.fixture
def saved(tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict({"content": ["alpha doc", None, "gamma doc", "delta doc"], "n": [0, 1, 2, 3]})
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "dd"))
    ds.save_to_disk(str(tmp_path / "single"))
    (tmp_path / "files").mkdir()
    ds.to_parquet(str(tmp_path / "files" / "train.parquet"))
    return tmp_path


def hf_run(root: Path, name: Path | str, *extra):
    return ingest.run(load([f"paths.root={root}", "source=hf", f"source.name='{name}'", "source.text_field=content",
                            *extra]))


def test_hf_saved_to_disk_offline(tmp_path, saved, offline):
    summary = hf_run(tmp_path / "o1", saved / "dd")
    rows = rows_of(tmp_path / "o1")
    assert [r["text"] for r in rows] == ["alpha doc", "gamma doc", "delta doc"]
    assert rows[0]["url"] == f"hf://{saved / 'dd'}/train#0" and rows[0]["source"] == "hf"
    assert rows[0]["source_file"] == str(saved / "dd") and rows[0]["id"] == doc_id("alpha doc")
    assert summary["statuses"] == {"read": 3, "skipped_missing_field": 1}
    assert summary["problem_examples"]["skipped_missing_field"] == [f"{saved / 'dd'}[train]#1: 'content' is missing or null"]
    hf_run(tmp_path / "o2", saved / "dd", "source.split=test")
    assert [r["text"] for r in rows_of(tmp_path / "o2")] == ["alpha doc"]
    hf_run(tmp_path / "o3", saved / "single", "source.max_docs=2")
    assert [r["text"] for r in rows_of(tmp_path / "o3")] == ["alpha doc", "gamma doc"]
    # a local folder of data files goes through load_dataset (streaming), still offline
    hf_run(tmp_path / "o4", saved / "files")
    assert [r["text"] for r in rows_of(tmp_path / "o4")] == ["alpha doc", "gamma doc", "delta doc"]


def test_hf_errors_are_one_line(tmp_path, saved, offline):
    with pytest.raises(PipelineError, match=r"no split 'validation' \(has train, test\)"):
        hf_run(tmp_path, saved / "dd", "source.split=validation")
    with pytest.raises(PipelineError, match=r"has no 'body' column \(has \['content', 'n'\]\)"):
        ingest.run(load([f"paths.root={tmp_path}", "source=hf", f"source.name='{saved / 'single'}'",
                         "source.text_field=body"]))
    with pytest.raises(PipelineError, match=r"cannot load dataset 'no-such-org/no-such-dataset'"):
        hf_run(tmp_path, "no-such-org/no-such-dataset")
    with pytest.raises(PipelineError, match="source=hf needs source.name"):
        ingest.run(load([f"paths.root={tmp_path}", "source=hf"]))


def test_one_big_text_file_becomes_documents_cut_at_blank_lines(tmp_path):
    """nanoGPT's hello world: one text file (here ~300 KB of speeches) is cut into documents of
    about source.doc_bytes at paragraph breaks, nothing lost, offsets exact, so the train/val
    split by document id has validation documents."""
    from pipeline.core.splits import is_val

    speeches = [f"SPEAKER {i % 7}:\nLine {i} of the play, spoken with feeling.\nAnd another line follows it.\n"
                for i in range(4000)]
    book = tmp_path / "input.txt"
    book.write_text("\n".join(speeches))
    summary = files_run(tmp_path / "out", book, extra=["source.doc_bytes=4000"])
    rows = sorted(rows_of(tmp_path / "out"), key=lambda r: r["source_offset"])
    data = book.read_bytes()
    assert "".join(r["text"] for r in rows) == data.decode()
    assert all(data[r["source_offset"]:].decode().startswith(r["text"]) for r in rows)
    assert all(r["text"].endswith("\n\n") or r is rows[-1] for r in rows), "cut at blank lines"
    assert 60 < len(rows) < 90 and summary["docs_out"] == len(rows)
    assert sum(is_val(r["id"], 0.1) for r in rows) >= 3
    # off, it stays one document
    one = files_run(tmp_path / "whole", book, extra=["source.split_text=none"])
    assert one["docs_out"] == 1


def test_streamed_files_are_not_capped_as_files(tmp_path):
    """A Parquet or JSONL file larger than source.max_file_bytes is read record by record
    (the cap is for files read whole); each record is still capped by max_doc_bytes."""
    import pyarrow as pa

    texts = [f"document number {i} " * 50 for i in range(200)]
    pq.write_table(pa.table({"text": texts}), tmp_path / "big.parquet", row_group_size=20)
    (tmp_path / "big.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    (tmp_path / "big.json").write_text(json.dumps([{"text": t} for t in texts]))
    summary = files_run(tmp_path / "out", tmp_path / "big.parquet", tmp_path / "big.jsonl", tmp_path / "big.json",
                        extra=["source.max_file_bytes=10000"])
    assert summary["docs_out"] == 400  # parquet and jsonl: 200 each, the same texts (same ids)
    assert len({r["id"] for r in rows_of(tmp_path / "out")}) == 200
    assert summary["statuses"]["skipped_too_large"] == 1  # the .json, read whole
