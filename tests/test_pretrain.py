"""Pretraining end to end on fixture shards: outputs, metrics, resume, HF export, errors."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from fixtures import make_project

from pipeline.stages import pretrain
from pipeline.core.config import load
from pipeline.core.errors import PipelineError
from pipeline.apps.generate import generate_from_run
from pipeline.model.runs import load_trained
from pipeline.training.lightning import ShardDataModule


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("proj")
    return root, make_project(root)


@pytest.fixture(scope="module")
def trained(project, tmp_path_factory):
    """One pretraining run, started from an unrelated cwd (nothing may land there)."""
    root, overrides = project
    cwd = tmp_path_factory.mktemp("cwd")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        cfg = load(overrides)
        summary = pretrain.run(cfg)
    return cfg, summary, cwd


def _metrics(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _deterministic(rows: list[dict]) -> list[dict]:
    """Metric rows without the wall-clock columns."""
    return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "mfu")} for r in rows]


def test_outputs_layout_and_summary(trained):
    cfg, summary, cwd = trained
    out = Path(cfg.paths.pretrain)
    for rel in ("checkpoints/last.ckpt", "metrics.csv", "meta.json", "tokenizer.json", "_summary.json",
                "hf/config.json", "hf/model.safetensors", "hf/tokenizer.json", "hf/generation_config.json"):
        assert (out / rel).is_file(), rel
    assert not list(cwd.iterdir()), "nothing (lightning_logs/ ...) may be written to the cwd"
    assert not list(out.parent.glob("pretrain.tmp-*"))
    on_disk = json.loads((out / "_summary.json").read_text())
    assert on_disk["stage"] == "pretrain" and on_disk["steps"] == 40 == summary["steps"]
    assert on_disk["tokens_seen"] == 40 * 8 * 64
    assert on_disk["params"] > 0 and on_disk["tokens_per_s"] > 0 and on_disk["seconds"] > 0
    assert on_disk["final_val_loss"] >= on_disk["best_val_loss"] > 0
    assert set(on_disk["inputs"]) == {"shards", "tokenizer"}
    assert on_disk["final_val_bpb"] >= on_disk["best_val_bpb"] > 0 and 0 < on_disk["mfu"] < 1
    assert on_disk["flops_per_token"] > 6 * on_disk["params"] and on_disk["hf_export"] == "hf"
    best = torch.load(out / on_disk["best_ckpt"], weights_only=True)
    assert best["global_step"] == on_disk["best_step"]


def test_tensorboard_events_hold_the_logged_metrics(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg, summary, _ = trained
    acc = EventAccumulator(str(Path(cfg.paths.pretrain) / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train_loss", "val_loss", "val_bpb", "lr", "tokens_per_s", "mfu"} <= tags, tags
    assert [e.step for e in acc.Scalars("val_loss")][-1] >= 39
    assert acc.Scalars("val_loss")[-1].value == pytest.approx(summary["final_val_loss"], rel=1e-5)


def test_metrics_csv_has_train_and_val_loss_and_val_loss_decreases(trained):
    cfg, summary, _ = trained
    rows = _metrics(Path(cfg.paths.pretrain) / "metrics.csv")
    assert list(rows[0])[:4] == ["step", "train_loss", "val_loss", "lr"]
    val = [(int(r["step"]), float(r["val_loss"])) for r in rows if r["val_loss"]]
    train = [(int(r["step"]), float(r["train_loss"])) for r in rows if r["train_loss"]]
    assert [s for s, _ in val] == [10, 20, 30, 40]
    assert len(train) == 8
    assert val[-1][1] < val[0][1] - 0.05, val
    assert train[-1][1] < train[0][1]
    assert summary["final_val_loss"] == pytest.approx(val[-1][1])


def test_load_trained_reproduces_the_logged_val_loss(trained):
    cfg, summary, _ = trained
    model, meta = load_trained(cfg.paths.pretrain)
    assert not model.training
    assert meta["block_size"] == 64 and meta["vocab_size"] == model.cfg.vocab_size and meta["stage"] == "pretrain"
    assert Path(meta["tokenizer"]).is_file()
    dm = ShardDataModule(Path(cfg.paths.shards), 64, 8, cfg.seed, 40, 2)
    losses, counts = [], []
    with torch.no_grad():
        for x, y in dm._val_batches():
            logits = model(x)
            assert logits.shape == (*x.shape, model.cfg.vocab_size)
            losses.append(F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1)).item())
    assert sum(losses) / len(losses) == pytest.approx(summary["final_val_loss"], abs=1e-4)
    # bits per byte: the same nats over the UTF-8 bytes of the scored tokens
    from pipeline.tokenize.bpe import load as load_tokenizer
    from pipeline.tokenize.bpe import token_byte_lengths

    lengths = token_byte_lengths(load_tokenizer(Path(cfg.paths.tokenizer)))
    nats = sum(l * y.numel() for l, (_, y) in zip(losses, dm._val_batches()))
    nbytes = sum(int(lengths[y.numpy()].sum()) for _, y in dm._val_batches())
    assert summary["final_val_bpb"] == pytest.approx(nats / nbytes / math.log(2), rel=1e-4)


def test_hf_export_matches_and_loads_in_a_text_generation_pipeline(trained):
    from transformers import AutoTokenizer, LlamaForCausalLM, pipeline

    cfg, _, _ = trained
    hf_dir = Path(cfg.paths.pretrain) / "hf"
    model, _ = load_trained(cfg.paths.pretrain)
    hf = LlamaForCausalLM.from_pretrained(hf_dir).eval()
    idx = torch.randint(0, model.cfg.vocab_size, (2, 64))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model(idx), rtol=0, atol=1e-4)
    tok = AutoTokenizer.from_pretrained(hf_dir)
    assert tok.bos_token == "<|endoftext|>" and tok.pad_token == "<|pad|>"
    assert tok("def f(x):")["input_ids"][0] == 0  # BOS = the document separator, as in training
    gen = pipeline("text-generation", model=str(hf_dir), device="cpu")
    text = gen("The json module", max_new_tokens=12, do_sample=False)[0]["generated_text"]
    assert text.startswith("The json module") and len(text) > len("The json module")


def test_generate_from_run_is_deterministic_at_temperature_zero(trained):
    cfg, _, _ = trained
    a = generate_from_run(cfg, "def dumps(obj", which="latest", max_new_tokens=16, temperature=0.0)
    b = generate_from_run(cfg, "def dumps(obj", which="pretrain", max_new_tokens=16, temperature=0.0)
    assert a == b and len(a) > 0
    with pytest.raises(PipelineError, match="python -m pipeline finetune"):
        generate_from_run(cfg, "x", which="finetune")


def test_resume_after_interruption_is_exact(project, trained):
    """A run that fails after step 20 keeps its run directory and resumes to the same weights."""
    from pipeline.core.errors import TrainingFailed

    root, overrides = project
    cfg_a, _, _ = trained
    out = root / "models" / "resumed"

    class Fail(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 20:
                raise RuntimeError("simulated failure")

    cfg = load([*overrides, f"paths.pretrain={out}"])
    with pytest.raises(TrainingFailed, match=r"pretrain failed during training: RuntimeError: simulated failure\. "
                                             r"Checkpoints are kept in .*; resume with: python -m pipeline"):
        pretrain.run(cfg, callbacks=[Fail()])
    assert not out.exists()
    runs = list((root / "runs" / "pretrain").glob("resumed-*"))
    assert len(runs) == 1 and (runs[0] / "checkpoints" / "step-00000020.ckpt").is_file()
    summary = pretrain.run(cfg)
    assert summary["resumed_from_step"] == 20 and summary["steps_this_run"] == 20 and summary["steps"] == 40
    a, _ = load_trained(cfg_a.paths.pretrain)
    b, _ = load_trained(out)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name
    rows = _metrics(out / "metrics.csv")
    assert [int(r["step"]) for r in rows if r["val_loss"]] == [10, 20, 30, 40]
    assert _deterministic(rows) == _deterministic(_metrics(Path(cfg_a.paths.pretrain) / "metrics.csv"))
    best_a = torch.load(Path(cfg_a.paths.pretrain) / "checkpoints" / "best.ckpt", weights_only=True)
    best_b = torch.load(out / "checkpoints" / "best.ckpt", weights_only=True)
    assert best_a["global_step"] == best_b["global_step"], "the best checkpoint survives the resume"
    assert (out / "tensorboard").is_dir()
    assert not runs[0].exists(), "the run directory goes once its output is published"


@pytest.mark.slow
def test_sigkilled_cli_run_resumes_with_the_same_batches(project, trained):
    """A real `python -m pipeline pretrain` process, SIGKILLed once a checkpoint is on disk,
    then started again: its loss curve, step by step, and its weights equal the
    uninterrupted run's."""
    import os
    import signal
    import subprocess
    import sys
    import time

    root, overrides = project
    cfg_a, _, _ = trained
    out = root / "models" / "killed"
    cmd = [sys.executable, "-m", "pipeline", "pretrain", *overrides, f"paths.pretrain={out}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    seen = False
    while time.monotonic() < deadline and proc.poll() is None and not seen:
        for ckpt in (root / "runs" / "pretrain").glob("killed-*/checkpoints/step-*.ckpt"):
            try:
                seen = seen or torch.load(ckpt, weights_only=True, mmap=True)["global_step"] >= 10
            except (RuntimeError, EOFError, KeyError, OSError):  # still being written
                pass
        time.sleep(0.02)
    # the CSV row of the checkpointed step is flushed a few ms after the checkpoint itself
    # (Lightning logs a step's metrics after its callbacks): kill past that window
    time.sleep(0.1)
    assert proc.poll() is None, "the run finished before it could be killed: " + proc.stderr.read().decode()[-2000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists()

    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    assert again.returncode == 0, again.stderr[-3000:]
    summary = json.loads((out / "_summary.json").read_text())
    assert summary["resumed_from_step"] in (10, 20, 30) and summary["steps"] == 40
    assert summary["steps_this_run"] == 40 - summary["resumed_from_step"]
    expected = _deterministic(_metrics(Path(cfg_a.paths.pretrain) / "metrics.csv"))
    assert _deterministic(_metrics(out / "metrics.csv")) == expected
    a, _ = load_trained(cfg_a.paths.pretrain)
    b, _ = load_trained(out)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name
    assert not list((root / "runs" / "pretrain").glob("killed-*")), "published: the run directory is gone"


def test_missing_inputs_name_the_command_to_run(tmp_path):
    cfg = load([f"paths.root={tmp_path}"])
    with pytest.raises(PipelineError, match=r"shards.*python -m pipeline shard"):
        pretrain.run(cfg)
    (tmp_path / "data" / "shards").mkdir(parents=True)
    (tmp_path / "data" / "shards" / "index.json").write_text(json.dumps({"dtype": "uint16", "splits": {"train": {"files": []}, "val": {"files": []}}}))
    with pytest.raises(PipelineError, match=r"tokenizer.*python -m pipeline tokenizer"):
        pretrain.run(cfg)
    with pytest.raises(PipelineError, match=r"python -m pipeline pretrain"):
        generate_from_run(cfg, "hello")
