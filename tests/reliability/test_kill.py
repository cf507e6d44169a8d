"""SIGKILL in the middle of every data stage, run through the CLI as a subprocess.

For ingest (the `files` source), clean, tokenizer and shard, in order:

1. a reference run, uninterrupted, in workspace A;
2. in workspace B, the CLI is started and killed with SIGKILL while the stage works (as
   soon as its temp output directory exists, or at most a little after it started): the
   output directory is absent, never partial;
3. B is rerun to completion: its output is byte-identical to A's (`hash_tree`);
4. B is started and killed again, now with a complete output in place: the output is
   still that complete one, byte for byte; the killed run's temp dir is gone after the next
   successful run.

Training resume after SIGKILL is tested by the pretraining tests (tests/test_pretrain.py).
"""

from __future__ import annotations

import os
import pydoc
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.core.artifacts import hash_tree
from pipeline.core.config import load
from tests.conftest import ROOT
from tests.test_crawl import make_site  # noqa: F401 - a fixture

STAGES = [  # stage, output dir under paths.root, extra overrides
    ("ingest", "data/raw", ["source.rows_per_shard=3"]),
    ("clean", "data/clean", []),
    ("tokenizer", "data/tokenizer", ["tokenizer.vocab_size=400"]),
    ("shard", "data/shards", ["shard.tokens_per_file=20000"]),
]
MODULES = ["json", "os", "re", "collections", "pathlib", "typing", "inspect", "functools", "itertools", "argparse",
           "logging", "datetime", "random", "string", "shutil", "textwrap", "csv", "subprocess", "threading", "socket"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("corpus")
    for name in MODULES:
        text = pydoc.render_doc(__import__(name), renderer=pydoc.plaintext)
        (d / f"{name}.txt").write_text(text)
        (d / f"{name}.md").write_text(text.replace("\n\n", "\n\n# ")[:20000])
    return d


def overrides(root: Path, corpus: Path, extra: list[str]) -> list[str]:
    return [f"paths.root={root}", "source=files", f"source.paths=[{corpus}]", *extra]


def run_inprocess(stage: str, args: list[str]) -> None:
    from hydra.core.global_hydra import GlobalHydra

    from pipeline.apps.runner import stage_module

    GlobalHydra.instance().clear()
    stage_module(stage).run(load(args))


def start_and_kill(stage: str, args: list[str], root: Path, out: Path, after: float) -> None:
    """Start `python -m pipeline <stage>` and SIGKILL it inside the stage: once it holds the
    workspace lock (the stage has begun), as soon as its temp output dir exists or `after`
    seconds later, whichever comes first. The process must not have finished by itself."""
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", stage, *args], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    lock, tmp = root / ".pipeline.lock", out.parent / f"{out.name}.tmp-{proc.pid}"
    began = None
    try:
        while proc.poll() is None:
            if began is None and lock.exists() and f'"pid": {proc.pid},' in lock.read_text():
                began = time.monotonic()
            if tmp.exists() or (began is not None and time.monotonic() - began > after):
                break
            time.sleep(0.002)
        os.kill(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"{stage} finished before it was killed: {err.decode()[-2000:]}"


def test_sigkill_mid_stage_never_leaves_partial_output_and_rerun_is_identical(tmp_path, corpus):
    a, b = tmp_path / "a", tmp_path / "b"
    for stage, rel, extra in STAGES:
        # 1. reference, timed, so that the kill below lands inside the stage's own work
        t0 = time.monotonic()
        run_inprocess(stage, overrides(a, corpus, extra))
        took = time.monotonic() - t0
        reference = hash_tree(a / rel)
        out = b / rel
        args = overrides(b, corpus, extra)

        # 2. killed with nothing there before: no output at all
        start_and_kill(stage, args, b, out, after=took / 2)
        assert not out.exists(), f"{stage}: a killed first run left {out}"

        # 3. rerun to completion: identical to the uninterrupted run
        run_inprocess(stage, args)
        assert hash_tree(out) == reference, f"{stage}: the rerun after SIGKILL differs from an uninterrupted run"
        assert not list(out.parent.glob(f"{out.name}.tmp-*")), f"{stage}: a killed run's temp dir survived a success"

        # 4. killed with a complete output in place: that output stays, byte for byte
        start_and_kill(stage, args, b, out, after=took / 2)
        assert out.is_dir() and hash_tree(out) == reference, f"{stage}: a killed rerun damaged the previous output"
        assert (out / "_summary.json").is_file()


def test_a_run_killed_between_its_two_renames_gets_its_previous_output_back(tmp_path):
    """The one instant when `out` is missing (moved to .old-<pid>, temp not yet renamed):
    the next run restores the previous output before it starts."""
    from pipeline.core.artifacts import atomic_dir

    out = tmp_path / "data" / "x"
    with atomic_dir(out) as tmp:
        (tmp / "f").write_text("complete")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    pid = dead.stdout.strip()
    os.replace(out, out.with_name(f"x.old-{pid}"))  # as if SIGKILL came between the renames
    (out.parent / f"x.tmp-{pid}").mkdir()
    (out.parent / f"x.tmp-{pid}" / "f").write_text("partial")
    with pytest.raises(RuntimeError), atomic_dir(out):
        assert (out / "f").read_text() == "complete"  # back in place before this run does anything
        raise RuntimeError("this run fails too")
    assert (out / "f").read_text() == "complete"
    with atomic_dir(out) as tmp:
        (tmp / "f").write_text("new")
    assert (out / "f").read_text() == "new"
    assert sorted(p.name for p in out.parent.iterdir()) == ["x"]  # the dead run's leftovers are gone


def test_two_runs_in_one_workspace_second_refused_via_cli(tmp_path, make_site):
    """Covered in depth by tests/test_flow.py (refusal naming the holder, waiting with
    PIPELINE_LOCK_WAIT, release on SIGKILL); here: two real ingest processes. The first
    crawls a local page that answers only when the test says so, holding the workspace."""
    import threading

    from tests.test_crawl import page

    release = threading.Event()
    site = make_site()
    site.html("/", page("/slow.html"))
    site.routes["/slow.html"] = lambda h, n: (release.wait(60), (200, {"Content-Type": "text/html"},
                                                                  page(body="slow").encode()))[1]
    args = [f"paths.root={tmp_path}", "source=crawl", f"source.seeds=['{site.base}/']",
            f"source.allow_private=['127.0.0.1:{site.port}']", "source.delay=0", "source.timeout=90"]
    first = subprocess.Popen([sys.executable, "-m", "pipeline", "ingest", *args], cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while "/slow.html" not in site.requested():  # it holds the lock and waits on the page
            assert first.poll() is None and time.monotonic() < deadline, first.stderr.read()
            time.sleep(0.01)
        second = subprocess.run([sys.executable, "-m", "pipeline", "ingest", *args], cwd=ROOT, capture_output=True,
                                text=True, check=False, env={**os.environ, "PIPELINE_LOCK_WAIT": "0"})
        assert second.returncode == 2, second.stderr
        assert f"in use by pid {first.pid}" in second.stderr and "stage ingest" in second.stderr
        assert second.stderr.startswith("error: workspace") and second.stderr.count("\n") == 1
        release.set()  # let the first one finish
        assert first.wait(timeout=60) == 0, first.stderr.read()
    finally:
        release.set()
        first.kill()
        first.wait()
