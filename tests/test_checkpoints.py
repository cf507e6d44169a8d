"""Where a run resumes: the newest valid checkpoint of its run directory, chosen by rank 0."""

from __future__ import annotations

import threading
import time

import torch

from pipeline.training import checkpoints as ck


def _ckpt(path, step, fingerprint="fp"):
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"global_step": step, "hyper_parameters": {"fingerprint": fingerprint}}, path)
    return path


def test_find_resume_takes_the_newest_valid_checkpoint(tmp_path):
    out = tmp_path / "models" / "pretrain"
    run = ck.run_dir(tmp_path / "runs", "pretrain", "fp" * 32, out)
    assert run.parent == tmp_path / "runs" / "pretrain" and run.name.startswith("pretrain-")
    assert run != ck.run_dir(tmp_path / "runs", "pretrain", "fp" * 32, tmp_path / "models" / "other")
    _ckpt(run / "checkpoints" / "step-00000010.ckpt", 10)
    _ckpt(run / "checkpoints" / "step-00000020.ckpt", 20)
    (run / "checkpoints" / "step-00000030.ckpt").write_bytes(b"cut off mid-write")
    _ckpt(run / "checkpoints" / "step-00000040.ckpt", 40, fingerprint="another run")
    got = ck.find_resume(run, out, "fp", 100)
    assert got["step"] == 20 and got["ckpt"].name == "step-00000020.ckpt"
    # a finished training whose export failed resumes at max_steps (and only publishes)
    _ckpt(run / "checkpoints" / "step-00000100.ckpt", 100)
    assert ck.find_resume(run, out, "fp", 100)["step"] == 100


def test_a_published_run_that_stopped_early_is_continued(tmp_path):
    out = tmp_path / "out"
    _ckpt(out / "checkpoints" / "last.ckpt", 30)
    got = ck.find_resume(tmp_path / "runs" / "none", out, "fp", 100)
    assert got["step"] == 30 and got["run_dir"] == out
    _ckpt(out / "checkpoints" / "last.ckpt", 100)  # finished: nothing to continue
    assert ck.find_resume(tmp_path / "runs" / "none", out, "fp", 100) is None


def test_ranks_started_by_lightning_take_rank_zeros_choice(tmp_path, monkeypatch):
    path = _ckpt(tmp_path / "step-00000012.ckpt", 12)
    monkeypatch.setenv(ck.RESUME_ENV, str(path))
    got = ck.agreed_resume(None, tmp_path, rank_zero=False, world=2)
    assert got["ckpt"] == path and got["step"] == 12
    monkeypatch.setenv(ck.RESUME_ENV, "")
    assert ck.agreed_resume({"ckpt": path, "step": 12, "run_dir": tmp_path}, tmp_path, rank_zero=False, world=2) is None


def test_with_torchrun_other_ranks_wait_for_rank_zeros_note(tmp_path, monkeypatch):
    monkeypatch.delenv(ck.RESUME_ENV, raising=False)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job7")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    choice = {"ckpt": tmp_path / "step-00000008.ckpt", "step": 8, "run_dir": tmp_path}
    got = {}
    other = threading.Thread(target=lambda: got.update(r=ck.agreed_resume(None, tmp_path, False, 2, wait=30)))
    other.start()
    time.sleep(0.5)
    assert other.is_alive(), "rank 1 waits for rank 0"
    assert ck.agreed_resume(choice, tmp_path, True, 2) == choice
    other.join(10)
    assert got["r"] == choice
    assert (tmp_path / "resume-torchrun-job7-1.json").is_file()
