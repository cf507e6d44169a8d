"""`python -m pipeline dvc-yaml [--check]`: write `dvc.yaml` from the stage registry.

Each stage's `deps` are its upstream outputs, the Python files of its entry point's import
closure (every `pipeline` module it imports, also inside functions, plus the modules that its
conf files name as `_target_`) and the data files it declares; its `params` are the conf
files of the groups it reads (every option file, so an edit is seen after a group switch),
their position in `conf/config.yaml`'s defaults list (which option is selected) and the
single keys it reads. Editing any of them makes exactly the stages that use it stale.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import re
import sys
from pathlib import Path

import yaml

import pipeline
from pipeline.core.errors import PipelineError
from pipeline.stages.registry import STAGES, TOP_LEVEL_KEYS, Stage

PKG_DIR = Path(pipeline.__file__).resolve().parent
HEADER = (
    "# Generated from pipeline/stages/registry.py by `python -m pipeline dvc-yaml`; do not edit.\n"
    "# deps: upstream outputs + the import closure of the stage's code; params: the conf/ it reads.\n"
)
# `dvc plots show` / `dvc plots diff`: the eval stage writes the curves as tidy step,loss files
PLOTS = [
    {"pretraining-loss": {"title": "pretraining loss (nats/token)", "x": "step",
                          "y": {"reports/curves/pretrain_train.csv": "loss", "reports/curves/pretrain_val.csv": "loss"}}},
    {"fine-tuning-loss": {"title": "fine-tuning loss (nats/token)", "x": "step",
                          "y": {"reports/curves/finetune_train.csv": "loss", "reports/curves/finetune_val.csv": "loss"}}},
    "reports/plots",
]
_TARGET = re.compile(r"_target_:\s*['\"]?(pipeline(?:\.\w+)+)")


def module_file(name: str) -> Path | None:
    parts = name.split(".")[1:]
    if not parts:
        return PKG_DIR / "__init__.py"
    rel = Path(*parts)
    for cand in (PKG_DIR / rel.with_suffix(".py"), PKG_DIR / rel / "__init__.py"):
        if cand.is_file():
            return cand
    return None


def _imports(path: Path) -> set[str]:
    """Every `pipeline.*` module that the file imports, at any depth of the code."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "pipeline"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and \
                node.module.split(".")[0] == "pipeline":
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}  # `from pipeline.x import module`
    return out


def import_closure(module: str, extra: tuple[str, ...] = ()) -> list[Path]:
    """The files of `module` and of everything it imports from `pipeline`, with the package
    `__init__.py` files that importing them runs."""
    seen: set[Path] = set()
    todo = [module, *extra]
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # parent packages run their __init__
            f = module_file(".".join(parts[:i]))
            if f is None or f in seen:
                continue
            seen.add(f)
            todo.extend(_imports(f))
    return sorted(seen)


def _target_modules(files: list[Path]) -> tuple[str, ...]:
    mods = set()
    for f in files:
        for m in _TARGET.findall(f.read_text()):
            mods.add(m.rsplit(".", 1)[0])
    return tuple(sorted(mods))


# Groups whose options (`# @package _global_`) may set any other group's keys: every stage reads them.
GLOBAL_GROUPS = ("recipe",)


def _defaults(conf: Path) -> list:
    return yaml.safe_load((conf / "config.yaml").read_text()).get("defaults") or []


def stage_yaml(stage: Stage, root: Path, conf: Path, paths: dict[str, str]) -> dict:
    defaults = _defaults(conf)
    position = {next(iter(d)): i for i, d in enumerate(defaults) if isinstance(d, dict)}
    top_keys: list[str] = []
    files: dict[str, list[str] | None] = {}
    conf_files: list[Path] = []
    for item in (*stage.config, *(g for g in GLOBAL_GROUPS if (conf / g).is_dir())):
        group, _, key = item.partition(".")
        if item in TOP_LEVEL_KEYS:
            top_keys.append(item)
            continue
        if not (conf / group).is_dir():
            raise PipelineError(f"stage {stage.name} reads config group {group!r}, but {conf / group} does not exist")
        if group not in position:
            raise PipelineError(f"config group {group!r} is not in the defaults list of {conf / 'config.yaml'}")
        top_keys.append(f"defaults.{position[group]}")
        for f in sorted((conf / group).glob("*.yaml")):
            rel = f.relative_to(root).as_posix()
            conf_files.append(f)
            if key:
                if key in (yaml.safe_load(f.read_text()) or {}) and files.get(rel, []) is not None:
                    files.setdefault(rel, []).append(key)
            else:
                files[rel] = None
    params: list = []
    if top_keys:
        params.append({(conf / "config.yaml").relative_to(root).as_posix(): sorted(set(top_keys))})
    params += [{f: keys} for f, keys in files.items()]
    code = import_closure(stage.module, _target_modules(conf_files))
    deps = [paths[i] for i in stage.inputs]
    deps += [p.relative_to(root).as_posix() for p in code]
    deps += list(stage.data_deps)
    out_dir = paths[stage.output]
    entry: dict = {"cmd": f"python -m pipeline {stage.name}", "deps": deps, "params": params}
    entry["outs"] = [f"{out_dir}/{o}" for o in stage.dvc_outs] if stage.dvc_outs else [out_dir]
    if stage.dvc_metrics:
        entry["metrics"] = [{f"{out_dir}/{m}": {"cache": False}} for m in stage.dvc_metrics]
    return entry


def output_paths(conf: Path) -> dict[str, str]:
    """`paths.*` as written in conf/config.yaml, relative to `paths.root`."""
    raw = yaml.safe_load((conf / "config.yaml").read_text())["paths"]
    return {k: str(v).replace("${paths.root}/", "") for k, v in raw.items() if k != "root"}


def render(root: Path) -> str:
    conf = root / "conf"
    paths = output_paths(conf)
    doc = {"stages": {s.name: stage_yaml(s, root, conf, paths) for s in STAGES}, "plots": PLOTS}
    return HEADER + yaml.safe_dump(doc, sort_keys=False, default_flow_style=False, width=120)


def main(argv: list[str]) -> int:
    from pipeline.core.config import conf_dir

    parser = argparse.ArgumentParser(prog="python -m pipeline dvc-yaml",
                                     description="Write dvc.yaml from the stage registry (--check: only compare).")
    parser.add_argument("--check", action="store_true", help="exit 1 if dvc.yaml differs from what would be written")
    args = parser.parse_args(argv)
    root = conf_dir().parent
    want, path = render(root), root / "dvc.yaml"
    have = path.read_text() if path.is_file() else ""
    if args.check:
        if have != want:
            sys.stdout.writelines(difflib.unified_diff(have.splitlines(True), want.splitlines(True),
                                                       "dvc.yaml (committed)", "dvc.yaml (from the registry)"))
            print(f"{path} is out of date: run `python -m pipeline dvc-yaml`", file=sys.stderr)
            return 1
        return 0
    path.write_text(want)
    print(f"wrote {path} ({len(STAGES)} stages)")
    return 0
