"""SIGKILL in the middle of pretraining and fine-tuning, through the CLI: the run's output
directory never appears half-written, and the rerun resumes from the last checkpoint the
killed process left in its temp dir and ends with the same weights as an uninterrupted run.

tests/test_pretrain.py::test_resume_after_interruption_is_exact checks the same exactness
with an in-process interruption; this is the real thing (kill -9 of `python -m pipeline`).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pipeline.stages import eval as evaluate, finetune, pretrain
from pipeline.core.config import load
from pipeline.model.runs import load_trained
from tests.conftest import ROOT
from tests.fixtures import make_project
from tests.reliability.test_kill import start_and_kill


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("proj")
    return root, make_project(root)


def kill_after_checkpoint(args: list[str], out: Path, min_step: int) -> None:
    """Run `python -m pipeline <args>` and SIGKILL it once its temp dir holds a
    last.ckpt of step >= min_step (read the way the resume logic reads it)."""
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    ckpt = out.with_name(f"{out.name}.tmp-{proc.pid}") / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 300
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if ckpt.is_file():
                try:
                    step = torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"]
                except Exception:  # noqa: BLE001 - mid-write: look again
                    step = -1
                if step >= min_step:
                    break
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"{args[0]} finished before it was killed: {err.decode()[-2000:]}"


def same_weights(a: Path, b: Path) -> None:
    ma, _ = load_trained(a)
    mb, _ = load_trained(b)
    for (name, p), q in zip(ma.state_dict().items(), mb.state_dict().values(), strict=True):
        assert torch.equal(p, q), name


@pytest.mark.slow
def test_sigkill_mid_training_resumes_to_the_same_weights(project):
    root, overrides = project
    steps = ["pretrain.ckpt_every=10", "finetune.ckpt_every=4"]
    ref = [*overrides, *steps, f"paths.pretrain={root}/models/pre_a", f"paths.finetune={root}/models/ft_a"]
    pretrain.run(load(ref))
    finetune.run(load(ref))

    args = [*overrides, *steps, f"paths.pretrain={root}/models/pre_b", f"paths.finetune={root}/models/ft_b"]
    out = root / "models" / "pre_b"
    kill_after_checkpoint(["pretrain", *args], out, min_step=10)
    assert not out.exists()
    summary = pretrain.run(load(args))
    assert summary["resumed_from_step"] >= 10 and summary["steps"] == 40
    same_weights(root / "models" / "pre_a", out)
    assert not list(out.parent.glob("pre_b.tmp-*"))

    out = root / "models" / "ft_b"
    kill_after_checkpoint(["finetune", *args], out, min_step=4)
    assert not out.exists()
    summary = finetune.run(load(args))
    assert summary.get("resumed_from_step") and summary["resumed_from_step"] >= 4
    same_weights(root / "models" / "ft_a", out)

    # eval: killed midway, no report and no history record; the rerun's metrics equal the reference's
    light = ["eval.max_val_tokens=4000", "eval.max_heldout_pairs=2", "eval.max_new_tokens=4", "eval.lstm.steps=10",
             "eval.lstm.hidden=32", "eval.gate.enabled=false"]
    t0 = time.monotonic()
    evaluate.run(load([*ref, *light, f"paths.reports={root}/reports_a"]))
    took = time.monotonic() - t0
    history = sorted((root / "runs" / "eval").glob("*.json"))
    eargs = [*args, *light, f"paths.reports={root}/reports_b"]
    out = root / "reports_b"
    start_and_kill("eval", eargs, root, out, after=took / 2)
    assert not out.exists() and sorted((root / "runs" / "eval").glob("*.json")) == history
    evaluate.run(load(eargs))
    assert (out / "metrics.json").read_text() == (root / "reports_a" / "metrics.json").read_text()
