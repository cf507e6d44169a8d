"""The ``hf`` source: a Hugging Face dataset by hub name, local data folder or ``save_to_disk`` folder.

Streams (``IterableDataset``) so a large split never has to fit in memory or on disk
first. A folder written by ``Dataset.save_to_disk`` is opened with ``load_from_disk``
(``load_dataset`` refuses those), which needs no network at all.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from omegaconf import OmegaConf

from pipeline.core.artifacts import doc_id
from pipeline.core.errors import PipelineError


def _is_saved_to_disk(path: Path) -> bool:
    return path.is_dir() and any((path / f).is_file() for f in ("dataset_dict.json", "state.json"))


def open_split(name: str, config: str | None, split: str, streaming: bool):
    import datasets

    path = Path(name).expanduser()
    try:
        if _is_saved_to_disk(path):
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise PipelineError(f"{name}: no split {split!r} (has {', '.join(ds)})")
                ds = ds[split]
            return ds.to_iterable_dataset() if streaming else ds
        return datasets.load_dataset(str(path) if path.exists() else name, config, split=split, streaming=streaming)
    except PipelineError:
        raise
    except (FileNotFoundError, ValueError, ConnectionError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PipelineError(f"cannot load dataset {name!r} split {split!r}: {first}") from e


def documents(source, ctx) -> Iterator[dict]:
    if OmegaConf.is_missing(source, "name") or not source.name:
        raise PipelineError("source=hf needs source.name: a hub dataset or a local folder, e.g. source.name=/data/ds")
    name, split, field = str(source.name), str(source.split), str(source.text_field)
    config = source.get("config")
    ds = open_split(name, str(config) if config else None, split, bool(source.get("streaming", True)))
    max_docs = int(source.get("max_docs", 0) or 0)
    columns = getattr(ds, "column_names", None)
    if columns is not None and field not in columns:
        raise PipelineError(f"dataset {name!r} split {split!r} has no {field!r} column (has {columns})")
    rows = 0
    try:
        for i, record in enumerate(ds):
            if max_docs and rows >= max_docs:
                ctx.count("skipped_max_docs")
                break
            where = f"{name}[{split}]#{i}"
            value = record.get(field)
            if value is None:
                ctx.problem("skipped_missing_field", f"{where}: {field!r} is missing or null")
                continue
            if not isinstance(value, str):
                ctx.problem("skipped_bad_field_type", f"{where}: {field!r} is {type(value).__name__}, not a string")
                continue
            rows += 1
            ctx.count("read", len(value.encode("utf-8", "surrogatepass")))
            yield {
                "id": doc_id(value),
                "url": f"hf://{name}/{split}#{i}",
                "source": "hf",
                "content_type": "text/plain",
                "http_status": None,
                "html": None,
                "text": value,
                "source_file": name,
                "source_offset": None,
            }
    finally:
        ctx.extra.update(dataset=name, split=split, text_field=field)
