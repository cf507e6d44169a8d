"""`python -m pipeline exp [--name N] [--dry-run] <hydra overrides>`: a DVC experiment.

`conf/` is the single source of truth, and DVC's Hydra integration is off (with it, `dvc
exp run` composes into params.yaml, which the stages never read: overrides would be
silently dropped). An experiment is therefore an edit of the conf/ files themselves,
which `dvc.yaml` tracks as params, followed by `dvc exp run`. This command translates
Hydra overrides into those edits:

    clean=web                 -> conf/config.yaml   defaults.<i>.clean = web
    seed=7                    -> conf/config.yaml   seed = 7
    pretrain.max_steps=100    -> conf/pretrain/<selected option>.yaml   max_steps = 100
    clean.min_words=30        -> conf/clean/docs.yaml   steps.min_length.min_words = 30
                                 (a key not at the top of the file is looked up by name
                                 and must occur exactly once)

and applies them with a round-trip YAML editor, so comments and layout survive (`dvc exp
run -S file:key=value` does the same edit but rewrites the file without its comments;
both forms give the same experiment). `--dry-run` prints the equivalent `dvc exp run -S`
command instead of running anything.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

from pipeline.core.errors import PipelineError


def _yaml():
    from ruamel.yaml import YAML  # DVC's own YAML library: always installed with dvc

    y = YAML()
    y.preserve_quotes = True
    y.width = 4096
    return y


def _find(node, key: str, prefix: tuple = ()) -> list[tuple]:
    """Every path in a YAML tree that ends in `key`."""
    found = []
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key:
                found.append((*prefix, k))
            found += _find(v, key, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            found += _find(v, key, (*prefix, i))
    return found


def _get(node, path: tuple):
    for p in path:
        node = node[p]
    return node


def _has(node, path: tuple) -> bool:
    try:
        _get(node, path)
        return True
    except (KeyError, IndexError, TypeError):
        return False


def _parse_value(raw: str):
    """Hydra's value grammar is close to YAML's for scalars and flow lists/dicts."""
    from ruamel.yaml import YAML

    if raw == "":
        return ""
    return YAML(typ="safe").load(raw)


def translate(overrides: list[str], conf: Path) -> list[tuple[Path, tuple, object, str]]:
    """(file, key path, value, raw value) edits for Hydra-style overrides."""
    from pipeline.core.config import groups

    y = _yaml()
    config_file = conf / "config.yaml"
    top = y.load(config_file.read_text())
    defaults = top.get("defaults") or []
    group_pos = {next(iter(d)): i for i, d in enumerate(defaults) if isinstance(d, dict)}
    selected = {g: str(d[g]) for d in defaults if isinstance(d, dict) for g in d}
    known = groups(conf)
    edits = []
    parsed = []
    for ov in overrides:
        if ov.startswith(("+", "~")) or "=" not in ov:
            raise PipelineError(
                f"exp override {ov!r}: use key=value or group=option; an experiment edits keys that conf/ already has"
            )
        key, raw = ov.split("=", 1)
        parsed.append((key.strip(), raw))
    for key, raw in parsed:  # group switches first: later keys go to the newly selected option
        if key in known:
            if raw not in known[key]:
                raise PipelineError(f"exp: {key}={raw}: no conf/{key}/{raw}.yaml (options: {', '.join(known[key])})")
            if key not in group_pos:
                raise PipelineError(f"exp: group {key!r} is not in the defaults list of {config_file}")
            selected[key] = raw
            edits.append((config_file, ("defaults", group_pos[key], key), raw, raw))
    for key, raw in parsed:
        if key in known:
            continue
        parts = key.split(".")
        if parts[0] in known:
            if parts[0] not in selected:
                raise PipelineError(f"exp: group {parts[0]!r} has no selected option in {config_file}")
            file = conf / parts[0] / f"{selected[parts[0]]}.yaml"
            rest = tuple(int(p) if p.isdigit() else p for p in parts[1:])
        else:
            file, rest = config_file, tuple(int(p) if p.isdigit() else p for p in parts)
        data = y.load(file.read_text())
        if not _has(data, rest):
            hits = _find(data, rest[-1]) if len(rest) == 1 else []
            if len(hits) != 1:
                where = f" (found at {', '.join('.'.join(map(str, h)) for h in hits)})" if hits else ""
                raise PipelineError(f"exp: {key} is not a key of {file}{where}")
            rest = hits[0]
        edits.append((file, rest, _parse_value(raw), raw))
    return edits


def apply(edits, conf: Path) -> None:
    """Write the edits into the conf files, keeping their comments and layout."""
    y = _yaml()
    by_file: dict[Path, list] = {}
    for file, path, value, _ in edits:
        by_file.setdefault(file, []).append((path, value))
    for file, items in by_file.items():
        data = y.load(file.read_text())
        for path, value in items:
            _get(data, path[:-1])[path[-1]] = value
        with open(file, "w") as f:
            y.dump(data, f)


def dvc_form(edits, conf: Path) -> list[str]:
    root = conf.parent
    return [
        f"{file.relative_to(root) if file.is_relative_to(root) else file}:{'.'.join(map(str, path))}={raw}"
        for file, path, _, raw in edits
    ]


def main(argv: list[str]) -> int:
    from pipeline.apps.runner import in_dvc_repo
    from pipeline.core.config import conf_dir

    parser = argparse.ArgumentParser(
        prog="python -m pipeline exp",
        description="Run a DVC experiment with Hydra-style overrides written into conf/ (the single source of truth).",
    )
    parser.add_argument("--name", "-n", help="experiment name (dvc exp run -n)")
    parser.add_argument("--dry-run", action="store_true", help="print the equivalent `dvc exp run -S` and stop")
    parser.add_argument("overrides", nargs="+", help="e.g. clean.min_words=30 pretrain.max_steps=100 clean=web")
    args = parser.parse_intermixed_args(argv)
    conf = conf_dir()
    edits = translate(args.overrides, conf)
    specs = dvc_form(edits, conf)
    cmd = [sys.executable, "-m", "dvc", "exp", "run", *(["-n", args.name] if args.name else [])]
    if args.dry_run:
        print(shlex.join(["dvc", "exp", "run", *(["-n", args.name] if args.name else []),
                          *(a for s in specs for a in ("-S", s))]))
        return 0
    if not in_dvc_repo():
        raise PipelineError("exp needs a DVC project: run it in the directory that holds dvc.yaml and .dvc/")
    if conf.parent.resolve() != Path.cwd().resolve():
        raise PipelineError(f"exp edits {conf}, which is not this DVC project's conf/ ({Path.cwd() / 'conf'})")
    apply(edits, conf)
    for s in specs:
        print(f"set {s}", file=sys.stderr)
    return subprocess.run(cmd).returncode
