"""The hf source on local folders: FineWeb's layout, flat data files, save_to_disk, and big files streamed."""

from __future__ import annotations

import gzip
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.core.artifacts import doc_id, read_json
from pipeline.core.config import load
from pipeline.core.errors import PipelineError
from pipeline.core.parquet import parquet_files
from pipeline.stages import ingest
from tests.conftest import ROOT, run_cli

DUMPS = ("CC-MAIN-2013-20", "CC-MAIN-2013-48")


def rows_of(root: Path) -> list[dict]:
    return [r for f in parquet_files(root / "data" / "raw") for r in pq.read_table(f).to_pylist()]


def shard_bytes(root: Path) -> list[tuple[str, bytes]]:
    return [(f.name, f.read_bytes()) for f in parquet_files(root / "data" / "raw")]


def hf_run(root: Path, name: Path, *extra: str) -> dict:
    return ingest.run(load([f"paths.root={root}", "source=hf", f"source.name='{name}'", *extra]))


def fineweb_rows(dump: str, n: int, start: int) -> list[dict]:
    return [{"text": f"Page {start + i} of {dump}: " + "words and more words " * (i % 5 + 1),
             "id": f"<urn:uuid:{dump}-{start + i:04d}>", "dump": dump, "url": f"https://site{start + i}.example/{dump}",
             "date": "2013-05-18T07:24:47Z", "language": "en", "language_score": 0.9, "token_count": 10 + i}
            for i in range(n)]


@pytest.fixture
def fineweb(tmp_path) -> tuple[Path, list[tuple[Path, list[dict]]]]:
    """data/<dump>/00{0,1}_00000.parquet, 2 dumps x 2 files, several row groups each; one null and
    one empty text; and a sample/ folder beside data/ that must not be read."""
    root = tmp_path / "fineweb"
    files = []
    for d, dump in enumerate(DUMPS):
        for k in range(2):
            rows = fineweb_rows(dump, 23, 100 * d + 30 * k)
            if (d, k) == (1, 0):
                rows[4]["text"], rows[9]["text"] = None, ""
            path = root / "data" / dump / f"00{k}_00000.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=10)
            files.append((path, rows))
    (root / "sample" / "10BT").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(fineweb_rows("sample", 5, 0)), root / "sample" / "10BT" / "000_00000.parquet")
    (root / "README.md").write_text("---\nlicense: odc-by\n---\n")
    return root, files


def test_fineweb_folder_keeps_ids_and_urls_and_is_the_same_for_any_workers(tmp_path, fineweb):
    root, files = fineweb
    outs = {}
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        res = run_cli("ingest", f"paths.root={out}", "source=hf", f"source.name={root}", f"executor.workers={workers}",
                      "source.rows_per_shard=7", timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        outs[workers] = out
    assert shard_bytes(outs[1]) == shard_bytes(outs[2])

    expected = [r for _, rows in files for r in rows if r["text"]]
    got = rows_of(outs[1])
    assert [r["text"] for r in got] == [r["text"] for r in expected]
    assert [r["url"] for r in got] == [r["url"] for r in expected]
    assert [r["warc_record_id"] for r in got] == [r["id"] for r in expected]
    assert all(r["id"] == doc_id(r["text"]) and r["source"] == "hf" and r["source_file"] == str(root) for r in got)

    summary = read_json(outs[1] / "data" / "raw" / "_summary.json")
    assert summary["docs_out"] == len(expected) == sum(len(rows) for _, rows in files) - 2
    assert summary["statuses"] == {"read": len(expected), "skipped_missing_field": 1, "skipped_empty_text": 1}
    bad = files[2][0]
    assert summary["problem_examples"] == {"skipped_missing_field": [f"{bad}#row4: 'text' is missing or null"],
                                           "skipped_empty_text": [f"{bad}#row9: 'text' is empty or blank"]}
    assert summary["files_found"] == summary["files_read"] == 4
    # shards never span two input files, and say which one they came from
    assert [s["input"] for s in summary["shards"]] == [str(p) for p, rows in files
                                                       for _ in range(0, len([r for r in rows if r["text"]]), 7)]


def test_fineweb_config_is_one_dump_and_max_docs_a_sample(tmp_path, fineweb):
    root, files = fineweb
    summary = hf_run(tmp_path / "one", root, f"source.config={DUMPS[0]}")
    assert summary["docs_out"] == 46 and {r["url"].rsplit("/", 1)[1] for r in rows_of(tmp_path / "one")} == {DUMPS[0]}
    summary = hf_run(tmp_path / "few", root, "source.max_docs=30", "source.id_field=null", "source.url_field=null")
    got = rows_of(tmp_path / "few")
    assert [r["text"] for r in got] == [r["text"] for _, rows in files for r in rows][:30]
    assert got[25]["url"] == f"hf://{root}/data/{DUMPS[0]}/001_00000.parquet#2" and got[0]["warc_record_id"] is None
    assert summary["statuses"] == {"read": 30, "skipped_max_docs": 1}
    with pytest.raises(PipelineError, match="no folder 'CC-MAIN-2099-01'"):
        hf_run(tmp_path / "x", root, "source.config=CC-MAIN-2099-01")


def test_flat_folder_of_parquet_and_jsonl_split_by_name(tmp_path, monkeypatch):
    d = tmp_path / "flat"
    d.mkdir()
    pq.write_table(pa.table({"text": ["p0", "p1"], "url": [None, "https://p1.example/"]}), d / "train-00000.parquet")
    (d / "train-00001.jsonl").write_text('{"text": "j0"}\n\n{"other": 1}\n{"text": 7}\n{"text": "j4"}\n')
    with gzip.open(d / "test.jsonl.gz", "wt") as f:
        f.write('{"text": "t0"}\n')
    (d / ".cache").mkdir()
    pq.write_table(pa.table({"text": ["hidden"]}), d / ".cache" / "train.parquet")
    summary = hf_run(tmp_path / "tr", d)
    got = rows_of(tmp_path / "tr")
    assert [r["text"] for r in got] == ["p0", "p1", "j0", "j4"]
    assert [r["url"] for r in got] == [f"hf://{d}/train-00000.parquet#0", "https://p1.example/",
                                       f"hf://{d}/train-00001.jsonl#0", f"hf://{d}/train-00001.jsonl#3"]
    assert summary["statuses"] == {"read": 4, "skipped_missing_field": 1, "skipped_bad_field_type": 1}
    hf_run(tmp_path / "te", d, "source.split=test")
    assert [r["text"] for r in rows_of(tmp_path / "te")] == ["t0"]
    with pytest.raises(PipelineError, match=r"no split 'validation' among its data files \(has train, test\)"):
        hf_run(tmp_path / "va", d, "source.split=validation")
    monkeypatch.chdir(tmp_path)  # a relative folder name
    hf_run(tmp_path / "rel", Path("flat"))
    assert [r["url"] for r in rows_of(tmp_path / "rel")][0] == "hf://flat/train-00000.parquet#0"


def test_save_to_disk_folders_numbered_across_their_arrow_files(tmp_path):
    import datasets

    texts = [f"saved document {i}" if i != 3 else None for i in range(10)]
    ds = datasets.Dataset.from_dict({"text": texts, "id": list(range(10))})
    dd = datasets.DatasetDict({"train": ds, "test": ds.select([0, 1])})
    dd.save_to_disk(str(tmp_path / "dd"), num_shards={"train": 3, "test": 1})
    assert len(list((tmp_path / "dd" / "train").glob("*.arrow"))) == 3
    for workers in (1, 2):
        summary = hf_run(tmp_path / f"w{workers}", tmp_path / "dd", f"executor.workers={workers}",
                         "source.rows_per_shard=2")
    assert shard_bytes(tmp_path / "w1") == shard_bytes(tmp_path / "w2")
    got = rows_of(tmp_path / "w1")
    assert [r["text"] for r in got] == [t for t in texts if t]
    assert [r["url"] for r in got] == [f"hf://{tmp_path / 'dd'}/train#{i}" for i in range(10) if i != 3]
    assert [r["warc_record_id"] for r in got] == [str(i) for i in range(10) if i != 3]
    assert summary["statuses"] == {"read": 9, "skipped_missing_field": 1}
    assert summary["problem_examples"] == {
        "skipped_missing_field": [f"{tmp_path / 'dd'}[train]#3: 'text' is missing or null"]}
    hf_run(tmp_path / "test", tmp_path / "dd", "source.split=test")
    assert [r["text"] for r in rows_of(tmp_path / "test")] == ["saved document 0", "saved document 1"]


def test_folder_problems(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "README.md").write_text("# nothing here\n")
    with pytest.raises(PipelineError, match=r"no data files \(\.parquet, \.arrow, \.jsonl.*\) under .*empty"):
        hf_run(tmp_path / "o1", tmp_path / "empty")
    (tmp_path / "nocol").mkdir()
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "nocol" / "a.parquet")
    with pytest.raises(PipelineError, match=r"has no 'text' column \(has \['body'\]\)"):
        hf_run(tmp_path / "o2", tmp_path / "nocol")
    # a damaged file among good ones is counted, and the others are read
    (tmp_path / "mixed").mkdir()
    pq.write_table(pa.table({"text": ["good one"]}), tmp_path / "mixed" / "a.parquet")
    (tmp_path / "mixed" / "b.parquet").write_bytes(b"PAR1 not really parquet")
    pq.write_table(pa.table({"text": ["good two"]}), tmp_path / "mixed" / "c.parquet")
    summary = hf_run(tmp_path / "o3", tmp_path / "mixed")
    assert [r["text"] for r in rows_of(tmp_path / "o3")] == ["good one", "good two"]
    assert summary["statuses"]["error_unreadable"] == 1 and summary["files_read"] == 2
    assert summary["problem_examples"]["error_unreadable"][0].startswith(f"{tmp_path / 'mixed' / 'b.parquet'}#row0: ")


# ------------------------------------------------------------------ a file larger than any per-file limit

MEASURE = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL); "
           "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)")


def peak_rss_ingest(root: Path, *overrides: str) -> int:
    """Peak RSS (bytes) of `python -m pipeline ingest` run alone in a fresh process."""
    cmd = [sys.executable, "-c", MEASURE, sys.executable, "-m", "pipeline", "ingest", f"paths.root={root}",
           "executor.workers=1", *overrides]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return int(res.stdout.split()[-1]) * 1024


def write_big_parquet(path: Path, target_bytes: int) -> int:
    """Distinct documents of random words (fixed seed), 1000 rows per row group, uncompressed so
    the file is as large as its text; returns the number of rows."""
    import numpy as np

    rng = np.random.default_rng(0)
    words = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), rng.integers(2, 10))) for _ in range(3000)]
    pool = [" ".join(rng.choice(words, 800)) for _ in range(500)]
    schema = pa.schema([("text", pa.string()), ("id", pa.string()), ("url", pa.string())])
    rows = size = 0
    with pq.ParquetWriter(path, schema, compression="none", use_dictionary=False) as w:
        while size < target_bytes:
            texts = [f"document {rows + i}: {pool[(rows + i) % len(pool)]}" for i in range(1000)]
            size += sum(map(len, texts))
            w.write_table(pa.table({"text": texts, "id": [f"<urn:uuid:{rows + i}>" for i in range(1000)],
                                    "url": [f"https://example.com/{rows + i}" for i in range(1000)]}, schema=schema))
            rows += 1000
    return rows


@pytest.mark.slow
def test_parquet_larger_than_any_file_limit_streams_with_bounded_memory(tmp_path):
    """A 400 MB Parquet file (over files' max_file_bytes) through both sources that read Parquet:
    the peak RSS over a one-row run's stays under half the file, and every row is written."""
    (tmp_path / "big").mkdir()
    (tmp_path / "tiny").mkdir()
    big = tmp_path / "big" / "train.parquet"
    rows = write_big_parquet(big, 400_000_000)
    size = big.stat().st_size
    assert size > int(load(["source=files"]).source.max_file_bytes)
    pq.write_table(pa.table({"text": ["one small document"]}), tmp_path / "tiny" / "train.parquet")
    for kind, arg in (("hf", "source.name"), ("files", "source.paths")):
        def source(d: Path) -> list[str]:
            return [f"source={kind}", f"{arg}={d if kind == 'hf' else [str(d / 'train.parquet')]}"]

        baseline = peak_rss_ingest(tmp_path / f"{kind}-tiny", *source(tmp_path / "tiny"))
        peak = peak_rss_ingest(tmp_path / f"{kind}-big", *source(tmp_path / "big"))
        print(f"{kind}: file {size >> 20} MiB, {rows} rows; peak RSS {peak >> 20} MiB, baseline {baseline >> 20} MiB")
        assert peak - baseline < size / 2, (kind, peak, baseline, size)
        summary = read_json(tmp_path / f"{kind}-big" / "data" / "raw" / "_summary.json")
        shards = parquet_files(tmp_path / f"{kind}-big" / "data" / "raw")
        written = sum(pq.ParquetFile(f).metadata.num_rows for f in shards)
        assert summary["statuses"] == {"read": rows} and summary["docs_out"] == written == rows
