"""`pretrain.loggers`: MLflow and W&B (offline) receive the metrics that metrics.csv gets, in
local stores under `paths.runs`; a bad entry fails before training with what to do."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from fixtures import make_project

from pipeline.core.config import load
from pipeline.core.errors import PipelineError
from pipeline.stages import pretrain
from pipeline.training.trainer import read_metrics, tracking_loggers

SHORT = ["pretrain.max_steps=10", "pretrain.val_every=5", "pretrain.log_every=2", "pretrain.tensorboard=false"]


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("proj")
    return root, make_project(root)


def run_with(project, tmp_path, monkeypatch, loggers: str) -> tuple[Path, Path, dict]:
    """A 10-step pretraining run with its own output and runs root, from a bare cwd: (runs root, output, summary)."""
    _, overrides = project
    runs, out = tmp_path / "runs", tmp_path / "pretrain"
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    cfg = load([*overrides, *SHORT, f"paths.runs={runs}", f"paths.pretrain={out}", f"pretrain.loggers={loggers}"])
    summary = pretrain.run(cfg)
    assert not list(cwd.iterdir()), "nothing (mlruns/, wandb/ ...) may land in the cwd"
    return runs, out, summary


def train_losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["train_loss"] for r in read_metrics(out / "metrics.csv") if "train_loss" in r}


@pytest.mark.skipif(importlib.util.find_spec("mlflow") is None, reason="mlflow-skinny not installed")
def test_mlflow_store_holds_the_run_and_its_losses(project, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    runs, out, summary = run_with(project, tmp_path, monkeypatch, "[mlflow]")
    db = runs / "mlflow" / "mlflow.db"
    assert db.is_file()
    client = MlflowClient(f"sqlite:///{db}")
    experiment = client.get_experiment_by_name("pretrain")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name.startswith("pretrain-")
    assert {"train_loss", "val_loss", "lr"} <= set(run.data.metrics)
    logged = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train_loss")}
    expected = train_losses(out)
    assert logged.keys() == expected.keys() and len(logged) >= 4
    assert all(abs(logged[s] - expected[s]) < 1e-5 for s in expected)
    assert run.data.params["stage"] == "pretrain"  # the module's hyperparameters
    assert summary["steps"] == 10


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb not installed")
def test_wandb_offline_run_directory_holds_the_losses(project, tmp_path, monkeypatch):
    for var in ("WANDB_MODE", "WANDB_DIR", "WANDB_PROJECT", "WANDB_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    runs, out, _ = run_with(project, tmp_path, monkeypatch, "[wandb]")
    (run_dir,) = (runs / "wandb").glob("offline-run-*")
    history = wandb_history(run_dir)  # the log `wandb sync` uploads
    expected = train_losses(out)
    logged = {h["trainer/global_step"]: h["train_loss"] for h in history if "train_loss" in h}
    assert logged == pytest.approx(expected, abs=1e-5) and len(logged) >= 4
    assert any("val_loss" in h for h in history)
    import wandb

    assert wandb.run is None  # finished with the fit: a later stage in this process starts its own


def wandb_history(run_dir: Path) -> list[dict]:
    """The history rows in an offline run's transaction log: a 7-byte `:W&B` header, then
    protobuf Records framed as in LevelDB's log (32 KiB blocks of chunks, each with a 7-byte
    header: crc32c, little-endian length, type 1 full / 2 first / 3 middle / 4 last)."""
    from wandb.proto import wandb_internal_pb2

    (log,) = run_dir.glob("run-*.wandb")
    raw = log.read_bytes()
    assert raw[:4] == b":W&B"
    pos, block, pending, rows = 7, 32768, b"", []
    while pos + 7 <= len(raw):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(raw[pos + 4 : pos + 6], "little"), raw[pos + 6]
        chunk, pos = raw[pos + 7 : pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(pending)
            if rec.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
    return rows


def test_unknown_logger_fails_before_training(project, tmp_path, monkeypatch):
    with pytest.raises(PipelineError, match=r"pretrain.loggers\[0\]: unknown logger 'comet'; expected one of "
                                            r"mlflow, wandb"):
        run_with(project, tmp_path, monkeypatch, "[comet]")
    assert not (tmp_path / "runs").exists() and not (tmp_path / "pretrain").exists()


def test_missing_package_names_what_to_install(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(PipelineError, match=r"finetune.loggers\[1\]: the mlflow logger needs the mlflow-skinny "
                                            r"package: pip install mlflow-skinny"):
        tracking_loggers(["wandb", {"name": "MLflow", "tracking_uri": "sqlite://"}], tmp_path / "finetune" / "x",
                         "finetune")
    assert not list(tmp_path.iterdir())  # no logger was started, not even the valid first one
