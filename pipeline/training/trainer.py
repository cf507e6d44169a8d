"""Shared training plumbing for the pretrain and finetune stages.

One `fit()` builds the Lightning Trainer from a stage's settings (accelerator, devices,
strategy, precision, max_steps, max_time come straight from YAML, so a GPU or DDP run is
a config change), trains in the run directory with a `CSVLogger` and durable checkpoints
(`pipeline.training.checkpoints`), and leaves it in the documented layout. TensorBoard is on
by default; `<stage>.loggers` adds MLflow or Weights & Biases (`tracking_loggers`).
"""

from __future__ import annotations

import csv
import importlib.util
import logging
import os
import shutil
import sys
import warnings
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from pipeline.core.artifacts import write_json
from pipeline.core.errors import PipelineError
from pipeline.model.gpt import GPTConfig
from pipeline.model.runs import META
from pipeline.training.checkpoints import RESUME_ENV, DurableCheckpoints
from pipeline.training.lightning import DataDigest, Throughput, flops_per_token

log = logging.getLogger(__name__)
METRIC_COLUMNS = ["step", "train_loss", "val_loss", "lr"]  # Lightning's `epoch` is dropped: training is step-based
BEST = "checkpoints/best.ckpt"
TENSORBOARD = "tensorboard"


class BestCheckpoint(ModelCheckpoint):
    """`checkpoints/best.ckpt`: the state with the lowest val_loss so far.

    A killed run resumes from its temp dir into a new one; stock ModelCheckpoint then drops
    the best score it restored (the dirpath changed), and the first validation after the
    resume would overwrite a better checkpoint. Paths are re-rooted here instead, so the
    best score carries over (the old best.ckpt is copied along by `fit`)."""

    def load_state_dict(self, state_dict: dict) -> None:
        old = state_dict.get("dirpath")
        if old and self.dirpath and old != self.dirpath:
            def move(p):
                return os.path.join(self.dirpath, os.path.basename(p)) if p else p

            state_dict = {**state_dict, "dirpath": self.dirpath,
                          "best_model_path": move(state_dict.get("best_model_path")),
                          "kth_best_model_path": move(state_dict.get("kth_best_model_path")),
                          "last_model_path": move(state_dict.get("last_model_path")),
                          "best_k_models": {move(k): v for k, v in (state_dict.get("best_k_models") or {}).items()}}
        super().load_state_dict(state_dict)


class PeakMemory(L.Callback):
    """Peak accelerator memory of this fit: CUDA's peak counters are reset once the model is on
    the device, so the numbers cover this stage even when stages share a process."""

    def __init__(self) -> None:
        self.device: torch.device | None = None

    def on_fit_start(self, trainer, pl_module) -> None:
        if pl_module.device.type == "cuda":
            self.device = pl_module.device
            torch.cuda.reset_peak_memory_stats(self.device)

    def read(self) -> dict:
        """This process's peaks in bytes; the accelerator ones are None off CUDA."""
        cuda = self.device is not None
        return {
            "peak_accelerator_memory_allocated_bytes": int(torch.cuda.max_memory_allocated(self.device)) if cuda else None,
            "peak_accelerator_memory_reserved_bytes": int(torch.cuda.max_memory_reserved(self.device)) if cuda else None,
            "peak_process_rss_bytes": peak_rss_bytes(),
        }


def peak_rss_bytes() -> int | None:
    """The process's peak resident set size since it started (None where `resource` is missing)."""
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # macOS reports bytes, Linux KiB


def estimate_memory(model: torch.nn.Module, optimizer: str, tokens: int, precision: str, loss_chunk_tokens: int) -> dict:
    """A rough per-device estimate (bytes) of a training step's memory, made before the run so a
    config that cannot fit is visible up front: weights, gradients and optimizer state are
    counted exactly (unsharded); activations kept for backward are taken as about 13 d + 4 h
    values per token and layer for the transformer (d = width, h = MLP hidden; a fused attention
    kernel, no T x T scores), 6 x hidden per layer for the LSTM; the loss holds one chunk of
    logits (compute dtype, float32 log-probabilities and their gradient) x vocabulary.
    `tokens` = positions in one micro-batch."""
    half = "16" in str(precision)
    weight_bytes = 2 if half and str(precision).endswith("-true") else 4
    act_bytes = 2 if half else 4
    named = [(n, p) for n, p in model.named_parameters()]
    trainable = [(n, p) for n, p in named if p.requires_grad]
    states = 0
    for n, p in trainable:  # AdamW keeps two moments; Muon one momentum buffer for the blocks' matrices
        states += p.numel() * (1 if optimizer == "muon" and p.dim() == 2 and n.startswith("blocks.") else 2)
    cfg = model.cfg
    if isinstance(cfg, GPTConfig):
        mlp = 4 if cfg.arch == "llama" else 2
        per_token = cfg.n_layer * (13 * cfg.d_model + mlp * cfg.mlp_hidden) + 4 * cfg.d_model
    else:
        per_token = cfg.layers * 6 * cfg.hidden + 3 * cfg.embed_dim
    rows = min(int(loss_chunk_tokens), tokens) if int(loss_chunk_tokens) > 0 else tokens
    out = {
        "params_bytes": sum(p.numel() for _, p in named) * weight_bytes,
        "grads_bytes": sum(p.numel() for _, p in trainable) * weight_bytes,
        "optimizer_bytes": states * weight_bytes,
        "activations_bytes": int(tokens) * per_token * act_bytes,
        "logits_bytes": rows * int(cfg.vocab_size) * (act_bytes + 8),
        "tokens_per_micro_batch": int(tokens),
        "loss_chunk_tokens": int(loss_chunk_tokens),
    }
    out["total_bytes"] = sum(v for k, v in out.items() if k.endswith("_bytes"))
    return out


def is_rank_zero() -> bool:
    """Whether this process is global rank 0, before any Trainer exists (launchers set these)."""
    for var in ("RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var]) == 0
    return int(os.environ.get("LOCAL_RANK", 0) or 0) == 0 and int(os.environ.get("NODE_RANK", 0) or 0) == 0


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


HISTORY = "history.csv"


def _carry_history(work: Path, resume: dict | None) -> list[dict]:
    """The metrics of earlier attempts up to the step this one continues from, kept in
    `history.csv` of the run directory (each attempt's own log restarts from there)."""
    work = Path(work)
    if not resume:
        (work / HISTORY).unlink(missing_ok=True)
        shutil.rmtree(work / "logs", ignore_errors=True)
        return []
    step, src = resume["step"], Path(resume["run_dir"])
    if src != work and (src / "metrics.csv").is_file():  # a finished (e.g. time-capped) output
        rows = read_metrics(src / "metrics.csv")
    else:  # this run directory: earlier attempts' history, then the last attempt's log
        rows = read_metrics(work / HISTORY) + _logged_rows(work / "logs" / "metrics.csv")
    rows = [r for r in rows if r.get("step", 0) < step or ("val_loss" in r and r.get("step", 0) == step)]
    write_metrics(rows, work / HISTORY)
    shutil.rmtree(work / "logs", ignore_errors=True)
    return rows


TRACKERS = {"mlflow": "mlflow-skinny", "wandb": "wandb"}  # `<stage>.loggers` names -> the pip package each needs


def tracking_loggers(spec, work: Path, stage: str) -> list:
    """The experiment trackers named in `<stage>.loggers`, logging what metrics.csv and TensorBoard get.

    An entry is a name or a mapping of `name` plus keyword arguments of Lightning's
    MLFlowLogger / WandbLogger, which win over the defaults below. The local stores sit in the
    runs root (`<paths.runs>/mlflow/`, `<paths.runs>/wandb/`; a run directory is
    `<paths.runs>/<stage>/<name>` and is removed once published), so runs accumulate there."""
    entries = list(spec) if isinstance(spec, (list, tuple)) else ([spec] if spec else [])
    checked = []
    for i, entry in enumerate(entries):  # every entry first, so a bad one fails before any logger starts
        where = f"{stage}.loggers[{i}]"
        opts = dict(entry) if isinstance(entry, dict) else {"name": entry}
        name = str(opts.pop("name", "")).strip().lower()
        if name not in TRACKERS:
            raise PipelineError(f"{where}: unknown logger {name!r}; expected one of {', '.join(TRACKERS)} "
                                f"(metrics.csv is always written, TensorBoard with {stage}.tensorboard=true)")
        if importlib.util.find_spec(name) is None:
            raise PipelineError(f"{where}: the {name} logger needs the {TRACKERS[name]} package: "
                                f"pip install {TRACKERS[name]} (or the project's extra: pip install -e '.[tracking]')")
        checked.append((where, name, opts))
    root = Path(work).parent.parent
    out = []
    for where, name, opts in checked:
        build = _mlflow_logger if name == "mlflow" else _wandb_logger
        try:
            out.append(build(opts, root, Path(work).name, stage))
        except TypeError as e:  # an option the logger does not take
            raise PipelineError(f"{where}: {e}") from e
    return out


def _mlflow_logger(opts: dict, root: Path, run_name: str, stage: str):
    """MLFLOW_TRACKING_URI (or a `tracking_uri` option) when set, else a SQLite store in
    `<root>/mlflow/`: MLflow 3 refuses the plain-directory store unless MLFLOW_ALLOW_FILE_STORE is set."""
    from lightning.pytorch.loggers import MLFlowLogger

    args = {"experiment_name": stage, "run_name": run_name, "tracking_uri": os.environ.get("MLFLOW_TRACKING_URI")}
    if not args["tracking_uri"] and "tracking_uri" not in opts:
        store = (root / "mlflow").resolve()
        store.mkdir(parents=True, exist_ok=True)
        args.update(tracking_uri=f"sqlite:///{store / 'mlflow.db'}", artifact_location=str(store / "artifacts"))
    return MLFlowLogger(**{**args, **opts})


def _wandb_logger(opts: dict, root: Path, run_name: str, stage: str):
    """Offline unless WANDB_MODE or the options say otherwise: nothing leaves the machine
    unasked, and `wandb sync <root>/wandb/offline-run-*` uploads later."""
    import wandb
    from lightning.pytorch.loggers import WandbLogger

    save_dir = Path(opts.pop("save_dir", None) or os.environ.get("WANDB_DIR") or root)
    save_dir.mkdir(parents=True, exist_ok=True)
    args = {"name": run_name, "project": os.environ.get("WANDB_PROJECT", "pipeline"), "job_type": stage,
            "save_dir": str(save_dir)}
    if "WANDB_MODE" not in os.environ and not {"mode", "offline"} & set(opts):
        args["mode"] = "offline"
    logger = WandbLogger(**{**args, **opts})
    logger.finish_with_fit = wandb.run is None  # a run someone else started (a sweep's) stays theirs
    return logger


def finish_tracking(loggers, exit_code: int = 0) -> None:
    """End the W&B run this fit started (Lightning leaves it open until the process exits, and the
    next stage in the same process would log into it); the Trainer ends MLflow's runs itself."""
    if any(getattr(lg, "finish_with_fit", False) for lg in loggers):
        import wandb

        if wandb.run is not None:
            wandb.finish(exit_code=exit_code)


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
    """Train in the run directory `work` (checkpoints/step-N.ckpt and best.ckpt, metrics.csv,
    tensorboard/), resuming from `resume`; returns what the summary reports.

    `tc.accumulate` micro-batches of `batch_size` make one optimizer step; steps, validation,
    logging and checkpoints all count optimizer steps."""
    quiet_lightning()
    work = Path(work)
    trackers = tracking_loggers(tc.get("loggers", []), work, str(module.hparams.get("stage", "training")))
    val_every = max(1, int(tc.get("val_every", 100)))
    log_every = max(1, int(tc.get("log_every", 10)))
    ckpt_every = int(tc.get("ckpt_every", 0) or val_every)
    accumulate = max(1, int(tc.get("accumulate", 1) or 1))
    datamodule.accumulate = accumulate
    has_val = datamodule.has_val()
    (work / "checkpoints").mkdir(parents=True, exist_ok=True)
    history: list[dict] = []
    if is_rank_zero():
        history = _carry_history(work, resume)
    if resume and Path(resume["run_dir"]) != work:  # continuing a published run: its best and events too
        old = Path(resume["run_dir"])
        if (old / BEST).is_file() and not (work / BEST).exists():
            shutil.copyfile(old / BEST, work / BEST)
        if (old / TENSORBOARD).is_dir() and not (work / TENSORBOARD).exists():
            shutil.copytree(old / TENSORBOARD, work / TENSORBOARD)
    tokens_per_step = _tokens_per_batch(datamodule) * accumulate
    peak = tc.get("peak_flops", None)
    throughput = Throughput(tokens_per_step, flops_per_token(module.model), float(peak) if peak else None, log_every)
    block = getattr(datamodule, "block_size", None) or getattr(module.model.cfg, "block_size", 0)
    memory = estimate_memory(module.model, str(module.hparams.get("optimizer", "adamw")),
                             int(datamodule.batch_size) * int(block), str(tc.get("precision", "32-true")),
                             int(module.hparams.get("loss_chunk_tokens", 0) or 0))
    if is_rank_zero():
        log.info("training memory estimate per device: %.2f GiB (params %.2f, grads %.2f, optimizer %.2f, "
                 "activations %.2f, logits %.2f)", *(memory[k] / 2**30 for k in (
                     "total_bytes", "params_bytes", "grads_bytes", "optimizer_bytes", "activations_bytes",
                     "logits_bytes")))
    peak_memory = PeakMemory()
    digest = DataDigest()
    datamodule.digest = digest
    durable = DurableCheckpoints(work / "checkpoints", ckpt_every, float(tc.get("ckpt_every_minutes", 0) or 0),
                                 int(tc.get("keep_checkpoints", 2) or 2), str(module.hparams.get("stage", "training")),
                                 slurm_requeue=bool(tc.get("slurm_requeue", True)))
    cbs = [durable, throughput, peak_memory, *callbacks]
    if has_val:
        cbs.insert(1, BestCheckpoint(dirpath=work / "checkpoints", filename="best", monitor="val_loss", mode="min",
                                     save_top_k=1, save_last=False, save_on_train_epoch_end=False,
                                     enable_version_counter=False, auto_insert_metric_name=False))
    loggers = [CSVLogger(work / "logs", name="", version="", flush_logs_every_n_steps=ckpt_every)]
    if bool(tc.get("tensorboard", True)):
        loggers.append(TensorBoardLogger(work, name=TENSORBOARD, version="", default_hp_metric=False))
    loggers += trackers
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
        val_check_interval=val_every * accumulate,  # counted in micro-batches
        accumulate_grad_batches=accumulate,
        check_val_every_n_epoch=None,
        limit_val_batches=1.0 if has_val else 0,
        num_sanity_val_steps=0,
        gradient_clip_val=float(tc.get("grad_clip", 0.0) or 0.0) or None,
        log_every_n_steps=log_every,
        logger=loggers,
        callbacks=cbs,
        enable_checkpointing=True,
        enable_progress_bar=progress,
        enable_model_summary=False,
        default_root_dir=work,
        use_distributed_sampler=False,
        benchmark=False,
    )
    if is_rank_zero():  # the ranks Lightning launches from here resume from rank 0's choice
        os.environ[RESUME_ENV] = str(resume["ckpt"]) if resume else ""
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=str(resume["ckpt"]) if resume else None)
    except BaseException:
        finish_tracking(trackers, exit_code=1)
        raise
    finally:
        if is_rank_zero():
            os.environ.pop(RESUME_ENV, None)

    step = int(trainer.global_step)
    # validation ran at every multiple of val_every; a run that stopped elsewhere (max_time,
    # max_steps) gets one more pass, decided the same way on every rank
    if has_val and step > 0 and step % val_every != 0:
        trainer.validate(module, datamodule=datamodule, verbose=False)  # the final state's val loss
    peaks = peak_memory.read()  # training and validation, before checkpoints and digests
    for lg in trainer.loggers:
        lg.save()
    finish_tracking(trackers)
    rows = _logged_rows(work / "logs" / "metrics.csv")
    for r in rows:  # `validate` logs one past the last step
        if "val_loss" in r and r["step"] > step:
            r["step"] = step
    durable.save(trainer)  # the final state, whatever step the run stopped at

    if trainer.is_global_zero:
        rows = history + rows
        write_metrics(rows, work / "metrics.csv")

    vals = [r["val_loss"] for r in rows if "val_loss" in r]
    bpbs = [r["val_bpb"] for r in rows if "val_bpb" in r]
    trains = [r["train_loss"] for r in rows if "train_loss" in r]
    world = int(trainer.world_size)
    best_step = min((r for r in rows if "val_loss" in r), key=lambda r: r["val_loss"])["step"] if vals else None
    ranks = _rank_digests(module, digest, world, weights="fsdp" not in str(tc.get("strategy", "auto")).lower())
    return {
        "accumulate": accumulate,
        "tokens_per_step": tokens_per_step * world,
        "flops_per_token": flops_per_token(module.model),
        "mfu": throughput.last.get("mfu"),
        "best_val_bpb": min(bpbs) if bpbs else None,
        "final_val_bpb": bpbs[-1] if bpbs else None,
        "best_step": best_step,
        "best_ckpt": BEST if (work / BEST).is_file() else None,
        "ranks": ranks,
        "steps": step,
        "steps_this_run": throughput.steps,
        "train_seconds": round(throughput.train_seconds, 3),
        "world_size": world,
        "best_val_loss": min(vals) if vals else None,
        "final_val_loss": vals[-1] if vals else None,
        "final_train_loss": sum(trains[-5:]) / len(trains[-5:]) if trains else None,
        "resumed_from_step": resume["step"] if resume else None,
        "stopped_early": step < int(max_steps),
        "memory_estimate": memory,
        **peaks,
    }


def _tokens_per_batch(datamodule) -> int:
    """Tokens in one micro-batch on one rank (pretraining windows; 0 when rows vary in length)."""
    block = getattr(datamodule, "block_size", None)
    return int(block) * int(datamodule.batch_size) if block else 0


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 over the parameters' bytes in state_dict order (identical weights, identical digest)."""
    import hashlib

    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _rank_digests(module, digest: DataDigest, world: int, weights: bool = True) -> list[dict]:
    """Per rank: a hash of the token ids it trained on and of its final weights, gathered on
    every rank. DDP must end with identical weights on every rank from distinct data (FSDP
    ranks hold different shards, so no weight hash there)."""
    mine = {"rank": int(module.global_rank), "batches": digest.batches, "data_xxh64": digest.hexdigest(),
            "weights_sha256": weights_digest(module.model) if weights else None}
    if world <= 1 or not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return [mine]
    out: list = [None] * world
    torch.distributed.all_gather_object(out, mine)
    return sorted(out, key=lambda r: r["rank"])


def write_meta(work: Path, model, stage: str, steps: int, **extra) -> dict:
    cfg = model.cfg
    meta = {
        "stage": stage,
        "kind": "lstm" if type(model).__name__ == "LSTMLM" else "gpt",
        "model": cfg.to_dict(),
        "vocab_size": cfg.vocab_size,
        "block_size": getattr(cfg, "block_size", None),
        "params": model.num_params(),
        "steps": steps,
        **extra,
    }
    write_json(Path(work) / META, meta)
    return meta
