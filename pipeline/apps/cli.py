"""`python -m pipeline <stage|run|generate> [hydra overrides]`.

Every path ends in a stage's `run(cfg)`; this module only parses arguments and turns
user errors into one line on stderr and a non-zero exit.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys

from pipeline.core.errors import PipelineError
from pipeline.stages import registry

def _usage() -> str:
    from pipeline.core.config import groups

    lines = [
        "usage: python -m pipeline <command> [hydra overrides ...]",
        "",
        "stages (each reads the previous stage's output and writes its own directory):",
        *(f"  {s.name:<10} {s.help}" for s in registry.STAGES),
        "",
        "other commands:",
        "  run        every stage in order through the Prefect flow `build-model`: run [--stages a,b] [--force]",
        "  shard --verify  check every token file against data/shards/index.json (exit 1 if any is corrupt)",
        "  generate   sample text, streamed: generate --prompt \"...\" [--max-new-tokens N] [--temperature T]",
        "             [--top-k K] [--top-p P] [--seed S] [--no-cache] [--model pretrain|finetune] [--device auto|cpu|cuda]",
        "             | generate --chat",
        "  serve      OpenAI-compatible API + chat page for the trained model: serve [serve.port=8000 ...]",
        "  export     write a transformers directory: export [--model latest|pretrain|finetune] [--out DIR]",
        "  exp        a DVC experiment with Hydra overrides written into conf/: exp clean.min_words=30 [--name N]",
        "  lineage    where a document id, shard file or checkpoint came from and what it fed: lineage <id|path>",
        "  dvc-yaml   write dvc.yaml from the stage registry: dvc-yaml [--check]",
        "",
        "config groups (select with group=option, e.g. source=files):",
    ]
    try:
        for g, opts in groups().items():
            lines.append(f"  {g:<10} {', '.join(opts)}")
    except PipelineError as e:
        lines.append(f"  ({e})")
    lines += [
        "",
        "overrides: any key, e.g. clean.min_words=20 pretrain.max_steps=100 paths.root=/tmp/run",
        "           source=files source.paths='[/data/corpus]'",
    ]
    return "\n".join(lines)


def _one_line(exc: BaseException) -> str:
    """Hydra/OmegaConf errors span many lines; keep what names the problem."""
    msg = str(exc).strip()
    parts = [p.strip() for p in msg.splitlines() if p.strip() and not p.strip().startswith("full_key")]
    return " ".join(parts[:6]) if parts else type(exc).__name__


def _prefect_env() -> None:
    """A local run starts a temporary Prefect server; give it time to boot on small machines."""
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def _load(overrides: list[str]):
    from pipeline.core.config import load

    return load(overrides)


def _run(argv: list[str]) -> int:
    """The flow, stopped cleanly by SIGTERM as by Ctrl-C: the training subprocess checkpoints,
    the temporary Prefect server stops, and the exit code says which signal it was."""
    parser = argparse.ArgumentParser(prog="python -m pipeline run")
    parser.add_argument("--stages", default=None, help="comma-separated subset, e.g. pretrain,finetune,eval")
    parser.add_argument("--force", action="store_true", help="run the stages even when DVC says they are up to date")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args(argv)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()] if args.stages else None
    _prefect_env()
    from pipeline.apps.flow import build_model

    received: list[int] = []

    def on_sigterm(signum, frame):
        received.append(signum)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        build_model(overrides=args.overrides, stages=stages, force=args.force)
    except KeyboardInterrupt:
        name = signal.Signals(received[0]).name if received else "SIGINT"
        print(f"error: run stopped by {name}; a training stage's checkpoint is kept and the same command resumes it",
              file=sys.stderr)
        return 128 + (received[0] if received else signal.SIGINT)
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


def _generate(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline generate")
    parser.add_argument("--prompt", help="text to continue (a fine-tuned model gets it as a chat question)")
    parser.add_argument("--chat", action="store_true", help="interactive chat: one user turn per line, /reset, /exit")
    parser.add_argument("--system", default=None, help="system message for --chat")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=40, help="0 = no top-k filter")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold, e.g. 0.9")
    parser.add_argument("--seed", type=int, default=None, help="sampling seed (default: the config's seed)")
    parser.add_argument("--no-cache", action="store_true", help="recompute the context every step (no KV cache)")
    parser.add_argument("--model", choices=["latest", "pretrain", "finetune"], default="latest")
    parser.add_argument("--device", default="auto", help="auto (cuda when available) | cpu | cuda | cuda:N")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    if not args.chat and args.prompt is None:
        parser.error("--prompt is required (or use --chat)")
    cfg = _load(args.overrides)
    from pipeline.apps.generate import chat, generate_from_run
    from pipeline.model.runs import load_run, resolve_device

    seed = int(cfg.seed) if args.seed is None else args.seed
    top_k = args.top_k or None

    def out(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    if args.chat:
        model, tokenizer, _ = load_run(cfg, args.model, resolve_device(args.device, "--device"))
        interactive = sys.stdin.isatty()
        if interactive:
            print("chat with the model: one message per line, /reset to start over, /exit to quit")
        chat(model, tokenizer, sys.stdin, write=out, max_new_tokens=args.max_new_tokens,
             temperature=args.temperature, top_k=top_k, top_p=args.top_p, seed=seed, system=args.system,
             prompt=(lambda: out("> ")) if interactive else None)
        return 0
    generate_from_run(cfg, args.prompt, which=args.model, max_new_tokens=args.max_new_tokens,
                      temperature=args.temperature, top_k=top_k, top_p=args.top_p, seed=seed,
                      use_cache=not args.no_cache, on_text=out, device=args.device)
    print()
    return 0


def _export(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline export")
    parser.add_argument("--model", choices=["latest", "pretrain", "finetune"], default="latest")
    parser.add_argument("--out", default=None, help="output directory (default: <run>/hf)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    cfg = _load(args.overrides)
    from pipeline.apps.export import run as export_run

    print(json.dumps(export_run(cfg, args.model, args.out)))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if any(a in ("-h", "--help") for a in rest) and command not in ("run", "generate", "export", "exp", "lineage", "dvc-yaml"):
        print(_usage())
        return 0
    try:
        from hydra.errors import HydraException
        from omegaconf.errors import OmegaConfBaseException

        try:
            if command == "shard" and "--verify" in rest:
                from pipeline.stages.shard import verify_command

                return verify_command(_load([a for a in rest if a != "--verify"]))
            if command in registry.NAMES:
                from pipeline.apps.runner import stage_module
                from pipeline.core.lock import workspace_lock

                cfg = _load(rest)
                with workspace_lock(cfg.paths.root, what=f"stage {command}"):
                    summary = stage_module(command).run(cfg)
                print(json.dumps({k: v for k, v in summary.items() if k not in ("config", "inputs")}, default=str))
                return 0
            if command == "run":
                return _run(rest)
            if command == "generate":
                return _generate(rest)
            if command == "export":
                return _export(rest)
            if command == "serve":
                from pipeline.apps.serve.launch import run as serve_run

                serve_run(_load(rest))
                return 0
            if command == "exp":
                from pipeline.apps.experiments import main as exp_main

                return exp_main(rest)
            if command == "dvc-yaml":
                from pipeline.apps.dvc_yaml import main as dvc_yaml_main

                return dvc_yaml_main(rest)
            if command == "lineage":
                from pipeline.apps.lineage import main as lineage_main

                return lineage_main(rest)
            raise PipelineError(
                f"unknown stage or command {command!r}; expected one of: "
                f"{', '.join([*registry.NAMES, 'run', 'generate', 'export', 'serve', 'exp', 'lineage', 'dvc-yaml'])}"
            )
        except (HydraException, OmegaConfBaseException) as e:
            raise PipelineError(f"config error: {_one_line(e)}") from e
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
