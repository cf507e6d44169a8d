"""The parent run: what this evaluation is compared with, and the release gate.

Every eval run appends one record (metrics, resolved config, artifact hashes, gate
verdict) to ``eval.history_dir``. That directory is *not* a DVC output on purpose: DVC
deletes a stage's outputs before rerunning it, so the previous report cannot be the
memory of the previous run. The parent of a run is the newest record whose gate passed
(a model that failed the gate was never published, so it must not become the bar), or
an explicit ``eval.parent`` (a history record or a reports directory).

The gate compares configured metrics with the parent's: a rule fails when the metric
moved in its bad direction by more than ``max_regression`` (relative, 0.02 = 2 %).
"""

from __future__ import annotations

import datetime as _dt
import json
import math
from pathlib import Path

from pipeline.core.artifacts import write_json
from pipeline.core.errors import PipelineError

# metric name -> True when higher is better
HIGHER_IS_BETTER = {"val_bpb": False, "val_ppl": False, "bleu": True, "rouge1": True, "rouge2": True, "rougeL": True}
# config keys that say where things live or how loudly a run goes, not what it computes
_IGNORED_PREFIXES = ("paths.", "pretrain.progress_bar", "finetune.progress_bar", "eval.history_dir", "eval.parent")


def flatten(tree, prefix: str = "") -> dict[str, object]:
    """{"a.b.c": value} for a nested mapping; lists are kept whole (compared as values)."""
    out: dict[str, object] = {}
    if isinstance(tree, dict):
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}{k}."))
    else:
        out[prefix[:-1]] = tree
    return out


def config_diff(parent: dict | None, current: dict) -> list[dict]:
    """Keys whose value differs between two resolved configs: [{key, parent, current}]."""
    if parent is None:
        return []
    a, b = flatten(parent), flatten(current)
    rows = []
    for key in sorted(set(a) | set(b)):
        if key.startswith(_IGNORED_PREFIXES):
            continue
        if a.get(key, "<absent>") != b.get(key, "<absent>"):
            rows.append({"key": key, "parent": a.get(key, "<absent>"), "current": b.get(key, "<absent>")})
    return rows


def metric_changes(parent: dict | None, current: dict) -> list[dict]:
    """Every model metric present in the current run, with the parent's value and a flag."""
    rows = []
    for model, values in current.items():
        if not isinstance(values, dict):
            continue
        for name, value in values.items():
            if name not in HIGHER_IS_BETTER or value is None:
                continue
            old = ((parent or {}).get(model) or {}).get(name)
            row = {"metric": f"{model}.{name}", "parent": old, "current": value, "delta": None, "relative": None,
                   "flag": "new"}
            if old is not None:
                delta = float(value) - float(old)
                row["delta"] = delta
                row["relative"] = delta / abs(float(old)) if old else (0.0 if delta == 0 else math.inf)
                good = delta > 0 if HIGHER_IS_BETTER[name] else delta < 0
                row["flag"] = "same" if abs(delta) < 1e-9 else ("better" if good else "worse")
            rows.append(row)
    return rows


def check_gate(gate_cfg, parent: dict | None, current: dict) -> dict:
    """{"status": PASSED|FAILED|SKIPPED, "reason", "rules": [...]} for the configured rules."""
    if not bool(gate_cfg.get("enabled", True)):
        return {"status": "SKIPPED", "reason": "the release gate is disabled (eval.gate.enabled=false)", "rules": []}
    if parent is None:
        return {"status": "PASSED", "reason": "no parent run to compare with (first published run)", "rules": []}
    rules = []
    for rule in gate_cfg.get("rules") or []:
        metric = str(rule["metric"])
        model, _, name = metric.partition(".")
        if name not in HIGHER_IS_BETTER:
            raise PipelineError(
                f"eval.gate rule metric {metric!r}: expected <model>.<{'|'.join(HIGHER_IS_BETTER)}>"
            )
        limit = float(rule.get("max_regression", 0.0))
        old = ((parent.get("metrics") or {}).get(model) or {}).get(name)
        new = (current.get(model) or {}).get(name)
        row = {"metric": metric, "parent": old, "current": new, "max_regression": limit, "regression": None}
        if old is None or new is None:
            row["status"] = "not compared"
            row["why"] = f"{'parent' if old is None else 'this run'} has no {metric}"
        else:
            worse_by = (float(old) - float(new)) if HIGHER_IS_BETTER[name] else (float(new) - float(old))
            regression = worse_by / abs(float(old)) if old else (0.0 if worse_by <= 0 else math.inf)
            row["regression"] = regression
            row["status"] = "FAILED" if regression > limit else "passed"
            row["why"] = f"{'worse' if worse_by > 0 else 'not worse'} by {abs(regression):.2%} (limit {limit:.2%})"
        rules.append(row)
    failed = [r for r in rules if r["status"] == "FAILED"]
    if failed:
        reason = "; ".join(f"{r['metric']} regressed {r['regression']:.2%} > {r['max_regression']:.2%} "
                           f"({r['parent']:.4f} -> {r['current']:.4f})" for r in failed)
        return {"status": "FAILED", "reason": reason, "rules": rules}
    return {"status": "PASSED", "reason": f"{len(rules)} rule(s) checked against the parent run", "rules": rules}


def compare(ec, history_dir: Path, resolved: dict, results: dict) -> dict:
    """This run against its parent: {"parent": the parent record or None, "gate": the verdict
    of ``eval.gate``, "changes": metric_changes, "config_diff": config_diff}."""
    parent = load_parent(ec.get("parent"), history_dir)
    return {
        "parent": parent,
        "gate": check_gate(ec.get("gate") or {}, parent, results),
        "changes": metric_changes((parent or {}).get("metrics"), results),
        "config_diff": config_diff((parent or {}).get("config"), resolved),
    }


def enforce_gate(gate: dict, gate_cfg, parent: dict | None, report: Path) -> None:
    """Raise when the gate FAILED and ``eval.gate.fail`` (default true) says to stop."""
    if gate["status"] == "FAILED" and bool((gate_cfg or {}).get("fail", True)):
        raise PipelineError(
            f"release gate FAILED against the parent run ({parent['source']}): {gate['reason']}. "
            f"The report at {report} says why; to publish anyway, rerun with eval.gate.enabled=false "
            f"or eval.gate.fail=false"
        )


# ------------------------------------------------------------------ history


def history_dir_for(ec, root: Path) -> Path:
    """``eval.history_dir``, by default <paths.root>/runs/eval."""
    return Path(str(ec.get("history_dir") or Path(root) / "runs" / "eval"))


def _records(history_dir: Path) -> list[Path]:
    return sorted(Path(history_dir).glob("run-*.json"))


def load_parent(explicit, history_dir: Path) -> dict | None:
    """The parent record ({metrics, config, ...}) or None when there is none yet."""
    if explicit:
        path = Path(str(explicit))
        if path.is_dir():  # a reports directory: metrics.json + _summary.json
            metrics, summary = path / "metrics.json", path / "_summary.json"
            if not metrics.is_file():
                raise PipelineError(f"eval.parent={path} has no metrics.json: point it at a reports directory")
            cfg = json.loads(summary.read_text()).get("config") if summary.is_file() else None
            return {"source": str(path), "metrics": json.loads(metrics.read_text()), "config": cfg}
        if not path.is_file():
            raise PipelineError(f"eval.parent={path} does not exist")
        try:
            return {"source": str(path), **json.loads(path.read_text())}
        except json.JSONDecodeError as e:
            raise PipelineError(f"eval.parent={path} is not a JSON history record: {e}") from e
    for path in reversed(_records(history_dir)):
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue  # a damaged record is not a parent; the next older one is
        if record.get("gate", {}).get("status") in ("PASSED", "SKIPPED"):
            return {"source": str(path), **record}
    return None


def append_history(history_dir: Path, record: dict) -> Path:
    """Write the next ``run-NNNNNN.json`` atomically; returns its path."""
    history_dir = Path(history_dir)
    history_dir.mkdir(parents=True, exist_ok=True)
    existing = _records(history_dir)
    n = int(existing[-1].stem.split("-")[1]) + 1 if existing else 1
    record = {"run": n, "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), **record}
    path = history_dir / f"run-{n:06d}.json"
    while path.exists():  # a concurrent writer took n
        n += 1
        path = history_dir / f"run-{n:06d}.json"
    record["run"] = n
    write_json(path, record)
    return path
