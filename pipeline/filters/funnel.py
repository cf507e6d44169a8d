"""The clean funnel: documents and bytes in, kept, and rejected per step and reason.

Every input document ends up kept or rejected, so ``in == kept + rejected`` holds in
documents and in input bytes (:func:`check_funnel`); an incremental output's funnel is the
sum of its runs' (:func:`merge_funnels`).
"""

from __future__ import annotations

from collections import Counter


class Tally:
    """Rejections counted by reason (documents, input bytes) and by step and reason."""

    def __init__(self) -> None:
        self.rejected: Counter[str] = Counter()
        self.rejected_bytes: Counter[str] = Counter()
        self.by_step: dict[str, Counter[str]] = {}

    def reject(self, step: str, reason: str, nbytes: int) -> None:
        self.rejected[reason] += 1
        self.rejected_bytes[reason] += nbytes
        self.by_step.setdefault(step, Counter())[reason] += 1

    def update(self, counts: dict) -> None:
        """Add what another tally reported (:meth:`counts`, e.g. a worker's)."""
        self.rejected.update(counts["rejected"])
        self.rejected_bytes.update(counts["rejected_bytes"])
        for step, c in counts["by_step"].items():
            self.by_step.setdefault(step, Counter()).update(c)

    def counts(self) -> dict:
        return {
            "rejected": dict(self.rejected),
            "rejected_bytes": dict(self.rejected_bytes),
            "by_step": {k: dict(v) for k, v in self.by_step.items()},
        }


def build_funnel(n_in: int, bytes_in: int, kept: int, bytes_kept_in: int, bytes_out: int, tally: Tally,
                 steps: list[dict]) -> dict:  # fmt: skip
    """The funnel of one run; ``steps`` are ``{"step", "in", "out"}`` in the order they ran."""
    return {
        "in": n_in,
        "kept": kept,
        "rejected": dict(sorted(tally.rejected.items())),
        "bytes_in": bytes_in,
        "bytes_kept_in": bytes_kept_in,
        "bytes_out": bytes_out,
        "rejected_bytes": dict(sorted(tally.rejected_bytes.items())),
        "rejected_by_step": {k: dict(sorted(v.items())) for k, v in sorted(tally.by_step.items())},
        "steps": steps,
    }


def check_funnel(f: dict) -> None:
    """in == kept + rejected, in documents and in input bytes; a stage that loses a document fails."""
    if f["in"] != f["kept"] + sum(f["rejected"].values()):
        raise AssertionError(f"funnel does not add up: in={f['in']} kept={f['kept']} rejected={f['rejected']}")
    if f["bytes_in"] != f["bytes_kept_in"] + sum(f["rejected_bytes"].values()):
        raise AssertionError(f"funnel bytes do not add up: {f['bytes_in']} != {f['bytes_kept_in']} + rejected")


def merge_funnels(a: dict, b: dict) -> dict:
    """Cumulative funnel of an incremental output: counts add up per key."""

    def add(x: dict, y: dict) -> dict:
        return dict(sorted((Counter(x) + Counter(y)).items()))

    steps = {s["step"]: dict(s) for s in a.get("steps", [])}
    for s in b["steps"]:
        t = steps.setdefault(s["step"], {"step": s["step"], "in": 0, "out": 0})
        t["in"] += s["in"]
        t["out"] += s["out"]
    return {
        "in": a["in"] + b["in"],
        "kept": a["kept"] + b["kept"],
        "rejected": add(a["rejected"], b["rejected"]),
        "bytes_in": a["bytes_in"] + b["bytes_in"],
        "bytes_kept_in": a["bytes_kept_in"] + b["bytes_kept_in"],
        "bytes_out": a["bytes_out"] + b["bytes_out"],
        "rejected_bytes": add(a["rejected_bytes"], b["rejected_bytes"]),
        "rejected_by_step": {
            k: add(a["rejected_by_step"].get(k, {}), b["rejected_by_step"].get(k, {}))
            for k in sorted(set(a["rejected_by_step"]) | set(b["rejected_by_step"]))
        },
        "steps": list(steps.values()),
    }


def step_rows(names: list[str], results: list[dict]) -> list[dict]:
    """``{"step", "in", "out"}`` per step, summed over the workers' ``steps`` counts."""
    return [
        {"step": name, "in": sum(r["steps"][j][1] for r in results), "out": sum(r["steps"][j][2] for r in results)}
        for j, name in enumerate(names)
    ]
