"""The ``hf`` source: a Hugging Face dataset by hub name, local data folder or ``save_to_disk`` folder.

A hub name streams through ``datasets`` (``IterableDataset``), so a large split never has
to fit in memory or on disk first. A local folder needs no ``datasets`` and no network: its
files are read here with pyarrow, one Parquet row group / Arrow record batch / JSON block
at a time, and fanned out over the executor, each file into shards of its own handed back
in file order, so the output is the same whatever the number of workers.

* A ``save_to_disk`` folder (``state.json``; or ``dataset_dict.json`` with a folder per
  split): the Arrow files its ``state.json`` lists; a row is ``hf://<name>/<split>#<row>``.
* Any other folder: its ``.parquet``, ``.arrow`` and ``.jsonl`` (``.gz``, ``.zst``) files,
  only those under ``data/`` when there is one (the hub's layout, FineWeb's
  ``data/<dump>/*.parquet``), split by file and folder names as ``datasets`` does
  (``train-*.parquet``, ``test/``; none named: all are train); a row is
  ``hf://<name>/<file>#<row>``.

Where a row has a ``url_field`` value, that is its url instead, and its ``id_field`` value
is kept as ``warc_record_id`` (FineWeb's ``id`` is the Common Crawl WARC-Record-ID). A row
with no text (missing, null, not a string, blank) is counted under its reason.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from omegaconf import OmegaConf

from pipeline.core.artifacts import doc_id
from pipeline.core.errors import PipelineError
from pipeline.sources.files import parquet_batches, resolve_files

log = logging.getLogger("pipeline.stages.ingest")

DATA_SUFFIXES = (".parquet", ".arrow", ".jsonl", ".jsonl.gz", ".jsonl.zst")
# a file or folder name naming a split, as datasets infers them (train-00000-of-00002.parquet, test/, dev.jsonl)
SPLIT_WORDS = {
    "train": ("train", "training"),
    "validation": ("validation", "valid", "val", "dev"),
    "test": ("test", "testing", "eval", "evaluation"),
}


def _is_saved_to_disk(path: Path) -> bool:
    return path.is_dir() and any((path / f).is_file() for f in ("dataset_dict.json", "state.json"))


def open_split(name: str, config: str | None, split: str, streaming: bool):
    """A hub dataset's split through ``datasets`` (cached, or online)."""
    import datasets

    try:
        return datasets.load_dataset(name, config, split=split, streaming=streaming)
    except (FileNotFoundError, ValueError, ConnectionError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PipelineError(f"cannot load dataset {name!r} split {split!r}: {first}") from e


# ------------------------------------------------------------------ reading one file


def _format(path: Path) -> str | None:
    name = path.name.lower()
    for suffix in DATA_SUFFIXES:
        if name.endswith(suffix):
            return suffix.split(".")[1]
    return None


def columns_of(path: Path) -> list[str] | None:
    """A Parquet or Arrow file's column names, from its footer or header (None for JSON Lines,
    whose records need not all have the same keys)."""
    kind = _format(path)
    if kind == "parquet":
        return pq.read_schema(path).names
    if kind == "arrow":
        with pa.OSFile(str(path)) as f:
            return _arrow_open(f)[0].names
    return None


def _arrow_open(f) -> tuple[pa.Schema, Iterator[pa.RecordBatch]]:
    """An Arrow IPC stream (what ``datasets`` writes) or IPC file: its schema and batches."""
    try:
        reader = pa.ipc.open_stream(f)
        return reader.schema, iter(reader)
    except pa.ArrowInvalid:
        f.seek(0)
        reader = pa.ipc.open_file(f)
        return reader.schema, (reader.get_batch(i) for i in range(reader.num_record_batches))


def arrow_rows(path: Path) -> int:
    """Rows in an Arrow file, from its batch headers (memory-mapped: the data is not read)."""
    with pa.memory_map(str(path)) as m:
        return sum(b.num_rows for b in _arrow_open(m)[1])


class BadLine(str):
    """A JSON Lines record that does not parse, or is not an object: why."""


def records(path: Path, columns: list[str], batch_rows: int) -> Iterator[list]:
    """The file's records (dicts of ``columns``, those it has) in lists of at most ``batch_rows``,
    holding one Parquet row group or Arrow record batch at a time. JSON Lines (``.gz``/``.zst``
    decompressed by pyarrow) are parsed line by line, so a bad line is one :class:`BadLine`:
    pyarrow's JSON reader gives up on a whole block for one value of another type."""
    kind = _format(path)
    if kind == "parquet":
        pf = pq.ParquetFile(path)  # buffered reads, not a memory map: what is read is freed
        present = [c for c in columns if c in pf.schema_arrow.names]
        for batch in parquet_batches(pf, present or None, batch_rows):
            yield batch.select(present).to_pylist() if present else [{}] * batch.num_rows
        return
    if kind == "arrow":
        with pa.OSFile(str(path)) as f:
            for batch in _arrow_open(f)[1]:
                batch = batch.select([c for c in columns if c in batch.schema.names])
                for start in range(0, batch.num_rows, batch_rows):
                    yield batch.slice(start, batch_rows).to_pylist()
        return
    out: list = []
    with io.BufferedReader(pa.input_stream(str(path), compression="detect"), 1 << 20) as f:
        for line in f:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as e:  # not JSON, or not UTF-8
                record = BadLine(f"not JSON ({e})")
            else:
                if not isinstance(record, dict):
                    record = BadLine(f"a JSON {type(record).__name__}, not an object")
            out.append(record)
            if len(out) >= batch_rows:
                yield out
                out = []
    if out:
        yield out


def row(text: str, locator: str, dataset: str, url=None, record_id=None) -> dict:
    return {
        "id": doc_id(text),
        "url": url if isinstance(url, str) and url else locator,
        "source": "hf",
        "content_type": "text/plain",
        "http_status": None,
        "html": None,
        "text": text,
        "source_file": dataset,
        "source_offset": None,
        "warc_record_id": None if record_id is None else str(record_id),
    }


def checked_text(value, where: str, field: str, ctx) -> str | None:
    """The text, or None with the reason counted (missing or null, not a string, blank)."""
    if value is None:
        ctx.problem("skipped_missing_field", f"{where}: {field!r} is missing or null")
    elif not isinstance(value, str):
        ctx.problem("skipped_bad_field_type", f"{where}: {field!r} is {type(value).__name__}, not a string")
    elif not value.strip():
        ctx.problem("skipped_empty_text", f"{where}: {field!r} is empty or blank")
    else:
        return value
    return None


def file_rows(task: dict, ctx) -> Iterator[dict]:
    """The rows of one data file; a file unreadable from some row on is counted, the rows
    before it kept. ``task["ok"]`` says whether it was read to the end."""
    path, field = Path(task["path"]), task["text_field"]
    url_field, id_field = task.get("url_field"), task.get("id_field")
    columns = [field, *(c for c in (url_field, id_field) if c)]
    i = int(task.get("start", 0))
    task["ok"] = False
    batches = records(path, columns, int(task["batch_rows"]))
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            break
        except (OSError, EOFError, pa.ArrowException) as e:  # a corrupt row group or stream: keep the rows before it
            ctx.problem("error_unreadable", f"{task['where']}{i}: unreadable from here on ({e})")
            return
        for record in batch:
            where = f"{task['where']}{i}"
            i += 1
            if isinstance(record, BadLine):
                ctx.problem("error_bad_json", f"{where}: {record}")
            elif (text := checked_text(record.get(field), where, field, ctx)) is not None:
                yield row(text, f"{task['url']}{i - 1}", task["dataset"], record.get(url_field) if url_field else None,
                          record.get(id_field) if id_field else None)
    task["ok"] = True


def ingest_file(task: dict) -> dict:
    """One data file -> Parquet parts under the work dir, plus its counts (runs in a worker)."""
    from pipeline.sources.raw import IngestContext, RawShardWriter, content_bytes

    ctx = IngestContext("hf", Path("."))
    work = Path(task["work"])
    work.mkdir(parents=True, exist_ok=True)
    writer = RawShardWriter(work, task["rows_per_shard"], task["max_shard_bytes"], prefix=f"f{task['index']:06d}")
    try:
        for r in file_rows(task, ctx):
            n = content_bytes(r)
            ctx.count("read", n)
            writer.write(r, n)
    except BaseException:
        writer.abort()
        raise
    writer.close()
    parts = [(str(work / f["name"]), f["rows"], b) for f, b in zip(writer.files, writer.part_bytes, strict=True)]
    log.info("ingest: hf: %s: %d rows written, %d skipped", task["path"], writer.rows,
             sum(v for k, v in ctx.docs.items() if k != "read"))
    return {"path": task["path"], "parts": parts, "docs": dict(ctx.docs), "bytes": dict(ctx.bytes),
            "examples": ctx.examples, "ok": task["ok"]}


# ------------------------------------------------------------------ which files


def _split_of(rel: Path) -> str | None:
    words = {w for part in rel.parts for w in re.split(r"[^a-z]+", part.lower()) if w}
    for split, names in SPLIT_WORDS.items():
        if words & set(names):
            return split
    return None


def _saved_files(path: Path, name: str, split: str) -> tuple[list[Path], str]:
    """(Arrow files in order, the split read) of a save_to_disk folder."""
    if (path / "dataset_dict.json").is_file():
        splits = [str(s) for s in json.loads((path / "dataset_dict.json").read_text())["splits"]]
        if split not in splits:
            raise PipelineError(f"{name}: no split {split!r} (has {', '.join(splits)})")
        path = path / split
    state = json.loads((path / "state.json").read_text())
    return [path / f["filename"] for f in state["_data_files"]], split


def _folder_files(path: Path, name: str, split: str, config: str | None) -> list[Path]:
    """The data files of a plain folder (or the one file named) that belong to ``split``."""
    if path.is_file():
        if not _format(path):
            raise PipelineError(f"{name}: not a data file (expected {', '.join(DATA_SUFFIXES)})")
        return [path]
    root = path / "data" if (path / "data").is_dir() else path
    if config:  # a subfolder, e.g. one FineWeb dump (data/CC-MAIN-2024-10)
        root = next((r for r in (path / config, path / "data" / config) if r.is_dir()), None)
        if root is None:
            raise PipelineError(f"{name}: no folder {config!r} for source.config (nor data/{config})")
    found = [f for f in resolve_files([str(root)], allow_outside=True)  # a hub snapshot is a tree of links
             if _format(f) and not any(p.startswith(".") for p in f.relative_to(root).parts)]
    if not found:
        raise PipelineError(f"{name}: no data files ({', '.join(DATA_SUFFIXES)}) under {root}")
    by_split: dict[str, list[Path]] = {}
    for f in found:
        by_split.setdefault(_split_of(f.relative_to(root)) or "", []).append(f)
    if set(by_split) == {""}:
        by_split = {"train": by_split[""]}
    elif "" in by_split:
        log.warning("ingest: hf: %s: %d data files name no split (train, validation, test) and are not read, "
                    "e.g. %s", name, len(by_split[""]), by_split[""][0])
    if split not in by_split:
        raise PipelineError(f"{name}: no split {split!r} among its data files "
                            f"(has {', '.join(s for s in SPLIT_WORDS if s in by_split)})")
    return by_split[split]


def _local_tasks(path: Path, name: str, split: str, config: str | None, field: str, source, ctx) -> list[dict]:
    common = {
        "dataset": name,
        "text_field": field,
        "url_field": source.get("url_field") or None,
        "id_field": source.get("id_field") or None,
        "batch_rows": max(1, int(source.get("batch_rows", 1024))),
        "work": str(ctx.work_dir or Path.cwd() / ".hf-work"),
        "rows_per_shard": int(source.rows_per_shard),
        "max_shard_bytes": int(source.get("max_shard_bytes", 0) or 0),
    }
    tasks = []
    if _is_saved_to_disk(path):
        files, split = _saved_files(path, name, split)
        start = 0
        for i, f in enumerate(files):  # rows are numbered across the split, as datasets numbers them
            tasks.append({**common, "path": str(f), "index": i, "start": start,
                          "where": f"{name}[{split}]#", "url": f"hf://{name}/{split}#"})
            start += arrow_rows(f) if i + 1 < len(files) else 0
    else:
        base = path if path.is_dir() else path.parent
        for i, f in enumerate(_folder_files(path, name, split, config)):
            tasks.append({**common, "path": str(f), "index": i, "start": 0, "where": f"{f}#row",
                          "url": f"hf://{name}/{f.relative_to(base)}#"})
    if not tasks:
        raise PipelineError(f"{name}: split {split!r} has no data files")
    try:
        columns = columns_of(Path(tasks[0]["path"]))
    except (OSError, pa.ArrowException) as e:
        raise PipelineError(f"{name}: cannot read {tasks[0]['path']}: {e}") from e
    if columns is not None and field not in columns:
        raise PipelineError(f"dataset {name!r} split {split!r} has no {field!r} column (has {columns})")
    return tasks


# ------------------------------------------------------------------ the source


def _local(path: Path, name: str, split: str, config: str | None, field: str, max_docs: int, source, ctx):
    from pipeline.sources.raw import content_bytes, file_shards

    tasks = _local_tasks(path, name, split, config, field, source, ctx)
    log.info("ingest: hf: %s split %s: %d data files", name, split, len(tasks))
    ctx.extra.update(input_paths=[name], files_found=len(tasks), files_read=0)
    if not max_docs:
        yield from file_shards(ingest_file, tasks, ctx)
        return
    rows = 0  # a sample: read here, file by file, and stop at the cap
    for task in tasks:
        for r in file_rows(task, ctx):
            if rows >= max_docs:
                ctx.count("skipped_max_docs")
                return
            rows += 1
            ctx.count("read", content_bytes(r))
            yield r
        ctx.extra["files_read"] += task["ok"]


def _hub(name: str, split: str, config: str | None, field: str, max_docs: int, source, ctx):
    ds = open_split(name, config, split, bool(source.get("streaming", True)))
    url_field, id_field = source.get("url_field") or None, source.get("id_field") or None
    columns = getattr(ds, "column_names", None)
    if columns is not None and field not in columns:
        raise PipelineError(f"dataset {name!r} split {split!r} has no {field!r} column (has {columns})")
    rows = 0
    for i, record in enumerate(ds):
        if max_docs and rows >= max_docs:
            ctx.count("skipped_max_docs")
            break
        if (text := checked_text(record.get(field), f"{name}[{split}]#{i}", field, ctx)) is None:
            continue
        rows += 1
        ctx.count("read", len(text.encode("utf-8", "surrogatepass")))
        yield row(text, f"hf://{name}/{split}#{i}", name, record.get(url_field) if url_field else None,
                  record.get(id_field) if id_field else None)


def documents(source, ctx) -> Iterator:
    if OmegaConf.is_missing(source, "name") or not source.name:
        raise PipelineError("source=hf needs source.name: a hub dataset or a local folder, e.g. source.name=/data/ds")
    name, split, field = str(source.name), str(source.split), str(source.text_field)
    config = str(source.config) if source.get("config") else None
    max_docs = int(source.get("max_docs", 0) or 0)
    path = Path(os.path.abspath(os.path.expanduser(name)))
    try:
        if path.exists():
            yield from _local(path, name, split, config, field, max_docs, source, ctx)
        else:
            yield from _hub(name, split, config, field, max_docs, source, ctx)
    finally:
        ctx.extra.update(dataset=name, split=split, text_field=field)
