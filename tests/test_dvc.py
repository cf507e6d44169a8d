"""`dvc repro` in a fresh git repo: builds everything, then nothing, then only what a change touches."""

from __future__ import annotations

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


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("dvcrepo")
    for name in ("conf", "pipeline", "flows"):
        shutil.copytree(ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", repo / "dvc.yaml")
    write_tiny_conf(repo / "conf")
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
    min_len = next(s for s in data["steps"] if "min_words" in s)
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
