"""`dvc repro` in a fresh git repo: builds everything, then nothing, then only what a change touches."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, write_tiny_conf

pytestmark = pytest.mark.slow


def _sh(args, cwd, timeout=900):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, f"{args}: {proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


def _ran(output: str) -> list[str]:
    return re.findall(r"Running stage '([a-z]+)'", output)


# On top of TINY: a micro model, a few steps, no LSTM baseline and no release gate (an
# experiment that changes the data may regress, which is the gate's business, not this
# test's). These tests check DVC wiring; every full rebuild costs seconds, not minutes.
WIRING = {
    "model/gpt_tiny.yaml": {"n_layer": 2, "n_head": 2, "d_model": 32, "mlp_hidden": 64, "block_size": 64},
    "pretrain/default.yaml": {"max_steps": 6, "val_every": 3, "batch_size": 8, "val_batches": 2},
    "finetune/default.yaml": {"max_steps": 4, "val_every": 2, "batch_size": 4, "val_batches": 2},
    "eval/default.yaml": {"max_val_tokens": 3000, "max_heldout_pairs": 2, "max_new_tokens": 4,
                          "lstm.enabled": False, "gate.enabled": False},
}


def _bake(conf: Path, values: dict) -> None:
    for name, keys in values.items():
        path = conf / name
        data = yaml.safe_load(path.read_text())
        for key, value in keys.items():
            *parents, leaf = key.split(".")
            node = data
            for p in parents:
                node = node[p]
            assert leaf in node, f"{key} is not in {path}"
            node[leaf] = value
        path.write_text(yaml.safe_dump(data, sort_keys=False))


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("dvcrepo")
    for name in ("conf", "pipeline", "flows"):
        shutil.copytree(ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", repo / "dvc.yaml")
    shutil.copy(ROOT / ".gitignore", repo / ".gitignore")  # .pipeline.lock, caches
    write_tiny_conf(repo / "conf")
    _bake(repo / "conf", WIRING)
    _sh(["git", "init", "-q"], repo)
    _sh(["git", "config", "user.email", "ci@example.invalid"], repo)
    _sh(["git", "config", "user.name", "ci"], repo)
    _sh([sys.executable, "-m", "dvc", "init", "-q"], repo)
    _sh([sys.executable, "-m", "dvc", "config", "core.analytics", "false"], repo)
    _sh(["git", "add", "-A"], repo)
    _sh(["git", "commit", "-qm", "init"], repo)
    return repo


def test_repro_builds_then_nothing_then_only_downstream_of_a_change(repo):
    first = _ran(_sh([sys.executable, "-m", "dvc", "repro"], repo))
    assert first == ["ingest", "clean", "tokenizer", "shard", "pretrain", "finetune", "eval"]
    assert (repo / "reports" / "metrics.json").is_file()

    again = _sh([sys.executable, "-m", "dvc", "repro"], repo)
    assert _ran(again) == [], again

    conf = repo / "conf" / "clean" / "docs.yaml"
    data = yaml.safe_load(conf.read_text())
    min_len = next(s for s in data["steps"].values() if "min_words" in s)
    min_len["min_words"] = int(min_len["min_words"]) + 1
    conf.write_text(yaml.safe_dump(data, sort_keys=False))
    changed = _sh([sys.executable, "-m", "dvc", "repro"], repo)
    assert _ran(changed) == ["clean", "tokenizer", "shard", "pretrain", "finetune", "eval"], changed
    assert "'ingest' didn't change" in changed

    metrics = _sh([sys.executable, "-m", "dvc", "metrics", "show", "--json"], repo)
    assert "val_bpb" in metrics


def test_flow_in_a_dvc_repo_runs_only_stale_stages_and_commits(repo):
    # after the repro above nothing is stale: the flow must run nothing
    out = _sh([sys.executable, "-m", "pipeline", "run"], repo)
    assert "stages to run: none" in out, out
    # a change to the eval config makes only eval stale; the flow runs it and records it
    conf = repo / "conf" / "eval" / "default.yaml"
    data = yaml.safe_load(conf.read_text())
    data["max_new_tokens"] = int(data["max_new_tokens"]) + 1
    conf.write_text(yaml.safe_dump(data, sort_keys=False))
    out = _sh([sys.executable, "-m", "pipeline", "run"], repo)
    assert "stages to run: ['eval']" in out, out
    status = _sh([sys.executable, "-m", "dvc", "status"], repo)
    assert "up to date" in status, status


def _commit_all(repo: Path, message: str) -> None:
    _sh(["git", "add", "-A"], repo)
    _sh(["git", "commit", "-qm", message], repo)


def test_remote_push_then_a_clone_pulls_and_has_nothing_to_repro(repo, tmp_path_factory):
    store = tmp_path_factory.mktemp("dvc-store")
    _sh([sys.executable, "-m", "dvc", "remote", "add", "-d", "store", str(store)], repo)
    _commit_all(repo, "built; local remote")
    _sh([sys.executable, "-m", "dvc", "push"], repo)
    assert any(store.rglob("*")), "nothing pushed"

    clone = tmp_path_factory.mktemp("clone") / "repo"
    _sh(["git", "clone", "-q", str(repo), str(clone)], repo.parent)
    assert not (clone / "models" / "pretrain").exists()
    _sh([sys.executable, "-m", "dvc", "pull"], clone)
    assert (clone / "models" / "pretrain" / "checkpoints" / "last.ckpt").is_file()
    assert (clone / "data" / "shards" / "index.json").read_bytes() == (repo / "data" / "shards" / "index.json").read_bytes()
    out = _sh([sys.executable, "-m", "dvc", "repro"], clone)
    assert _ran(out) == [], out
    assert "up to date" in _sh([sys.executable, "-m", "dvc", "status"], clone)


def _eval_tokens(repo: Path) -> int:
    return int(yaml.safe_load((repo / "conf" / "eval" / "default.yaml").read_text())["max_new_tokens"])


def test_experiments_edit_conf_and_compare(repo):
    docs = repo / "conf" / "clean" / "docs.yaml"
    steps = yaml.safe_load(docs.read_text())["steps"]
    at = next(name for name, s in steps.items() if "min_words" in s)
    min_words = steps[at]["min_words"]

    # DVC's file form: clean and everything after it rerun with the new value, ingest does not
    out = _sh([sys.executable, "-m", "dvc", "exp", "run", "-n", "more-words",
               "-S", f"conf/clean/docs.yaml:steps.{at}.min_words={min_words + 3}"], repo)
    assert _ran(out) == ["clean", "tokenizer", "shard", "pretrain", "finetune", "eval"], out
    assert "'ingest' didn't change" in out
    clean = json.loads((repo / "data" / "clean" / "_summary.json").read_text())
    assert f"min_words={min_words + 3}" in " ".join(clean["steps"])  # the stage really saw the value

    # the Hydra form: the key is looked up in the selected option's file, which keeps its
    # comments (it also works on files with ${...} interpolations, e.g. conf/shard, where `-S`
    # cannot: DVC resolves the file on its own and fails on keys that live in conf/config.yaml)
    tokens = _eval_tokens(repo) + 2
    dry = _sh([sys.executable, "-m", "pipeline", "exp", "--dry-run", f"eval.max_new_tokens={tokens}"], repo)
    assert f"-S conf/eval/default.yaml:max_new_tokens={tokens}" in dry, dry
    before_comments = [ln for ln in (repo / "conf" / "eval" / "default.yaml").read_text().splitlines()
                       if ln.lstrip().startswith("#")]
    out = _sh([sys.executable, "-m", "pipeline", "exp", "-n", "eval-tokens", f"eval.max_new_tokens={tokens}"], repo)
    assert _ran(out) == ["eval"], out
    assert _eval_tokens(repo) == tokens
    assert [ln for ln in (repo / "conf" / "eval" / "default.yaml").read_text().splitlines()
            if ln.lstrip().startswith("#")] == before_comments
    assert "up to date" in _sh([sys.executable, "-m", "dvc", "status"], repo)

    shown = _json_out([sys.executable, "-m", "dvc", "exp", "show", "--json"], repo)
    names = set(_values(shown, "name"))
    assert {"eval-tokens", "more-words"} <= names, names

    diff = _json_out([sys.executable, "-m", "dvc", "metrics", "diff", "HEAD", "more-words", "--json"], repo)
    changed = [v for k, v in _items(diff) if k.endswith("val_bpb") and isinstance(v, dict) and "new" in v]
    assert changed and any(v.get("old") != v.get("new") for v in changed), diff  # other data, other model

    plots = _sh([sys.executable, "-m", "dvc", "plots", "show", "-o", "dvc_plots"], repo)
    html = (repo / "dvc_plots" / "index.html").read_text()
    declared = yaml.safe_load((repo / "dvc.yaml").read_text()).get("plots") or []
    assert declared, "dvc.yaml declares no plots"
    for entry in declared:  # every declared plot (named data plots, image folders) is rendered
        plot_id = next(iter(entry)) if isinstance(entry, dict) else entry
        assert plot_id in html or f"{plot_id}/" in html, (plot_id, plots)


def _json_out(args, cwd):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _values(node, key):
    """Every value of `key` anywhere in a JSON tree (dvc exp show nests experiments in revs)."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key and isinstance(v, str):
                yield v
            yield from _values(v, key)
    elif isinstance(node, list):
        for v in node:
            yield from _values(v, key)


def _items(node):
    """Every (key, value) pair anywhere in a JSON tree."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield k, v
            yield from _items(v)
    elif isinstance(node, list):
        for v in node:
            yield from _items(v)


def test_editing_a_module_only_eval_imports_makes_only_eval_stale(repo):
    """deps are each stage's import closure: a module that only the eval stage imports makes
    eval stale and nothing before it."""
    from pipeline.apps import dvc_yaml
    from pipeline.stages import registry

    _sh([sys.executable, "-m", "dvc", "repro"], repo)  # whatever an earlier test left stale
    lock = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]
    earlier = {d for s in registry.NAMES if s != "eval" for d in lock[s]["deps"]}
    only_eval = [d for d in lock["eval"]["deps"] if d.startswith("pipeline/") and d not in earlier]
    assert "pipeline/model/sampling.py" in only_eval
    assert set(lock["eval"]["deps"]) >= {p.relative_to(ROOT).as_posix() for p in dvc_yaml.import_closure("pipeline.stages.eval")}
    target = repo / "pipeline" / "model" / "sampling.py"
    before = target.read_text()
    try:
        target.write_text(before + "\n# an edit\n")
        assert sorted(_status(repo)) == ["eval"]
    finally:
        target.write_text(before)
    assert _status(repo) == {}


def _status(repo) -> dict:
    proc = subprocess.run([sys.executable, "-m", "dvc", "status", "--json"], cwd=repo, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout or "{}")


def test_run_in_an_exported_tree_runs_every_stage_and_says_why(repo, tmp_path_factory):
    """A release tarball or a downloaded zip: .dvc/ and dvc.yaml but no git, which DVC needs;
    `run` builds everything without asking DVC, and says so."""
    exported = tmp_path_factory.mktemp("exported") / "lm-pipeline"
    shutil.copytree(repo, exported, ignore=shutil.ignore_patterns(
        ".git", "data", "models", "reports", "runs", "cache", "tmp", "__pycache__", "dvc.lock"))
    env = {**os.environ, "GIT_CEILING_DIRECTORIES": str(exported.parent)}
    proc = subprocess.run([sys.executable, "-m", "pipeline", "run"], cwd=exported, capture_output=True, text=True,
                          timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    assert "not a git checkout" in log and "every requested stage runs" in log
    assert "dvc status failed" not in log
    assert (exported / "reports" / "metrics.json").is_file()
    assert not (exported / "dvc.lock").exists()
