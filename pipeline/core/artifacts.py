"""Atomic outputs, content hashes and stage summaries (Parquet shard I/O: pipeline.core.parquet).

Every stage writes into a temporary sibling directory and renames it into place only when
it succeeded, so a crash never leaves a half-written output that a later stage would read.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pipeline
from pipeline.core.errors import PipelineError

SUMMARY = "_summary.json"
_PKG_DIR = Path(pipeline.__file__).resolve().parent


def doc_id(content: str | bytes) -> str:
    """Stable content id: the same text always gets the same id, across runs and machines."""
    data = content.encode("utf-8", "surrogatepass") if isinstance(content, str) else content
    return hashlib.sha256(data).hexdigest()[:32]


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def hash_tree(path: Path) -> str:
    """sha256 over every file's relative path and content, the summary excluded."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        if p.is_file() and p.name != SUMMARY:
            h.update(p.relative_to(path).as_posix().encode() + b"\0" + sha256_file(p).encode())
    return h.hexdigest()


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (temp file + rename), keys sorted so reruns are byte-identical."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def _dead(pid_suffix: str) -> bool:
    if not pid_suffix.isdigit():
        return False
    try:
        os.kill(int(pid_suffix), 0)
    except ProcessLookupError:
        return True
    except OSError:  # alive, another user's
        return False
    return False


def _leftovers(out: Path, kind: str) -> list[Path]:
    """``<out>.<kind>-<pid>`` siblings whose process is gone (a run killed with SIGKILL)."""
    return sorted(p for p in out.parent.glob(f"{out.name}.{kind}-*") if _dead(p.name.rsplit("-", 1)[-1]))


@contextlib.contextmanager
def atomic_dir(out: Path) -> Iterator[Path]:
    """Yield a fresh temp dir beside ``out``; on success it replaces ``out`` in one rename.

    A run killed between its two renames leaves ``out`` missing and the previous output in
    ``<out>.old-<pid>``: the next run puts it back first. Temp dirs of killed runs are
    removed by the next success; nothing worth keeping lives in them (training keeps its
    checkpoints in its run directory, `pipeline.training.checkpoints`).
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not out.exists():
        for old in _leftovers(out, "old")[-1:]:
            os.replace(old, out)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = out.with_name(f"{out.name}.old-{os.getpid()}")
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
    for stale in [*_leftovers(out, "tmp"), *_leftovers(out, "old")]:
        shutil.rmtree(stale, ignore_errors=True)


def require_dir(path: Path, what: str, stage: str) -> Path:
    """A clear one-line error when an upstream output is missing."""
    path = Path(path)
    if not path.is_dir():
        raise PipelineError(f"{what} not found at {path}: run `python -m pipeline {stage}` first")
    return path


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """git commit of the checkout when there is one, plus a hash of the package's source
    (once per process: it describes the code this process imported, not later edits)."""
    h = hashlib.sha256()
    for p in sorted(_PKG_DIR.rglob("*.py")):
        h.update(p.read_bytes())
    src = h.hexdigest()[:12]
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=_PKG_DIR, capture_output=True, text=True, timeout=5
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        rev = ""
    return f"{rev or 'nogit'}+src.{src}"


class Timer:
    def __init__(self) -> None:
        self.start = time.perf_counter()

    @property
    def seconds(self) -> float:
        return round(time.perf_counter() - self.start, 3)


def write_summary(out: Path, stage: str, cfg, inputs: dict[str, Path], timer: Timer, **fields: Any) -> dict:
    """The stage's `_summary.json`: what ran, on what, with which config, and what came out."""
    from pipeline.core.config import config_hash, to_container

    summary = {
        "stage": stage,
        "config": to_container(cfg),
        "config_sha256": config_hash(cfg),
        "inputs": {k: {"path": str(v), "sha256": hash_tree(v)} for k, v in inputs.items()},
        "code_version": code_version(),
        "seconds": timer.seconds,
        **fields,
    }
    write_json(Path(out) / SUMMARY, summary)
    return summary
