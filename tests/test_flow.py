"""The Prefect flow against a real (temporary) Prefect server: tasks run, artifacts published."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml


@pytest.fixture(scope="module")
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


def test_flow_runs_stages_and_publishes_summaries(prefect_server, clean_corpus):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from flows.build import build_model

    overrides = [f"paths.root={clean_corpus}", "tokenizer.vocab_size=512", "shard.val_fraction=0.25"]
    result = build_model(overrides=overrides, stages=["tokenizer", "shard"])
    assert list(result) == ["tokenizer", "shard"]
    assert result["shard"]["val_docs"] > 0
    assert (clean_corpus / "data" / "shards" / "index.json").is_file()

    async def read(key):
        async with get_client() as client:
            return await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))

    import asyncio

    for stage in ("tokenizer", "shard"):
        arts = asyncio.run(read(f"{stage}-summary"))
        assert arts, f"no artifact for {stage}"
        assert f"Stage `{stage}`" in arts[0].data


def test_flow_rejects_unknown_stage(prefect_server, tmp_path):
    from flows.build import build_model
    from pipeline.core.errors import PipelineError

    with pytest.raises(PipelineError, match="unknown stage"):
        build_model(overrides=[f"paths.root={tmp_path}"], stages=["nope"])


def test_prefect_yaml_has_a_scheduled_deployment_of_the_flow():
    spec = yaml.safe_load((Path(__file__).parent.parent / "prefect.yaml").read_text())
    dep = spec["deployments"][0]
    module, func = dep["entrypoint"].split(":")
    import importlib

    flow_obj = getattr(importlib.import_module(module), func)
    assert flow_obj.name == "build-model"
    assert dep["schedules"][0]["cron"].count(" ") == 4
    from prefect.client.schemas.schedules import CronSchedule

    CronSchedule(cron=dep["schedules"][0]["cron"])  # parses


def test_task_timeout_fails_the_flow_with_a_clear_state(prefect_server, tmp_path, monkeypatch):
    """A training task past its timeout is stopped (its subprocess killed), retried, then fails
    the flow. 0.5 s is less than the child needs to import torch, so it cannot finish first."""
    import pipeline.apps.flow as fb

    monkeypatch.setattr(fb.stage_task, "retry_delay_seconds", 0)
    with pytest.raises(Exception, match="(?i)timeout|timed out"):
        fb.build_model(overrides=[f"paths.root={tmp_path}"], stages=["pretrain"], timeouts={"pretrain": 0.5})
    assert not (tmp_path / "models" / "pretrain").exists()


def test_run_stage_kills_a_training_subprocess_past_its_timeout(tmp_path):
    from pipeline.apps import runner
    from pipeline.core.errors import PipelineError

    with pytest.raises(PipelineError, match=r"stage pretrain timed out after 0.5s: .* -m pipeline pretrain"):
        runner.run_stage("pretrain", [f"paths.root={tmp_path}"], timeout=0.5)


# ------------------------------------------------------------------ workspace lock

HOLD = """
import sys, time
from pipeline.core.lock import workspace_lock
with workspace_lock(sys.argv[1], what="test holder"):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def _hold(root, seconds):
    import subprocess
    import sys

    from tests.conftest import ROOT

    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(root), str(seconds)], cwd=ROOT, stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_run_on_a_locked_workspace_fails_with_the_holder_named(clean_corpus):
    from tests.conftest import run_cli

    holder = _hold(clean_corpus, 60)
    try:
        proc = run_cli("tokenizer", f"paths.root={clean_corpus}", "tokenizer.vocab_size=512",
                       env={"PIPELINE_LOCK_WAIT": "0"})
        assert proc.returncode == 2, proc.stderr
        assert f"pid {holder.pid}" in proc.stderr and "test holder" in proc.stderr, proc.stderr
        assert "PIPELINE_LOCK_WAIT" in proc.stderr
        assert not (clean_corpus / "data" / "tokenizer").exists()  # nothing was started
    finally:
        holder.kill()
        holder.wait()


def test_a_second_run_waits_for_the_lock_when_asked(clean_corpus):
    import time

    from tests.conftest import run_cli

    holder = _hold(clean_corpus, 3)
    try:
        start = time.monotonic()
        proc = run_cli("tokenizer", f"paths.root={clean_corpus}", "tokenizer.vocab_size=512",
                       env={"PIPELINE_LOCK_WAIT": "120"})
        assert proc.returncode == 0, proc.stderr
        assert "waiting up to 120s" in proc.stderr
        assert holder.wait(timeout=5) == 0  # the holder finished first
        assert time.monotonic() - start >= 2
        assert (clean_corpus / "data" / "tokenizer" / "tokenizer.json").is_file()
    finally:
        holder.kill()
        holder.wait()


def test_lock_is_reentrant_and_released_when_the_holder_dies(tmp_path):
    from pipeline.core.lock import WorkspaceLocked, workspace_lock

    with workspace_lock(tmp_path):
        with workspace_lock(tmp_path):  # the flow holds it while its tasks run stages
            pass
    holder = _hold(tmp_path, 60)
    with pytest.raises(WorkspaceLocked, match="in use by pid"):
        with workspace_lock(tmp_path, wait=0.5):
            pass
    holder.kill()  # SIGKILL: no cleanup runs, the kernel drops the flock
    holder.wait()
    with workspace_lock(tmp_path, wait=0):
        pass


# ------------------------------------------------------------------ training launchers

def _cfg(*extra):
    from pipeline.core.config import load

    return load(["paths.root=/tmp/x", *extra])


def test_training_runs_as_plain_python_on_one_node():
    import sys

    cmd = __import__("pipeline.apps.runner", fromlist=["x"]).launch_command(_cfg(), "pretrain", ["seed=3"])
    assert cmd == [sys.executable, "-m", "pipeline", "pretrain", "seed=3"]


def test_multi_node_training_uses_torchrun_or_srun():
    from pipeline.apps.runner import launch_command

    cfg = _cfg("hardware=multi_node", "hardware.num_nodes=2", "hardware.devices=4")
    env = {"MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29400", "NODE_RANK": "1"}
    cmd = launch_command(cfg, "pretrain", ["hardware=multi_node"], environ=env)
    assert Path(cmd[0]).name == "torchrun"
    assert cmd[1:7] == ["--nnodes=2", "--nproc-per-node=4", "--node-rank=1", "--rdzv-backend=c10d",
                        "--rdzv-endpoint=10.0.0.1:29400", "--rdzv-id=pipeline-pretrain"]
    assert cmd[-4:] == ["-m", "pipeline", "pretrain", "hardware=multi_node"]
    # devices: -1 (the multi_node default) = every GPU of the node
    assert "--nproc-per-node=gpu" in launch_command(_cfg("hardware=multi_node"), "pretrain", [], environ={})

    slurm = launch_command(cfg, "pretrain", ["hardware=multi_node"], environ={"SLURM_JOB_ID": "7"})
    assert slurm[:3] == ["srun", "--nodes=2", "--ntasks-per-node=4"]
    assert slurm[-4:] == ["-m", "pipeline", "pretrain", "hardware=multi_node"]
    forced = launch_command(_cfg("executor.launcher=srun", "executor.srun_args='--gpus-per-node=4'"), "pretrain", [],
                            environ={})
    assert forced[:3] == ["srun", "--nodes=1", "--ntasks-per-node=1"] and "--gpus-per-node=4" in forced


def test_plan_force_runs_requested_stages_even_when_up_to_date(monkeypatch, tmp_path):
    from pipeline.apps import runner

    monkeypatch.chdir(tmp_path)
    (tmp_path / ".dvc").mkdir()
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    monkeypatch.setattr(runner, "dvc_stale", lambda requested, cwd=None: [])
    monkeypatch.setattr(runner, "dvc_usable", lambda cwd=None: (True, ""))
    assert runner.plan(["clean", "ingest"], [])[:2] == ([], True)
    assert runner.plan(["clean", "ingest"], [], force=True)[:2] == (["ingest", "clean"], True)
    assert runner.plan(["clean"], ["seed=1"])[:2] == (["clean"], False)


def test_plan_in_an_exported_tree_runs_every_stage_and_says_why(monkeypatch, tmp_path):
    """A release tarball or a downloaded zip: .dvc/ and dvc.yaml, but no git for DVC to use."""
    from pipeline.apps import runner

    monkeypatch.chdir(tmp_path)
    (tmp_path / ".dvc").mkdir()
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    todo, record, why = runner.plan(["shard", "clean"], [])
    assert todo == ["clean", "shard"] and record is False
    assert "not a git checkout" in why and "every requested stage runs" in why
    (tmp_path / ".dvc" / "config").write_text("[core]\n    no_scm = true\n")
    assert runner.dvc_usable() == (True, "")
    monkeypatch.setattr(runner, "dvc_stale", lambda requested, cwd=None: ["shard"])
    assert runner.plan(["shard", "clean"], [])[:2] == (["shard"], True)


@pytest.mark.slow
def test_training_stage_launched_through_torchrun(tmp_path):
    """The flow's launcher path for real: torchrun (one node, one CPU process, c10d rendezvous
    on a free loopback port) re-executes `python -m pipeline pretrain` under the workspace lock."""
    import json
    import socket

    from pipeline.apps import runner
    from pipeline.core.lock import workspace_lock
    from tests.fixtures import make_project

    overrides = make_project(tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    overrides += ["pretrain.max_steps=3", "pretrain.val_every=3", "executor.launcher=torchrun",
                  f"executor.rdzv_endpoint=127.0.0.1:{port}"]
    with workspace_lock(tmp_path):  # as in the flow: the child must not wait for its parent's lock
        summary = runner.run_stage("pretrain", overrides, timeout=600)
    assert summary["steps"] == 3 and summary["world_size"] == 1
    assert (tmp_path / "models" / "pretrain" / "checkpoints" / "last.ckpt").is_file()
    assert json.loads((tmp_path / "models" / "pretrain" / "_summary.json").read_text())["stage"] == "pretrain"


def test_run_on_a_locked_workspace_fails_before_any_stage(tmp_path):
    from tests.conftest import run_cli

    holder = _hold(tmp_path, 120)
    try:
        proc = run_cli("run", f"paths.root={tmp_path}", env={"PIPELINE_LOCK_WAIT": "0"}, timeout=300)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert f"in use by pid {holder.pid}" in proc.stderr and "flow build-model" in proc.stderr
        assert not (tmp_path / "data").exists()
    finally:
        holder.kill()
        holder.wait()


STOPPABLE = ["pretrain.max_steps=300", "pretrain.val_every=50", "pretrain.ckpt_every=10"]


def _kill_when_checkpointed(root, min_step: int, sig: int, pid_of, timeout: float = 300) -> dict:
    """In a thread: once a pretrain checkpoint of step >= min_step exists under `root`, send
    `sig` to the process `pid_of()` names; returns what it saw."""
    import os
    import threading
    import time

    import torch

    seen: dict = {}

    def watch():
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for p in Path(root, "runs", "pretrain").glob("*/checkpoints/step-*.ckpt"):
                try:
                    step = int(torch.load(p, map_location="cpu", weights_only=True)["global_step"])
                except Exception:  # noqa: BLE001 - mid-write
                    continue
                pid = pid_of()
                if step >= min_step and pid:
                    seen.update(step=step, pid=pid)
                    os.kill(pid, sig)
                    return
            time.sleep(0.05)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    seen["thread"] = t
    return seen


def _training_child(root) -> int | None:
    from tests.fixtures import pipeline_processes

    found = pipeline_processes(root, "pretrain")
    return found[0] if found else None


@pytest.mark.slow
def test_a_pretrain_task_that_fails_once_is_retried_and_resumes(prefect_server, tmp_path, monkeypatch):
    """The training subprocess is stopped (SIGTERM) after a checkpoint; the flow's retry of the
    task continues from that checkpoint, not from step 0."""
    import pipeline.apps.flow as fb
    from tests.fixtures import make_project

    overrides = [*make_project(tmp_path), *STOPPABLE]
    monkeypatch.setattr(fb.stage_task, "retry_delay_seconds", 0)
    seen = _kill_when_checkpointed(tmp_path, 10, __import__("signal").SIGTERM, lambda: _training_child(tmp_path))
    result = fb.build_model(overrides=overrides, stages=["pretrain"])
    assert seen.get("step", 0) >= 10, "the first attempt was stopped"
    assert result["pretrain"]["resumed_from_step"] >= seen["step"]
    assert result["pretrain"]["steps"] == 300


@pytest.mark.slow
def test_run_stops_promptly_on_sigterm_and_the_same_command_resumes(tmp_path):
    """`python -m pipeline run`, SIGTERMed while it trains: within seconds the training child has
    checkpointed and exited, the temporary Prefect server is gone, the exit code is 143; the
    same command then resumes."""
    import json
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import ROOT
    from tests.fixtures import make_project

    overrides = [*make_project(tmp_path), *STOPPABLE]
    cmd = [sys.executable, "-m", "pipeline", "run", "--stages", "pretrain", *overrides]
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect")}
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    seen = _kill_when_checkpointed(tmp_path, 10, signal.SIGTERM, lambda: proc.pid)
    seen["thread"].join(600)
    t0 = time.monotonic()
    out, _ = proc.communicate(timeout=120)
    took = time.monotonic() - t0
    log = out.decode(errors="replace")
    assert proc.returncode == 143, log[-3000:]
    assert took < 30, f"took {took:.1f}s to stop"
    assert "run stopped by SIGTERM" in log and "stopped by SIGTERM at step" in log
    time.sleep(1)
    assert _training_child(tmp_path) is None, "the training child is gone"
    try:
        os.killpg(proc.pid, 0)
        alive = True
    except ProcessLookupError:
        alive = False
    assert not alive, "nothing of the run (e.g. its Prefect server) is left in its process group"
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=900)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    summary = json.loads((tmp_path / "models" / "pretrain" / "_summary.json").read_text())
    assert summary["resumed_from_step"] >= seen["step"] and summary["steps"] == 300
