"""The CLI's contract: help lists stages and groups; user errors are one line, exit 2, no traceback."""

from __future__ import annotations

import pytest

from tests.conftest import run_cli


def test_help_lists_stages_and_groups():
    proc = run_cli("--help")
    assert proc.returncode == 0
    for word in ["ingest", "clean", "tokenizer", "shard", "pretrain", "finetune", "eval", "run", "generate"]:
        assert f"  {word}" in proc.stdout
    for group in ["source", "clean", "model", "pretrain", "executor"]:
        assert f"\n  {group} " in proc.stdout
    assert "pydoc_site" in proc.stdout and "gpt_tiny" in proc.stdout


def _assert_one_line_error(proc, *needles):
    assert proc.returncode == 2, proc.stderr
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert lines[0].startswith("error: ")
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.mark.parametrize(
    "args, needles",
    [
        (["bogus"], ["unknown stage or command 'bogus'"]),
        (["clean", "clean=nope"], ["config error", "clean/nope"]),
        (["clean", "clean.no_such_key=3"], ["config error", "no_such_key"]),
        (["clean", "clean.min_words"], ["config error"]),
    ],
)
def test_config_errors_are_one_line(args, needles, tmp_path):
    _assert_one_line_error(run_cli(*args, f"paths.root={tmp_path}"), *needles)


def test_missing_input_names_the_path(tmp_path):
    proc = run_cli("clean", f"paths.root={tmp_path}")
    _assert_one_line_error(proc, str(tmp_path / "data" / "raw"), "python -m pipeline ingest")
    proc = run_cli("ingest", "source=files", f"source.paths=[{tmp_path}/absent]", f"paths.root={tmp_path}")
    _assert_one_line_error(proc, f"{tmp_path}/absent")


def test_empty_corpus_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = run_cli("ingest", "source=files", f"source.paths=[{tmp_path}/empty]", f"paths.root={tmp_path}")
    _assert_one_line_error(proc, "no documents")
    assert not (tmp_path / "data" / "raw").exists()


def test_generate_without_a_model_is_an_error(tmp_path):
    proc = run_cli("generate", "--prompt", "hello", f"paths.root={tmp_path}")
    _assert_one_line_error(proc, "python -m pipeline pretrain")
