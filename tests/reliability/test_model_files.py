"""Model files never run code: checkpoints load with `weights_only=True`, exports are
safetensors (tests/test_export.py checks no pickle file is written), and a pickle put where
an input is read is refused with a message.

Every hostile file here is a real pickle whose `__reduce__` would create a marker file;
the marker must never appear.
"""

from __future__ import annotations

import ast
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.core.errors import PipelineError
from tests.conftest import ROOT


class Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def evil_checkpoint(path: Path, marker: Path) -> Path:
    """A file torch.load would accept with weights_only=False: a checkpoint dict holding an
    object that runs a shell command when unpickled."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {}, "global_step": 5, "hyper_parameters": {"fingerprint": "x"}, "payload": Evil(marker)},
               path)
    return path


def _torch_load_calls() -> list[tuple[str, int, str]]:
    """(file, line, weights_only value) of every torch.load call in the package and flows."""
    calls = []
    for base in ("pipeline", "flows"):
        for path in sorted((ROOT / base).rglob("*.py")):
            tree = ast.parse(path.read_text())
            for node in ast.walk(tree):
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load"
                        and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"):
                    kw = {k.arg: k.value for k in node.keywords}
                    value = ast.unparse(kw["weights_only"]) if "weights_only" in kw else "<default>"
                    calls.append((str(path.relative_to(ROOT)), node.lineno, value))
    return calls


def test_some_torch_load_calls_exist_and_the_loader_is_weights_only():
    calls = _torch_load_calls()
    assert ("pipeline/model/runs.py", next(c[1] for c in calls if c[0] == "pipeline/model/runs.py"), "True") \
        in calls


def test_every_torch_load_is_weights_only():
    bad = [c for c in _torch_load_calls() if c[2] != "True"]
    assert not bad, f"torch.load without weights_only=True: {bad}"


def test_a_malicious_checkpoint_is_refused_when_loading_a_model(tmp_path):
    from pipeline.model.runs import load_trained

    marker = tmp_path / "pwned"
    run_dir = tmp_path / "models" / "pretrain"
    evil_checkpoint(run_dir / "checkpoints" / "last.ckpt", marker)
    with pytest.raises(PipelineError, match=r"last\.ckpt is not a loadable checkpoint .*Weights only load failed"):
        load_trained(run_dir)
    assert not marker.exists()


def test_a_malicious_checkpoint_is_refused_by_the_cli(tmp_path):
    """`generate` and `export` read models/<stage>/checkpoints/last.ckpt: one line, exit 2."""
    marker = tmp_path / "pwned"
    evil_checkpoint(tmp_path / "models" / "pretrain" / "checkpoints" / "last.ckpt", marker)
    (tmp_path / "models" / "pretrain" / "_summary.json").write_text("{}")
    for args in (["generate", "--prompt", "x", "--model", "pretrain"], ["export", "--model", "pretrain"]):
        proc = subprocess.run([sys.executable, "-m", "pipeline", *args, f"paths.root={tmp_path}"], cwd=ROOT,
                              capture_output=True, text=True, timeout=120, check=False)
        assert proc.returncode == 2, (args, proc.stderr[-3000:])
        assert "last.ckpt is not a loadable checkpoint" in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    assert not marker.exists()


def test_resume_never_unpickles_a_planted_checkpoint(tmp_path):
    """A pickle planted where resume looks (the run directory, and the published output) is
    never executed: candidates load with weights_only=True and a failure just skips them."""
    from pipeline.training.checkpoints import find_resume, run_dir

    marker = tmp_path / "pwned"
    out = tmp_path / "models" / "pretrain"
    run = run_dir(tmp_path / "runs", "pretrain", "x" * 64, out)
    evil_checkpoint(run / "checkpoints" / "step-00000050.ckpt", marker)
    evil_checkpoint(out / "checkpoints" / "last.ckpt", marker)
    assert find_resume(run, out, "x" * 64, 100) is None
    assert not marker.exists()


def test_a_pickle_as_fine_tuning_data_runs_nothing(tmp_path):
    from pipeline.training.sft_data import DataReport, load_custom

    marker = tmp_path / "pwned"
    for name in ("data.pkl", "data.jsonl", "data.json"):
        path = tmp_path / name
        path.write_bytes(pickle.dumps(Evil(marker)))
        report = DataReport()
        try:
            pairs = load_custom(path, report=report)
        except PipelineError as e:  # a clear error naming the file is fine too
            assert str(path) in str(e)
        else:
            assert pairs == [] and report.records >= 1
    assert not marker.exists()


def test_a_pickle_as_fine_tuning_data_is_refused_by_name(tmp_path):
    from pipeline.training.sft_data import load_custom

    path = tmp_path / "data.pkl"
    path.write_bytes(pickle.dumps({"instruction": "q", "output": "a"}))
    with pytest.raises(PipelineError, match="pickle"):
        load_custom(path)
