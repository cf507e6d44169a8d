"""Fan-out over shards: local processes by default, Dask when configured.

Results come back in input order whatever the backend, so outputs are deterministic: each
task writes its own piece under the stage's temp dir and returns a small summary, and the
stage assembles the pieces in shard order (a cluster therefore needs the same filesystem
for `paths.root` on every worker).
"""

from __future__ import annotations

import logging
import os
import multiprocessing
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from pipeline.core.errors import PipelineError


def _in_fresh_process(fn: Callable[[Any], Any], item: Any) -> Any:
    """Run one item in a newly forked process; a worker that dies (killed, out of memory)
    is an error naming the item, never a hang."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("fork")) as one:
        try:
            return one.submit(fn, item).result()
        except BrokenProcessPool as e:
            raise PipelineError(f"the worker processing {str(item)[:200]} died (killed, or out of memory?)") from e


def worker_count(executor_cfg) -> int:
    """`executor.workers`: a number, or `auto` (every core this process may use)."""
    raw = executor_cfg.get("workers", "auto")
    if raw is None or str(raw) == "auto":
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except AttributeError:  # not Linux
            return max(1, os.cpu_count() or 1)
    try:
        return max(1, int(raw))
    except (TypeError, ValueError):
        raise PipelineError(f"executor.workers={raw!r}: expected a number or auto") from None


def map_ordered(fn: Callable[[Any], Any], items: Sequence[Any], executor_cfg, fresh_workers: bool = False) -> list[Any]:
    """`fn` over `items`, results in input order. `fresh_workers` (local processes only):
    every item runs in a newly forked worker, so a stage whose per-item peak is bounded keeps
    that bound however many items there are; a long-lived worker's peak creeps up with
    the items it has seen (freed native allocations fragment glibc's heap)."""
    kind = str(executor_cfg.get("kind", "local"))
    items = list(items)
    if kind == "local":
        workers = worker_count(executor_cfg)
        if workers <= 1 or len(items) <= 1:
            return [fn(x) for x in items]
        if fresh_workers and "fork" in multiprocessing.get_all_start_methods():
            with ThreadPoolExecutor(max_workers=min(workers, len(items))) as threads:
                return list(threads.map(lambda x: _in_fresh_process(fn, x), items))
        with ProcessPoolExecutor(max_workers=min(workers, len(items))) as pool:
            return list(pool.map(fn, items))
    if kind == "dask":
        return _dask_map(fn, items, executor_cfg)
    raise PipelineError(f"unknown executor kind {kind!r} (expected local or dask)")


def _dask_map(fn: Callable[[Any], Any], items: list[Any], executor_cfg) -> list[Any]:
    """`client.map` over the items on the cluster at `address`, or on a LocalCluster of
    `workers` single-threaded processes when there is none (tests, one big machine)."""
    try:
        from dask.distributed import Client, LocalCluster
    except ImportError as e:
        raise PipelineError("executor=dask needs dask.distributed: pip install -e '.[dask]'") from e
    if not items:
        return []
    address = executor_cfg.get("address")
    if address:
        try:
            client = Client(str(address), timeout=float(executor_cfg.get("connect_timeout", 30)))
        except OSError as e:
            raise PipelineError(f"executor=dask: no Dask scheduler at {address}: {e}") from e
        with client:
            return _gather(client, fn, items)
    workers = max(1, min(worker_count(executor_cfg), len(items)))
    # silence_logs: shutdown races (heartbeats to a closed scheduler) log tracebacks that are
    # noise; a task's own exception still reaches us through gather()
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
                      silence_logs=logging.CRITICAL) as cluster:
        with Client(cluster) as client:
            return _gather(client, fn, items)


def _gather(client, fn, items):
    # pure=False: a task writes files, so equal inputs must still run (and run again on retry)
    futures = client.map(fn, items, pure=False, key=[f"{getattr(fn, '__name__', 'task')}-{i}" for i in range(len(items))])
    return client.gather(futures)
