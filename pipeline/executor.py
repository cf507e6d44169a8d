"""Fan-out over shards: local processes by default, Dask or Ray when configured.

Results come back in input order whatever the backend, so outputs are deterministic.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from pipeline.errors import PipelineError


def map_ordered(fn: Callable[[Any], Any], items: Sequence[Any], executor_cfg) -> list[Any]:
    kind = str(executor_cfg.get("kind", "local"))
    items = list(items)
    if kind == "local":
        workers = int(executor_cfg.get("workers", 1) or 1)
        if workers <= 1 or len(items) <= 1:
            return [fn(x) for x in items]
        with ProcessPoolExecutor(max_workers=min(workers, len(items))) as pool:
            return list(pool.map(fn, items))
    if kind == "dask":
        try:
            from dask.distributed import Client
        except ImportError as e:  # pragma: no cover - optional extra
            raise PipelineError("executor=dask needs `pip install 'pipeline[dask]'`") from e
        with Client(executor_cfg.get("address")) as client:
            return client.gather(client.map(fn, items, pure=False))
    if kind == "ray":
        try:
            import ray
        except ImportError as e:  # pragma: no cover - optional extra
            raise PipelineError("executor=ray needs `pip install 'pipeline[ray]'`") from e
        ray.init(address=executor_cfg.get("address"), ignore_reinit_error=True)
        remote = ray.remote(fn)
        return ray.get([remote.remote(x) for x in items])
    raise PipelineError(f"unknown executor kind {kind!r} (expected local, dask or ray)")
