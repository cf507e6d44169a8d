"""One writer per workspace: an advisory `flock` on `<paths.root>/.pipeline.lock`.

Stages write their outputs atomically, but two runs on the same `paths.root` (a scheduled
rebuild overlapping a manual run, two workers picking up runs) would still race on the
same output directories, on `dvc commit` and on `dvc.lock`. The CLI, every stage run and
the Prefect flow take this lock; a second run waits up to `wait` seconds
($PIPELINE_LOCK_WAIT, default 0) and then fails with a message naming the holder.

The lock is re-entrant within a process (the flow holds it while its tasks run stages),
and a child process started by a holder (training stages run as subprocesses) is told
through $PIPELINE_LOCK_HELD that its parent holds it. `flock` is released by the kernel
when the holder dies, so a killed run never leaves a stale lock behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from pipeline.core.errors import PipelineError

LOCK_NAME = ".pipeline.lock"
HELD_ENV = "PIPELINE_LOCK_HELD"
WAIT_ENV = "PIPELINE_LOCK_WAIT"

_held: dict[str, int] = {}  # lock path -> depth, for this process
_guard = threading.Lock()


class WorkspaceLocked(PipelineError):
    """Another run holds the workspace lock."""


def lock_path(root: str | Path) -> Path:
    return Path(root).expanduser().resolve() / LOCK_NAME


def default_wait() -> float:
    raw = os.environ.get(WAIT_ENV, "0") or "0"
    try:
        return float(raw)
    except ValueError:
        raise PipelineError(f"${WAIT_ENV}={raw!r} is not a number of seconds") from None


def holder(path: Path) -> str:
    """Who holds the lock, as the holder wrote it (best effort: the file may be mid-write)."""
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return "another process"
    if not info:
        return "another process"
    return f"pid {info.get('pid')} on {info.get('host')} ({info.get('command')!r}, since {info.get('since')})"


def child_env(root: str | Path) -> dict[str, str]:
    """Environment for a subprocess that runs under this process's lock."""
    return {**os.environ, HELD_ENV: str(lock_path(root))}


def _secondary_rank() -> bool:
    """A non-zero rank of a distributed launch (torchrun, srun, Lightning's DDP re-exec):
    rank 0 of the same job holds the lock."""
    return any(os.environ.get(v, "0") not in ("", "0") for v in ("RANK", "LOCAL_RANK", "SLURM_PROCID"))


@contextlib.contextmanager
def workspace_lock(root: str | Path, wait: float | None = None, what: str = "") -> Iterator[Path]:
    """Hold the lock of workspace `root` for the duration of the block."""
    path = lock_path(root)
    key = str(path)
    with _guard:
        if key in _held:
            _held[key] += 1
            reentrant = True
        else:
            reentrant = False
    if reentrant:
        try:
            yield path
        finally:
            with _guard:
                _held[key] -= 1
        return
    if os.environ.get(HELD_ENV) == key or _secondary_rank():  # a parent / rank 0 holds it for us
        yield path
        return

    wait = default_wait() if wait is None else float(wait)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + max(0.0, wait)
    announced = False
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise WorkspaceLocked(
                        f"workspace {path.parent} is in use by {holder(path)}; "
                        f"{what + ' ' if what else ''}not started. Wait for that run to finish, or let this one "
                        f"wait: ${WAIT_ENV}=SECONDS (flow parameter lock_wait). Lock file: {path}"
                    ) from None
                if not announced:
                    print(f"waiting up to {wait:.0f}s for {holder(path)} to release {path}", file=sys.stderr)
                    announced = True
                time.sleep(min(0.5, left))
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": what or " ".join(sys.argv[:3]),
            "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        with _guard:
            _held[key] = 1
        try:
            yield path
        finally:
            with _guard:
                _held.pop(key, None)
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
