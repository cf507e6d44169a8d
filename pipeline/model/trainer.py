"""Shared training plumbing for the pretrain and finetune stages.

One `fit()` builds the Lightning Trainer from a stage's config (accelerator, devices,
strategy, precision, max_steps, max_time come straight from YAML, so a GPU or DDP run is
a config change), trains with a `CSVLogger` and a `ModelCheckpoint`, and leaves the run
directory in the documented layout. `find_resume()` finds a checkpoint of an interrupted
run with the same fingerprint (output dir or a leftover temp dir), so a retried stage
continues where it stopped instead of starting over.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger

from pipeline.artifacts import atomic_dir, write_json
from pipeline.model import CKPT, META
from pipeline.model.lightning import Throughput

METRIC_COLUMNS = ["step", "train_loss", "val_loss", "lr"]  # Lightning's `epoch` is dropped: training is step-based


def is_rank_zero() -> bool:
    """Whether this process is global rank 0, before any Trainer exists (launchers set these)."""
    for var in ("RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var]) == 0
    return int(os.environ.get("LOCAL_RANK", 0) or 0) == 0 and int(os.environ.get("NODE_RANK", 0) or 0) == 0


@contextlib.contextmanager
def output_dir(out: Path) -> Iterator[Path]:
    """Rank 0 writes `out` atomically; other DDP ranks get a throwaway dir (they write nothing)."""
    if is_rank_zero():
        with atomic_dir(out) as work:
            yield work
    else:
        with tempfile.TemporaryDirectory(prefix=f"{Path(out).name}-rank") as work:
            yield Path(work)


def quiet_lightning() -> None:
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for pattern in (
        ".*does not have many workers.*",
        ".*smaller than the logging interval.*",
        ".*Experiment logs directory.*",
        ".*`training_step` returned `None`.*",
        ".*Checkpoint directory .* exists and is not empty.*",
        ".*You called `self.log\\(.*",
        ".*LeafSpec.*",
        ".*your dataloader is not resumable.*",  # it is: batches are indexed by global_step
        ".*The dirpath has changed from.*",  # resuming from another (temp) run directory
    ):
        warnings.filterwarnings("ignore", message=pattern)


def setup_torch(tc) -> None:
    threads = int(tc.get("num_threads", 0) or 0)
    if threads > 0:
        torch.set_num_threads(threads)
    torch.set_float32_matmul_precision("high")  # TF32 on Ampere+ GPUs; no effect on CPU


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def find_resume(out: Path, fingerprint: str, max_steps: int) -> dict | None:
    """The most advanced `last.ckpt` of an unfinished run with this fingerprint, if any.

    Looks in the output dir and in temp dirs left by killed runs (`<out>.tmp-<pid>`, pid dead).
    """
    out = Path(out)
    candidates = [out]
    for tmp in sorted(out.parent.glob(f"{out.name}.tmp-*")):
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            candidates.append(tmp)
    best = None
    for run_dir in candidates:
        path = run_dir / CKPT
        if not path.is_file():
            continue
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        except Exception:  # a checkpoint cut off mid-write is simply not a candidate
            continue
        hp = ckpt.get("hyper_parameters", {})
        step = int(ckpt.get("global_step", 0))
        if hp.get("fingerprint") != fingerprint or not 0 < step < max_steps:
            continue
        if best is None or step > best["step"]:
            best = {"ckpt": path, "step": step, "run_dir": run_dir}
    return best


def cleanup_stale(out: Path) -> None:
    """Remove temp dirs of dead runs of this stage (after a successful run superseded them)."""
    out = Path(out)
    for tmp in out.parent.glob(f"{out.name}.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _read_csv(path: Path) -> list[dict]:
    if not Path(path).is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_metrics(rows: list[dict], path: Path) -> None:
    rows = [{k: v for k, v in r.items() if k != "epoch"} for r in rows]
    keys = {k for r in rows for k in r}
    cols = [c for c in METRIC_COLUMNS if c in keys or c in ("step", "train_loss", "val_loss")]
    cols += sorted(keys - set(cols))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, restval="")
        w.writeheader()
        w.writerows(rows)


def read_metrics(path: Path) -> list[dict]:
    """metrics.csv rows with numbers parsed (empty cells dropped)."""
    out = []
    for r in _read_csv(path):
        row = {}
        for k, v in r.items():
            if v not in ("", None):
                try:
                    row[k] = int(v) if k in ("step", "epoch") else float(v)
                except ValueError:
                    row[k] = v
        out.append(row)
    return out


def _logged_rows(path: Path) -> list[dict]:
    """Lightning's CSV rows with `step` = optimizer steps completed when the value was measured
    (train_loss at step s is the loss of the batch that update s+1 then used; val_loss at step s
    is measured after s updates)."""
    rows = read_metrics(path)
    for r in rows:
        if "val_loss" in r and "train_loss" not in r:
            r["step"] = r.get("step", -1) + 1
    return rows


def _previous_rows(resume: dict | None) -> list[dict]:
    """The interrupted run's history up to the step this run took over from."""
    if not resume:
        return []
    run_dir, step = Path(resume["run_dir"]), resume["step"]
    if (run_dir / "metrics.csv").is_file():  # a finished (e.g. time-capped) output
        rows = read_metrics(run_dir / "metrics.csv")
    else:  # a killed run's temp dir: Lightning's log, flushed at every checkpoint
        rows = _logged_rows(run_dir / "logs" / "metrics.csv")
    return [r for r in rows if r.get("step", 0) < step or ("val_loss" in r and r.get("step", 0) == step)]


def fit(
    module: L.LightningModule,
    datamodule,
    work: Path,
    tc,
    *,
    max_steps: int,
    resume: dict | None = None,
    callbacks: tuple = (),
) -> dict:
    """Train into `work` (checkpoints/last.ckpt, metrics.csv); returns what the summary reports."""
    quiet_lightning()
    work = Path(work)
    val_every = max(1, int(tc.get("val_every", 100)))
    log_every = max(1, int(tc.get("log_every", 10)))
    ckpt_every = int(tc.get("ckpt_every", 0) or val_every)
    has_val = datamodule.has_val()
    throughput = Throughput()
    cbs = [
        ModelCheckpoint(
            dirpath=work / "checkpoints",
            save_top_k=0,
            save_last=True,
            every_n_train_steps=ckpt_every,
            save_on_train_epoch_end=False,
            enable_version_counter=False,
        ),
        throughput,
        *callbacks,
    ]
    progress = bool(tc.get("progress_bar", True))
    if progress:
        cbs.append(TQDMProgressBar(refresh_rate=log_every))
    max_time = tc.get("max_time", None)
    trainer = L.Trainer(
        accelerator=tc.get("accelerator", "cpu"),
        devices=tc.get("devices", 1),
        strategy=tc.get("strategy", "auto"),
        precision=tc.get("precision", "32-true"),
        num_nodes=int(tc.get("num_nodes", 1)),
        max_steps=int(max_steps),
        max_epochs=-1,
        max_time=str(max_time) if max_time else None,
        val_check_interval=val_every,
        check_val_every_n_epoch=None,
        limit_val_batches=1.0 if has_val else 0,
        num_sanity_val_steps=0,
        gradient_clip_val=float(tc.get("grad_clip", 0.0) or 0.0) or None,
        log_every_n_steps=log_every,
        logger=CSVLogger(work / "logs", name="", version="", flush_logs_every_n_steps=ckpt_every),
        callbacks=cbs,
        enable_checkpointing=True,
        enable_progress_bar=progress,
        enable_model_summary=False,
        default_root_dir=work,
        use_distributed_sampler=False,
        benchmark=False,
    )
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(resume["ckpt"]) if resume else None)

    step = int(trainer.global_step)
    # validation ran at every multiple of val_every; a run that stopped elsewhere (max_time,
    # max_steps) gets one more pass, decided the same way on every rank
    if has_val and step > 0 and step % val_every != 0:
        trainer.validate(module, datamodule=datamodule, verbose=False)  # the final state's val loss
    trainer.logger.save()
    rows = _logged_rows(work / "logs" / "metrics.csv")
    for r in rows:  # `validate` logs one past the last step
        if "val_loss" in r and r["step"] > step:
            r["step"] = step
    trainer.save_checkpoint(work / CKPT)  # the final state, whatever step the run stopped at

    if trainer.is_global_zero:
        rows = _previous_rows(resume) + rows
        write_metrics(rows, work / "metrics.csv")
        shutil.rmtree(work / "logs", ignore_errors=True)

    vals = [r["val_loss"] for r in rows if "val_loss" in r]
    trains = [r["train_loss"] for r in rows if "train_loss" in r]
    world = int(trainer.world_size)
    return {
        "steps": step,
        "steps_this_run": throughput.steps,
        "train_seconds": round(throughput.train_seconds, 3),
        "world_size": world,
        "best_val_loss": min(vals) if vals else None,
        "final_val_loss": vals[-1] if vals else None,
        "final_train_loss": sum(trains[-5:]) / len(trains[-5:]) if trains else None,
        "resumed_from_step": resume["step"] if resume else None,
        "stopped_early": step < int(max_steps),
    }


def write_meta(work: Path, model, stage: str, steps: int, **extra) -> dict:
    cfg = model.cfg
    meta = {
        "stage": stage,
        "model": cfg.to_dict(),
        "vocab_size": cfg.vocab_size,
        "block_size": cfg.block_size,
        "params": model.num_params(),
        "steps": steps,
        **extra,
    }
    write_json(Path(work) / META, meta)
    return meta
