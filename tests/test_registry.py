"""The stage registry is the one list of stages: dvc.yaml, the CLI and the runner follow it."""

from __future__ import annotations

import subprocess
import sys

from pipeline.apps import dvc_yaml
from pipeline.stages import registry
from tests.conftest import ROOT


def test_committed_dvc_yaml_is_generated_from_the_registry():
    assert (ROOT / "dvc.yaml").read_text() == dvc_yaml.render(ROOT), (
        "dvc.yaml differs from the registry: run `python -m pipeline dvc-yaml` and commit it")
    proc = subprocess.run([sys.executable, "-m", "pipeline", "dvc-yaml", "--check"], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_deps_are_the_import_closure_and_conf_targets():
    paths = dvc_yaml.output_paths(ROOT / "conf")
    stages = {s.name: dvc_yaml.stage_yaml(s, ROOT, ROOT / "conf", paths) for s in registry.STAGES}
    eval_deps = set(stages["eval"]["deps"])
    # eval scores with the sampler; no training stage imports it
    assert "pipeline/model/sampling.py" in eval_deps
    assert "pipeline/model/sampling.py" not in set(stages["finetune"]["deps"]) | set(stages["pretrain"]["deps"])
    assert not [d for d in eval_deps if d.startswith("pipeline/apps/")], "a stage depends on an interface"
    # clean's filters are named only in conf/clean/*.yaml (`_target_`), never imported by the stage
    assert "pipeline/filters/steps.py" in stages["clean"]["deps"]
    # every stage: its upstream outputs first, its own module, and the group files it reads
    for s in registry.STAGES:
        deps = stages[s.name]["deps"]
        assert deps[: len(s.inputs)] == [paths[i] for i in s.inputs]
        assert f"pipeline/stages/{s.name}.py" in deps
    assert {"conf/hardware/cpu.yaml": None} in stages["pretrain"]["params"]
    assert {"conf/hardware/gpu.yaml": None} in stages["finetune"]["params"]


def test_downstream_follows_inputs():
    assert registry.downstream(["pretrain"]) == ["pretrain", "finetune", "eval"]
    assert registry.downstream(["clean"]) == ["clean", "tokenizer", "shard", "pretrain", "finetune", "eval"]
    assert registry.downstream(["eval"]) == ["eval"]
    assert registry.downstream([]) == []


def test_cli_lists_and_runs_the_registry_stages():
    proc = subprocess.run([sys.executable, "-m", "pipeline", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0
    for s in registry.STAGES:
        assert f"  {s.name:<10} {s.help}" in proc.stdout
    bad = subprocess.run([sys.executable, "-m", "pipeline", "nosuchstage"], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and ", ".join(registry.NAMES) in bad.stderr
