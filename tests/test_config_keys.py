"""Every config key the code reads is in a conf/ file with its default.

A `.get("key", default)` on a key that no YAML file has hides the default from users and
from `dvc.yaml` (an edit of it is never seen). The stages run here for real, in process,
on a tiny project; every read of a config key that the composed config lacks is recorded.
"""

from __future__ import annotations

import pytest
from omegaconf import DictConfig

from pipeline.core import config as core_config
from tests.fixtures import MICRO, make_project


HYDRA_KEYS = {"_target_", "_partial_", "_args_", "_recursive_", "_convert_", "defaults"}  # Hydra's own lookups


class _Recording(dict):
    """The flat training settings (hardware + recipe), recording reads of absent keys."""

    def __init__(self, data, prefix, misses):
        super().__init__(data)
        self.prefix, self.misses = prefix, misses

    def get(self, key, default=None):
        if key not in self:
            self.misses.add(f"{self.prefix}.{key}")
        return super().get(key, default)


@pytest.fixture
def misses(monkeypatch):
    seen: set[str] = set()
    original = DictConfig.get

    def get(self, key, default_value=None):
        if isinstance(key, str) and key not in HYDRA_KEYS and key not in self:
            seen.add(self._get_full_key(key))
        return original(self, key, default_value)

    monkeypatch.setattr(DictConfig, "get", get)
    real = core_config.train_settings
    for mod in ("pipeline.stages.pretrain", "pipeline.stages.finetune"):
        monkeypatch.setattr(f"{mod}.train_settings", lambda cfg, stage: _Recording(real(cfg, stage), stage, seen))
    return seen


def test_stages_read_only_keys_that_conf_declares(tmp_path, misses):
    from pipeline.stages import clean, eval as eval_stage, finetune, ingest, pretrain

    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(12):
        (docs / f"doc{i}.txt").write_text(
            f"Document {i} explains how module number {i} parses its input and writes its output. " * 20)
    base = [f"paths.root={tmp_path / 'files'}", "source=files", f"source.paths=[{docs}]"]
    ingest.run(core_config.load(base))
    clean.run(core_config.load(base))

    overrides = make_project(tmp_path / "train") + MICRO + [
        "eval.max_val_tokens=2000", "eval.max_heldout_pairs=2", "eval.max_new_tokens=4", "eval.lstm.steps=5",
        "eval.lstm.hidden=32", "eval.lstm.embed_dim=16", "eval.gate.enabled=false",
        f"eval.history_dir={tmp_path / 'history'}",
    ]
    cfg = core_config.load(overrides)
    pretrain.run(cfg)
    finetune.run(cfg)
    eval_stage.run(cfg)
    assert not sorted(misses), f"read by the code but in no conf/ file: {sorted(misses)}"
