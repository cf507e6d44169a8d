"""The machine a run uses: device resolution, the memory estimate and the peak memory in the summary."""

from __future__ import annotations

import pytest
import torch
from fixtures import make_project
from test_evaluate import _run, eval_root  # noqa: F401  (the eval stage's fixture project)

from pipeline.apps import cli
from pipeline.apps.generate import generate_from_run
from pipeline.core.config import load
from pipeline.core.errors import PipelineError
from pipeline.model.gpt import GPT, GPTConfig
from pipeline.model.runs import resolve_device
from pipeline.stages import pretrain
from pipeline.tokenize.shards import read_index
from pipeline.training.trainer import estimate_memory


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


def test_auto_is_the_cpu_without_cuda(no_cuda):
    assert resolve_device("auto") == "cpu" == resolve_device(None) == resolve_device("cpu")


def test_auto_is_cuda_when_cuda_is_available(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == "cuda" == resolve_device("CUDA")
    assert resolve_device("cuda:1") == "cuda:1"
    with pytest.raises(PipelineError, match=r"eval.device=cuda:2 but this machine has 2 CUDA"):
        resolve_device("cuda:2", "eval.device")


def test_unavailable_or_unknown_devices_are_clear_errors(no_cuda):
    with pytest.raises(PipelineError, match=r"eval.device=cuda but this machine has no usable CUDA device"):
        resolve_device("cuda", "eval.device")
    with pytest.raises(PipelineError, match=r"serve.device='gpu0' is not a device"):
        resolve_device("gpu0", "serve.device")


def test_generate_with_an_unavailable_device_is_a_pipeline_error(no_cuda, tmp_path, capsys):
    cfg = load([f"paths.root={tmp_path}"])
    with pytest.raises(PipelineError, match="--device=cuda but"):
        generate_from_run(cfg, "x", device="cuda")
    assert cli.main(["generate", "--prompt", "x", "--device", "cuda", f"paths.root={tmp_path}"]) != 0
    assert "no usable CUDA device" in capsys.readouterr().err


def test_eval_summary_names_its_device(eval_root, no_cuda):  # noqa: F811
    _, overrides, _ = eval_root
    with pytest.raises(PipelineError, match="eval.device=cuda but"):
        _run([*overrides, "eval.device=cuda"])
    _, summary = _run(overrides)
    assert summary["device"] == "cpu" and summary["config"]["eval"]["device"] == "auto"


def test_memory_estimate_counts_weights_optimizer_and_one_logits_chunk():
    model = GPT(GPTConfig(vocab_size=1000, n_layer=2, n_head=2, d_model=32, mlp_hidden=64, block_size=64))
    n = model.num_params()
    est = estimate_memory(model, "adamw", tokens=8 * 64, precision="32-true", loss_chunk_tokens=100)
    assert est["params_bytes"] == est["grads_bytes"] == 4 * n and est["optimizer_bytes"] == 8 * n
    assert est["logits_bytes"] == 100 * 1000 * 12
    assert est["activations_bytes"] == 8 * 64 * (2 * (13 * 32 + 4 * 64) + 4 * 32) * 4
    assert est["total_bytes"] == sum(v for k, v in est.items() if k.endswith("_bytes") and k != "total_bytes")
    unchunked = estimate_memory(model, "adamw", 8 * 64, "32-true", 0)
    assert unchunked["logits_bytes"] == 8 * 64 * 1000 * 12 > est["logits_bytes"]
    mixed = estimate_memory(model, "muon", 8 * 64, "bf16-mixed", 100)
    hidden = sum(p.numel() for name, p in model.named_parameters() if name.startswith("blocks.") and p.dim() == 2)
    assert mixed["optimizer_bytes"] == 4 * (2 * n - hidden) and mixed["params_bytes"] == 4 * n
    assert mixed["activations_bytes"] == est["activations_bytes"] // 2 and mixed["logits_bytes"] == 100 * 1000 * 10


def test_pretrain_summary_has_the_memory_estimate_and_peaks(tmp_path, caplog):
    overrides = make_project(tmp_path) + ["pretrain.max_steps=4", "pretrain.val_every=2",
                                          "pretrain.loss_chunk_tokens=100"]
    cfg = load(overrides)
    assert pretrain.fingerprint(cfg, read_index(cfg.paths.shards)) == pretrain.fingerprint(
        load([*overrides, "pretrain.loss_chunk_tokens=0"]), read_index(cfg.paths.shards))  # same math, same run
    with caplog.at_level("INFO", logger="pipeline.training.trainer"):
        summary = pretrain.run(cfg)
    assert "training memory estimate per device" in caplog.text
    est = summary["memory_estimate"]
    assert est["loss_chunk_tokens"] == 100 and est["tokens_per_micro_batch"] == 8 * 64
    assert est["logits_bytes"] == 100 * int(read_index(cfg.paths.shards)["vocab_size"]) * 12
    assert est["params_bytes"] == 4 * summary["params"] and est["total_bytes"] > est["params_bytes"]
    assert summary["peak_accelerator_memory_allocated_bytes"] is None  # a CPU run
    assert summary["peak_accelerator_memory_reserved_bytes"] is None
    assert summary["peak_process_rss_bytes"] > est["params_bytes"]
    assert summary["final_val_loss"] > 0
