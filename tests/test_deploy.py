"""prefect.yaml as an operator uses it: a real Prefect server on 127.0.0.1, a process work
pool, `prefect deploy --all`, a process worker, `prefect deployment run`, then the flow
run's state, its artifacts and its outputs. Everything is torn down in `finally`.

The deployments are the ones in prefect.yaml, with two changes for the test: the work pool
is the test's own, and the parameters point `paths.root` at a temp dir with a tiny crawl,
so nothing is written to the repository. The server runs without its scheduler (the
interval schedule would otherwise start a run at once); the schedules are checked as
registered instead.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.conftest import ROOT

PREFECT = str(Path(sys.executable).parent / "prefect")
POOL = "pipeline-test-pool"
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen | None) -> None:
    """SIGTERM the process group (the worker's flow-run children included), then SIGKILL."""
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    except ProcessLookupError:
        pass


@pytest.fixture
def prefect_env(tmp_path):
    port = _free_port()
    home = tmp_path / "prefect-home"
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false",
        "PREFECT_SERVER_UI_ENABLED": "false",
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "PREFECT_WORKER_PREFETCH_SECONDS": "5",
        "PREFECT_CLI_COLORS": "false",
        "PREFECT_CLI_WRAP_LINES": "false",
        "COLUMNS": "200",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    env.pop("PREFECT_PROFILES_PATH", None)
    return env, port


def _cli(env, *args, timeout=120) -> str:
    proc = subprocess.run([PREFECT, "--no-prompt", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"prefect {' '.join(args)}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


def _wait_healthy(api: str, server: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"prefect server exited ({server.returncode}):\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    pytest.fail(f"prefect server not healthy after {timeout}s:\n{log.read_text()[-3000:]}")


def _wait_run(api: str, run_id: str, worker_log: Path, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    run = {}
    while time.monotonic() < deadline:
        run = httpx.get(f"{api}/flow_runs/{run_id}", timeout=10).json()
        if (run.get("state") or {}).get("type") in TERMINAL:
            return run
        time.sleep(1)
    pytest.fail(f"flow run {run_id} not finished after {timeout}s (state {run.get('state')}):\n"
                f"{worker_log.read_text()[-4000:]}")


def _test_prefect_yaml(tmp: Path, root: Path) -> Path:
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    tiny = [f"paths.root={root}", "source.max_pages=30", "tokenizer.vocab_size=512", "shard.val_fraction=0.25"]
    for dep in spec["deployments"]:
        dep["work_pool"] = {"name": POOL}
        dep["parameters"] = {**dep.get("parameters", {}), "overrides": tiny, "lock_wait": 60}
    path = tmp / "prefect.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def _run_deployment(env, api, name: str, worker_log: Path, *params: str) -> dict:
    out = _cli(env, "deployment", "run", f"build-model/{name}", *params)
    match = re.search(r"UUID:\s*([0-9a-f-]{36})", out)
    assert match, out
    run = _wait_run(api, match.group(1), worker_log)
    assert run["state"]["type"] == "COMPLETED", f"{run['state']}\n{worker_log.read_text()[-4000:]}"
    return run


def _artifacts(api: str, run_id: str) -> dict[str, str]:
    body = {"artifacts": {"flow_run_id": {"any_": [run_id]}}}
    arts = httpx.post(f"{api}/artifacts/filter", json=body, timeout=10).json()
    return {a["key"]: a["data"] for a in arts if a.get("key")}


@pytest.mark.slow
def test_deployments_run_through_a_server_and_a_process_worker(prefect_env, tmp_path):
    env, port = prefect_env
    api = env["PREFECT_API_URL"]
    root = tmp_path / "workspace"
    server = worker = None
    server_log, worker_log = tmp_path / "server.log", tmp_path / "worker.log"
    try:
        with open(server_log, "w") as log:
            server = subprocess.Popen(
                [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-ui"],
                cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        _wait_healthy(api, server, server_log)
        _cli(env, "work-pool", "create", POOL, "--type", "process")
        out = _cli(env, "deploy", "--all", "--prefect-file", str(_test_prefect_yaml(tmp_path, root)), timeout=180)
        assert "nightly-rebuild" in out and "incremental-crawl" in out, out

        # both schedules are registered and active: the cron rebuild and the interval crawl
        schedules = {}
        for name in ("nightly-rebuild", "incremental-crawl"):
            dep = httpx.get(f"{api}/deployments/name/build-model/{name}", timeout=10).json()
            assert dep["work_pool_name"] == POOL
            schedules[name] = [s["schedule"] for s in dep["schedules"] if s["active"]]
        assert schedules["nightly-rebuild"][0]["cron"] == "0 2 * * *"
        assert schedules["incremental-crawl"][0]["interval"] == 21600

        with open(worker_log, "w") as log:
            worker = subprocess.Popen(
                [PREFECT, "worker", "start", "--pool", POOL, "--type", "process", "--install-policy", "never"],
                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )

        crawl = _run_deployment(env, api, "incremental-crawl", worker_log)
        clean_summary = json.loads((root / "data" / "clean" / "_summary.json").read_text())
        assert clean_summary["docs_in"] > 0 and clean_summary["kept"] > 0
        arts = _artifacts(api, crawl["id"])
        assert {"ingest-summary", "clean-summary"} <= set(arts), arts.keys()
        assert "Stage `clean`" in arts["clean-summary"]

        # the rebuild deployment with a parameter from the command line: the next two stages
        rebuild = _run_deployment(env, api, "nightly-rebuild", worker_log,
                                  "--param", 'stages=["tokenizer", "shard"]')
        index = json.loads((root / "data" / "shards" / "index.json").read_text())
        assert index["splits"]["train"]["tokens"] > 0
        assert {"tokenizer-summary", "shard-summary"} <= set(_artifacts(api, rebuild["id"]))
    finally:
        _stop(worker)  # the worker before the server, or the worker logs connection errors and hangs
        _stop(server)
