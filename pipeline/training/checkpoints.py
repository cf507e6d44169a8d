"""Durable training runs: a run directory that outlives failures, checkpoints by steps and by
wall clock, a clean stop on SIGTERM / SIGINT / SIGUSR1, and the choice of where to resume.

A training stage trains in `<paths.runs>/<stage>/<fingerprint>/`, never in its output's
temp dir, and publishes the finished run atomically; nothing deletes the run directory until
the output is published, so a killed, preempted or crashed run always leaves the newest
checkpoint for the rerun to continue from.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import lightning as L
import torch

from pipeline.core.errors import TrainingFailed, TrainingStopped

log = logging.getLogger(__name__)

CKPT_DIR = "checkpoints"
STEP_CKPT = "step-{:08d}.ckpt"
_STEP_RE = re.compile(r"^step-(\d+)\.ckpt$")
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
RESUME_ENV = "PIPELINE_RESUME_CKPT"  # rank 0's choice, inherited by the ranks Lightning launches


def run_dir(runs_root, stage: str, fingerprint: str, out: Path) -> Path:
    """Where the run that publishes `out` with this fingerprint trains: the same place on
    every attempt and every rank, and a different one for another output or config."""
    key = hashlib.sha256(f"{Path(out).resolve()}\0{fingerprint}".encode()).hexdigest()[:16]
    return Path(runs_root) / stage / f"{Path(out).name}-{key}"


def resume_command() -> str:
    """The command line that continues this run: the one that started it."""
    return shlex.join(["python", "-m", "pipeline", *sys.argv[1:]]) if sys.argv[1:] else "python -m pipeline <stage>"


def _step_files(ckpt_dir: Path) -> list[tuple[int, Path]]:
    found = [(int(m.group(1)), p) for p in Path(ckpt_dir).glob("step-*.ckpt") if (m := _STEP_RE.match(p.name))]
    return sorted(found, reverse=True)


def _readable(path: Path, fingerprint: str, max_steps: int, finished_ok: bool) -> int | None:
    """The checkpoint's step when it belongs to this run and loads; None otherwise (a file cut
    off mid-write is simply not a candidate)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return None
    step = int(ckpt.get("global_step", 0))
    if ckpt.get("hyper_parameters", {}).get("fingerprint") != fingerprint:
        return None
    if not (0 < step < max_steps or (finished_ok and step == max_steps)):
        return None
    return step


def find_resume(run: Path, out: Path, fingerprint: str, max_steps: int) -> dict | None:
    """The newest valid checkpoint of this run: in its run directory (an interrupted or
    failed attempt, also one whose export failed after training finished), else in the
    published output when that run stopped early (`max_time`)."""
    for step, path in _step_files(Path(run) / CKPT_DIR):
        if _readable(path, fingerprint, max_steps, finished_ok=True) is not None:
            return {"ckpt": path, "step": step, "run_dir": Path(run)}
    published = Path(out) / CKPT_DIR / "last.ckpt"
    if published.is_file():
        step = _readable(published, fingerprint, max_steps, finished_ok=False)
        if step is not None:
            return {"ckpt": published, "step": step, "run_dir": Path(out)}
    return None


def _launch_id() -> str | None:
    """Identifies one launch of an external launcher (torchrun, srun), the same on every rank."""
    if os.environ.get("TORCHELASTIC_RUN_ID"):
        return f"torchrun-{os.environ['TORCHELASTIC_RUN_ID']}-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    if os.environ.get("SLURM_JOB_ID") and os.environ.get("SLURM_STEP_ID"):
        return (f"slurm-{os.environ['SLURM_JOB_ID']}-{os.environ['SLURM_STEP_ID']}-"
                f"{os.environ.get('SLURM_RESTART_COUNT', '0')}")
    return None


def agreed_resume(choice: dict | None, run: Path, rank_zero: bool, world: int, wait: float = 600.0) -> dict | None:
    """Every rank resumes from rank 0's choice.

    Ranks that Lightning starts inherit it through the environment; with torchrun or srun,
    rank 0 writes it into the run directory (on the shared filesystem that checkpoints need
    anyway) under the launch's id, and the other ranks wait for it.
    """
    if RESUME_ENV in os.environ and not rank_zero:
        path = os.environ[RESUME_ENV]
        if not path:
            return None
        return {"ckpt": Path(path), "step": int(torch.load(path, map_location="cpu", weights_only=True,
                                                           mmap=True)["global_step"]), "run_dir": run}
    launch = _launch_id() if world > 1 else None
    if launch is None:
        return choice
    note = Path(run) / f"resume-{launch}.json"
    if rank_zero:
        note.parent.mkdir(parents=True, exist_ok=True)
        tmp = note.with_suffix(".tmp")
        tmp.write_text(json.dumps({"ckpt": str(choice["ckpt"]) if choice else None,
                                   "step": choice["step"] if choice else None,
                                   "run_dir": str(choice["run_dir"]) if choice else None}))
        os.replace(tmp, note)
        return choice
    deadline = time.monotonic() + wait
    while not note.is_file():
        if time.monotonic() > deadline:
            raise TrainingFailed(f"rank 0 did not say where to resume within {wait:.0f}s ({note} missing): "
                                 "the run directory must be on a filesystem every node sees")
        time.sleep(0.2)
    data = json.loads(note.read_text())
    return None if data["ckpt"] is None else {"ckpt": Path(data["ckpt"]), "step": int(data["step"]),
                                              "run_dir": Path(data["run_dir"])}


def link_or_copy(src: Path, dst: Path) -> None:
    """A hard link where the filesystem allows (checkpoints can be gigabytes), else a copy."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


class DurableCheckpoints(L.Callback):
    """`checkpoints/step-N.ckpt` every `every_steps` optimizer steps and every `every_minutes`
    of wall clock, keeping the newest `keep`; on SIGTERM, SIGINT or SIGUSR1 a checkpoint of
    the step in progress (at most one step late), then `TrainingStopped`. Every rank takes the
    same decision (the signal may reach one rank only; the clock is rank 0's)."""

    def __init__(self, dirpath: Path, every_steps: int, every_minutes: float, keep: int, stage: str,
                 slurm_requeue: bool = True) -> None:
        self.dirpath = Path(dirpath)
        self.every_steps = max(0, int(every_steps))
        self.every_seconds = max(0.0, float(every_minutes or 0) * 60)
        self.keep = max(1, int(keep))
        self.stage = stage
        self.slurm_requeue = slurm_requeue
        self.signum: int | None = None
        self.saved_step = -1
        self._seen_step = -1
        self._last_save = time.monotonic()
        self._previous: dict = {}

    # -- signals: installed once training starts, so they replace Lightning's SIGTERM handling
    def _handler(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now (the last checkpoint stays)
        log.warning("%s: received %s, saving a checkpoint at the end of this step", self.stage,
                    signal.Signals(signum).name)
        self.signum = signum

    def on_train_start(self, trainer, pl_module) -> None:
        self._seen_step = self.saved_step = int(trainer.global_step)
        self._last_save = time.monotonic()
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handler) for s in STOP_SIGNALS}

    def _restore(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous = {}

    def on_train_end(self, trainer, pl_module) -> None:
        self._restore()

    def _agree(self, trainer, signum: int, timed: bool) -> tuple[int, bool]:
        if trainer.world_size <= 1 or not torch.distributed.is_initialized():
            return signum, timed
        t = torch.tensor([signum, int(timed)], dtype=torch.int64, device=trainer.strategy.root_device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return int(t[0]), bool(t[1])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = int(trainer.global_step)
        if step == self._seen_step:  # inside a gradient accumulation: no optimizer step yet
            return
        self._seen_step = step
        timed = bool(self.every_seconds) and trainer.is_global_zero and \
            time.monotonic() - self._last_save >= self.every_seconds
        signum, timed = self._agree(trainer, self.signum or 0, timed)
        if signum or timed or (self.every_steps and step % self.every_steps == 0):
            self.save(trainer)
        if signum:
            self._restore()
            if signum == signal.SIGUSR1 and self.slurm_requeue:
                self._requeue(trainer)
            raise TrainingStopped(
                f"{self.stage} stopped by {signal.Signals(signum).name} at step {step}; checkpoint saved in "
                f"{self.dirpath}. Rerun the same command to resume: {resume_command()}", exit_code=128 + signum)

    def on_exception(self, trainer, pl_module, exception) -> None:
        """A crash (an error in a step, out of memory): on one process the state of the last
        finished step is saved too; with several, the newest periodic checkpoint stands (a
        collective save could hang on a rank that is already gone)."""
        self._restore()
        if isinstance(exception, (TrainingStopped, KeyboardInterrupt)):
            return
        if trainer.world_size == 1 and int(trainer.global_step) > self.saved_step:
            try:
                self.save(trainer)
            except Exception as e:  # the original error matters more
                log.warning("%s: could not checkpoint after the failure: %s", self.stage, e)

    def save(self, trainer) -> Path:
        step = int(trainer.global_step)
        path = self.dirpath / STEP_CKPT.format(step)
        trainer.save_checkpoint(path)
        self.saved_step, self._last_save = step, time.monotonic()
        if trainer.is_global_zero:
            for _, old in _step_files(self.dirpath)[self.keep:]:
                old.unlink(missing_ok=True)
        return path

    def _requeue(self, trainer) -> None:
        """SLURM's warning signal (`sbatch --signal=USR1@120`): put the job back in the queue."""
        job = os.environ.get("SLURM_ARRAY_JOB_ID") and \
            f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ.get('SLURM_ARRAY_TASK_ID', '')}"
        job = job or os.environ.get("SLURM_JOB_ID")
        if not job or not trainer.is_global_zero:
            return
        try:
            rc = subprocess.call(["scontrol", "requeue", job])
        except OSError as e:
            log.warning("%s: scontrol requeue %s failed: %s", self.stage, job, e)
            return
        log.warning("%s: requeued SLURM job %s (scontrol exit %d)", self.stage, job, rc)


def newest_checkpoint(run: Path) -> Path | None:
    files = _step_files(Path(run) / CKPT_DIR)
    return files[0][1] if files else None
