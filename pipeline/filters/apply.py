"""Build the configured cleaning steps and run a raw shard through them.

``clean.steps`` maps a step's name to its config: ``_target_`` (a class in
pipeline.filters.steps, or any importable callable) plus its arguments, and ``enabled``.
Steps run in the mapping's order; a step is switched off by name
(``clean.steps.pii.enabled=false``). The name only addresses the config: the funnel and
the rejected rows name a step by :func:`step_name`.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pipeline.core.errors import PipelineError
from pipeline.core.parquet import ShardWriter, iter_rows
from pipeline.dedup.index import ShardSignatures
from pipeline.dedup.minhash import DedupParams
from pipeline.filters.funnel import Tally
from pipeline.filters.schema import CANDIDATE_SCHEMA, REJECTED_SCHEMA

log = logging.getLogger("pipeline.stages.clean")

BATCH = 256  # rows read, and row-group size of the worker's files
MAX_ERROR_EXAMPLES = 20


def build_steps(step_cfgs: dict | list) -> list:
    """Instantiate the configured steps in order, with a clear error per bad entry.

    ``step_cfgs`` maps names to step configs (``clean.steps``); a list is taken too, its
    entries named by position. A step with ``enabled: false`` is skipped.
    """
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    if OmegaConf.is_config(step_cfgs):
        step_cfgs = OmegaConf.to_container(step_cfgs, resolve=True)
    if isinstance(step_cfgs, dict):
        entries = [(f"clean.steps.{name}", sc) for name, sc in step_cfgs.items()]
    elif isinstance(step_cfgs, list):
        entries = [(f"clean.steps[{i}]", sc) for i, sc in enumerate(step_cfgs)]
    else:
        raise PipelineError(f"clean.steps must map step names to step configs (got {step_cfgs!r})")
    steps = []
    for where, sc in entries:
        if not isinstance(sc, dict):
            raise PipelineError(f"{where} is not a mapping of _target_ and arguments (got {sc!r})")
        target = sc.get("_target_")
        if not target:
            raise PipelineError(f"{where} has no _target_ (got {sc!r})")
        sc = dict(sc)
        if not sc.pop("enabled", True):
            continue
        try:
            steps.append(instantiate(sc, _convert_="all"))
        except InstantiationException as e:
            msg = " ".join(str(e).split())
            raise PipelineError(f"{where} ({target}) could not be built: {msg}") from e
        if not callable(steps[-1]):
            raise PipelineError(f"{where} ({target}) is not callable")
    return steps


def step_name(step) -> str:
    return getattr(step, "name", type(step).__name__)


def apply_steps(steps: list, doc: dict, errors: list[str]) -> tuple[dict, int, str]:
    """Run one document through the steps: (doc, len(steps), "") if kept, else (doc as it
    reached the rejecting step j, j, reason)."""
    from pipeline.filters.steps import Reject

    for j, step in enumerate(steps):
        if getattr(step, "needs_text", True) and doc.get("text") is None:
            return doc, j, "no_text"
        try:
            result = step(doc)
        except Exception as e:  # noqa: BLE001 - one bad document must not stop the batch
            msg = f"{doc.get('url')}: {step_name(step)} failed: {type(e).__name__}: {e}"
            log.warning("clean: %s", msg)
            if len(errors) < MAX_ERROR_EXAMPLES:
                errors.append(msg)
            return doc, j, "step_error"
        if isinstance(result, Reject):
            return doc, j, result.reason
        doc = result
    if doc.get("text") is None:
        return doc, len(steps), "no_text"
    return doc, len(steps), ""


def nbytes(s: str | None) -> int:
    return len((s or "").encode("utf-8", "surrogatepass"))


def clean_shard(task: dict) -> dict:
    """Worker: filter one raw shard into ``<work>/kept-i`` (CANDIDATE_SCHEMA) and
    ``<work>/rejected-i`` (REJECTED_SCHEMA), write its dedup signatures, return counts."""
    steps = build_steps(task["steps"])
    p = DedupParams(**task["dedup"])
    names = [step_name(s) for s in steps]
    passed = [0] * len(steps)
    reached = [0] * len(steps)
    tally = Tally()
    errors: list[str] = []
    work = Path(task["work"])
    i = task["index"]
    # one file each, numbered by the shard, even when empty; row groups of BATCH rows
    kept_out = ShardWriter(work, CANDIDATE_SCHEMA, None, prefix="kept", start=i, row_group_rows=BATCH, keep_empty=True)
    rej_out = ShardWriter(work, REJECTED_SCHEMA, None, prefix="rejected", start=i, row_group_rows=BATCH,
                          keep_empty=True)  # fmt: skip
    signatures = ShardSignatures(p, task["run"], i)
    n_in = bytes_in = 0
    for raw in iter_rows(task["shard"], batch_size=BATCH):
        n_in += 1
        content = raw.get("html") if raw.get("html") is not None else raw.get("text")
        nb = nbytes(content)
        bytes_in += nb
        doc, where, reason = apply_steps(steps, dict(raw), errors)
        for j in range(min(where + 1, len(steps))):
            reached[j] += 1
        for j in range(where):
            passed[j] += 1
        if reason:
            step = names[where] if where < len(steps) else "end"
            tally.reject(step, reason, nb)
            rej_out.write({"id": raw["id"], "url": raw["url"], "source": raw["source"], "step": step,
                           "reason": reason, "bytes": nb, "text": doc.get("text")})  # fmt: skip
            continue
        key = signatures.add(doc["text"])
        kept_out.write({"key": key, "text": doc["text"], "url": raw["url"], "source": raw["source"],
                        "raw_id": raw["id"], "title": doc.get("title"), "language": doc.get("language"),
                        "bytes_in": nb})  # fmt: skip
    kept_out.close()
    rej_out.close()
    signatures.write(work)
    return {
        "shard": Path(task["shard"]).name,
        "index": i,
        "in": n_in,
        "bytes_in": bytes_in,
        "steps": [[names[j], reached[j], passed[j]] for j in range(len(steps))],
        **tally.counts(),
        "errors": errors,
    }
