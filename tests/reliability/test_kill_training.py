"""Training stopped the way clusters stop it, through the CLI with real signals: SIGKILL,
SIGTERM (kill, scancel, a Kubernetes eviction), SIGINT (Ctrl-C), SIGUSR1 (SLURM's warning
before the time limit), a crash in a step and a failing export. Every time the output
directory never appears half-written, the run directory keeps its checkpoints, the exit
code says what happened, and the same command resumes to the weights of an uninterrupted run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch

from pipeline.core.config import load
from pipeline.core.errors import TrainingFailed
from pipeline.model.runs import load_trained
from pipeline.stages import eval as evaluate
from pipeline.stages import finetune, pretrain
from tests.conftest import ROOT
from tests.fixtures import make_project, pipeline_processes
from tests.reliability.test_kill import start_and_kill

pytestmark = pytest.mark.slow

# long enough that a signal sent after the first checkpoint always lands before the end
LONG = ["pretrain.max_steps=300", "pretrain.val_every=50", "pretrain.ckpt_every=10",
        "finetune.max_steps=150", "finetune.val_every=50", "finetune.ckpt_every=10"]


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("proj")
    return root, [*make_project(root), *LONG]


@pytest.fixture(scope="module")
def reference(project):
    """The uninterrupted runs every stopped run must end equal to."""
    root, overrides = project
    ref = [*overrides, f"paths.pretrain={root}/models/pre_ref", f"paths.finetune={root}/models/ft_ref"]
    pretrain.run(load(ref))
    finetune.run(load(ref))
    return root / "models" / "pre_ref", root / "models" / "ft_ref"


def steps_on_disk(root: Path, stage: str, out_name: str) -> list[int]:
    """Steps of the valid checkpoints in the run directory of `out_name` (read as resume reads them)."""
    steps = []
    for path in sorted((root / "runs" / stage).glob(f"{out_name}-*/checkpoints/step-*.ckpt")):
        try:
            steps.append(int(torch.load(path, map_location="cpu", weights_only=True)["global_step"]))
        except Exception:  # noqa: BLE001 - mid-write: not a checkpoint yet
            pass
    return sorted(steps)


def run_until(args: list[str], root: Path, stage: str, out_name: str, min_step: int, env: dict | None = None):
    """`python -m pipeline <args>` started and left running until a checkpoint of step >= min_step exists."""
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env={**os.environ, **(env or {})})
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        if any(s >= min_step for s in steps_on_disk(root, stage, out_name)):
            return proc
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"{stage} never checkpointed step {min_step}: {proc.stderr.read().decode()[-2000:]}")


def stop(proc: subprocess.Popen, sig: int) -> tuple[int, str]:
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err.decode()


def same_weights(a: Path, b: Path) -> None:
    ma, _ = load_trained(a)
    mb, _ = load_trained(b)
    for (name, p), q in zip(ma.state_dict().items(), mb.state_dict().values(), strict=True):
        assert torch.equal(p, q), name


def outputs(root: Path, name: str) -> list[str]:
    return [f"paths.pretrain={root}/models/pre_{name}", f"paths.finetune={root}/models/ft_{name}"]


def test_sigkill_mid_training_resumes_to_the_same_weights(project, reference):
    root, overrides = project
    pre_ref, ft_ref = reference
    args = [*overrides, *outputs(root, "kill")]
    proc = run_until(["pretrain", *args], root, "pretrain", "pre_kill", 10)
    rc, err = stop(proc, signal.SIGKILL)
    assert rc == -signal.SIGKILL, err[-2000:]
    assert not (root / "models" / "pre_kill").exists()
    summary = pretrain.run(load(args))
    assert summary["resumed_from_step"] >= 10 and summary["steps"] == 300
    same_weights(pre_ref, root / "models" / "pre_kill")
    assert not list((root / "runs" / "pretrain").glob("pre_kill-*")), "published: the run directory is gone"

    proc = run_until(["finetune", *args], root, "finetune", "ft_kill", 10)
    assert stop(proc, signal.SIGKILL)[0] == -signal.SIGKILL
    summary = finetune.run(load(args))
    assert summary["resumed_from_step"] >= 10
    same_weights(ft_ref, root / "models" / "ft_kill")

    # eval: killed midway, no report and no history record; the rerun's metrics equal the reference's
    light = ["eval.max_val_tokens=4000", "eval.max_heldout_pairs=2", "eval.max_new_tokens=4", "eval.lstm.steps=10",
             "eval.lstm.hidden=32", "eval.gate.enabled=false"]
    ref = [*overrides, f"paths.pretrain={pre_ref}", f"paths.finetune={ft_ref}"]
    t0 = time.monotonic()
    evaluate.run(load([*ref, *light, f"paths.reports={root}/reports_a"]))
    took = time.monotonic() - t0
    history = sorted((root / "runs" / "eval").glob("*.json"))
    eargs = [*ref, *light, f"paths.reports={root}/reports_b"]
    out = root / "reports_b"
    start_and_kill("eval", eargs, root, out, after=took / 2)
    assert not out.exists() and sorted((root / "runs" / "eval").glob("*.json")) == history
    evaluate.run(load(eargs))
    assert (out / "metrics.json").read_text() == (root / "reports_a" / "metrics.json").read_text()


@pytest.mark.parametrize("stage,sig", [("pretrain", signal.SIGTERM), ("pretrain", signal.SIGINT),
                                       ("finetune", signal.SIGTERM), ("finetune", signal.SIGINT)])
def test_a_signal_checkpoints_the_current_step_exits_non_zero_and_the_rerun_resumes(project, reference, stage, sig):
    root, overrides = project
    name = f"{signal.Signals(sig).name.lower()}_{stage}"
    args = [*overrides, *outputs(root, name)]
    if stage == "finetune":
        args = [*overrides, f"paths.pretrain={reference[0]}", f"paths.finetune={root}/models/ft_{name}"]
    out_name = f"pre_{name}" if stage == "pretrain" else f"ft_{name}"
    proc = run_until([stage, *args], root, stage, out_name, 10)
    rc, err = stop(proc, sig)
    assert rc == 128 + sig, err[-2000:]
    stopped_at = max(steps_on_disk(root, stage, out_name))
    assert f"stopped by {signal.Signals(sig).name} at step {stopped_at}" in err
    assert "Rerun the same command to resume: python -m pipeline " + stage in err
    assert not (root / "models" / out_name).exists(), "no half-written output"
    summary = (pretrain if stage == "pretrain" else finetune).run(load(args))
    assert summary["resumed_from_step"] == stopped_at
    same_weights(reference[0] if stage == "pretrain" else reference[1], root / "models" / out_name)


def test_a_crash_in_a_step_keeps_the_checkpoint_and_resumes(project, reference):
    root, overrides = project
    args = [*overrides, f"paths.pretrain={reference[0]}", f"paths.finetune={root}/models/ft_crash"]

    class Crash(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 37:
                raise RuntimeError("CUDA out of memory (simulated)")

    with pytest.raises(TrainingFailed, match=r"finetune failed during training: RuntimeError: CUDA out of memory "
                                             r"\(simulated\)\. Checkpoints are kept in .*resume with: python -m"):
        finetune.run(load(args), callbacks=[Crash()])
    assert max(steps_on_disk(root, "finetune", "ft_crash")) == 37
    summary = finetune.run(load(args))
    assert summary["resumed_from_step"] == 37
    same_weights(reference[1], root / "models" / "ft_crash")


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_a_failing_export_keeps_the_trained_run_and_the_rerun_only_publishes(project, reference, stage, monkeypatch):
    import pipeline.training.runs as runs

    root, overrides = project
    args = [*overrides, f"paths.pretrain={root}/models/pre_export", f"paths.finetune={root}/models/ft_export"]
    if stage == "finetune":
        args[-2] = f"paths.pretrain={reference[0]}"
    real, calls = runs.export_hf, []

    def broken(*a, **k):
        calls.append(1)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(runs, "export_hf", broken)
    mod = pretrain if stage == "pretrain" else finetune
    with pytest.raises(TrainingFailed, match=rf"{stage} trained to step \d+ but publishing .* failed: OSError"):
        mod.run(load(args))
    out_name = "pre_export" if stage == "pretrain" else "ft_export"
    assert calls and not (root / "models" / out_name).exists()
    monkeypatch.setattr(runs, "export_hf", real)
    summary = mod.run(load(args))
    assert summary["resumed_from_step"] == summary["steps"] and summary["steps_this_run"] == 0
    same_weights(reference[0] if stage == "pretrain" else reference[1], root / "models" / out_name)


def test_checkpoints_by_wall_clock_keep_the_newest_k(project):
    root, overrides = project
    args = [*overrides, f"paths.pretrain={root}/models/pre_clock", "pretrain.ckpt_every=100000",
            "pretrain.ckpt_every_minutes=0.00001", "pretrain.keep_checkpoints=2"]
    seen = {}

    class Look(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 15:
                seen["steps"] = steps_on_disk(root, "pretrain", "pre_clock")
                raise RuntimeError("enough")

    with pytest.raises(TrainingFailed):
        pretrain.run(load(args), callbacks=[Look()])
    assert seen["steps"] == [14, 15], "a checkpoint every step by the clock, the newest two kept"


def test_slurm_warning_signal_checkpoints_and_requeues(project, tmp_path):
    root, overrides = project
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "scontrol.log"
    (bin_dir / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\n")
    (bin_dir / "scontrol").chmod(0o755)
    args = [*overrides, *outputs(root, "slurm")]
    env = {"SLURM_JOB_ID": "4242", "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    proc = run_until(["pretrain", *args], root, "pretrain", "pre_slurm", 10, env=env)
    rc, err = stop(proc, signal.SIGUSR1)
    assert rc == 128 + signal.SIGUSR1, err[-2000:]
    assert calls.read_text().split() == ["requeue", "4242"]
    assert "stopped by SIGUSR1" in err and max(steps_on_disk(root, "pretrain", "pre_slurm")) > 10


def test_two_process_ddp_stopped_with_sigterm_resumes_on_both_ranks_from_the_same_step(tmp_path):
    import json

    overrides = [*make_project(tmp_path), "hardware.strategy=ddp", "hardware.devices=2", "hardware.accelerator=cpu",
                 "pretrain.max_steps=200", "pretrain.val_every=50", "pretrain.ckpt_every=10"]
    ref = subprocess.run([sys.executable, "-m", "pipeline", "pretrain", *overrides, f"paths.pretrain={tmp_path}/ref"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr[-3000:]
    args = ["pretrain", *overrides, f"paths.pretrain={tmp_path}/stopped"]
    proc = run_until(args, tmp_path, "pretrain", "stopped", 10)
    rc, err = stop(proc, signal.SIGTERM)  # rank 0 only: rank 1 learns it at the next step
    assert rc == 143, err[-3000:]
    stopped_at = max(steps_on_disk(tmp_path, "pretrain", "stopped"))
    deadline = time.monotonic() + 60
    while pipeline_processes(tmp_path) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not pipeline_processes(tmp_path), "rank 1 exits too"
    again = subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=ROOT, capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    summary = json.loads((tmp_path / "stopped" / "_summary.json").read_text())
    reference = json.loads((tmp_path / "ref" / "_summary.json").read_text())
    assert summary["resumed_from_step"] == stopped_at and summary["world_size"] == 2
    got = [r["weights_sha256"] for r in summary["ranks"]]
    assert got[0] == got[1] == reference["ranks"][0]["weights_sha256"], "both ranks resumed from the same step"
    same_weights(tmp_path / "ref", tmp_path / "stopped")
