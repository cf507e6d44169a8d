"""Hydra composition and resolved-config hashing.

The compose API is used (not ``@hydra.main``): it never changes directory or creates
timestamped output dirs, so DVC outputs stay where ``paths.*`` says.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf

from pipeline.core.errors import PipelineError

PACKAGE_CONF = Path(__file__).resolve().parents[2] / "conf"


def conf_dir() -> Path:
    """The config tree in use: $PIPELINE_CONF_DIR, else ./conf, else the one beside the package."""
    env = os.environ.get("PIPELINE_CONF_DIR")
    candidates = [Path(env)] if env else []
    candidates += [Path.cwd() / "conf", PACKAGE_CONF]
    for c in candidates:
        if (c / "config.yaml").is_file():
            return c.resolve()
    raise PipelineError(f"no config found: looked for config.yaml in {', '.join(map(str, candidates))}")


def groups(conf: Path | None = None) -> dict[str, list[str]]:
    """Config groups and their options, read from the conf tree (for --help)."""
    conf = conf or conf_dir()
    return {
        d.name: sorted(p.stem for p in d.glob("*.yaml"))
        for d in sorted(conf.iterdir())
        if d.is_dir() and any(d.glob("*.yaml"))
    }


def load(overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """Compose conf/config.yaml with Hydra overrides; relative paths become absolute."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides))
    root = Path(str(cfg.paths.root)).expanduser()
    cfg.paths.root = str(root if root.is_absolute() else (Path.cwd() / root).resolve())
    OmegaConf.resolve(cfg)
    return cfg


def to_container(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def config_hash(cfg: DictConfig | dict, keys: tuple[str, ...] | None = None) -> str:
    """sha256 of the resolved config (optionally only some top-level keys), paths excluded."""
    data = to_container(cfg) if isinstance(cfg, DictConfig) else dict(cfg)
    data.pop("paths", None)
    if keys is not None:
        data = {k: data.get(k) for k in keys}
    blob = json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


def train_settings(cfg: DictConfig, stage: str) -> dict:
    """A training stage's recipe (`cfg.<stage>`) with the machine's settings (`cfg.hardware`)
    beside it: one flat dict for the Trainer, the launcher and the run fingerprint."""
    hardware = to_container(cfg.hardware) if cfg.get("hardware") is not None else {}
    recipe = to_container(cfg[stage])
    clash = sorted(set(hardware) & set(recipe))
    if clash:
        raise PipelineError(f"{stage} sets {', '.join(clash)}, which belong to the hardware group: "
                            f"use hardware.{clash[0]}=... instead of {stage}.{clash[0]}=...")
    return {**hardware, **recipe}
