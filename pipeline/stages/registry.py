"""The stages, declared once: the CLI, the runner, the Prefect flow, the report and the
generated `dvc.yaml` all read this table, so a stage is added or changed in one place.

Names only (module paths, config keys): importing the registry imports no stage.
"""

from __future__ import annotations

from dataclasses import dataclass

HOUR = 3600.0


@dataclass(frozen=True)
class Stage:
    name: str                     # CLI command, DVC stage, Prefect task and `_summary.json` "stage"
    help: str
    inputs: tuple[str, ...]       # `paths.*` keys it reads (upstream outputs)
    output: str                   # the `paths.*` key of the directory it writes atomically
    config: tuple[str, ...]       # what it reads of conf/: a group (`clean`), `group.key` or a top-level key (`seed`)
    retries: int = 0              # Prefect task retries (network stages; training resumes from its checkpoint)
    timeout: float = 3 * HOUR     # seconds before the flow cancels the task (0: no limit)
    subprocess: bool = False      # run as `python -m pipeline <stage>` (DDP launchers re-execute the command line)
    data_deps: tuple[str, ...] = ()   # non-Python files it reads, relative to the project
    dvc_outs: tuple[str, ...] = ()    # DVC outs under the output dir, when not the whole dir
    dvc_metrics: tuple[str, ...] = ()  # DVC metrics (not cached) under the output dir

    @property
    def module(self) -> str:
        return f"pipeline.stages.{self.name}"

    def groups(self) -> list[str]:
        """The config groups it reads (for per-stage config hashes)."""
        return [c for c in self.config if "." not in c and c not in TOP_LEVEL_KEYS]


TOP_LEVEL_KEYS = ("seed",)

STAGES: tuple[Stage, ...] = (
    Stage("ingest", "fetch documents (crawl / WARC / files / datasets) into data/raw/ Parquet shards",
          inputs=(), output="raw", config=("source",), retries=2),
    Stage("clean", "HTML to text, normalise, filter, dedup, decontaminate -> data/clean/ + funnel.json",
          inputs=("raw",), output="clean",
          config=("clean", "shard.val_fraction", "finetune.data", "finetune.max_pairs")),
    Stage("tokenizer", "train a byte-level BPE tokenizer -> data/tokenizer/tokenizer.json",
          inputs=("clean",), output="tokenizer", config=("tokenizer", "shard.val_fraction", "seed"),
          timeout=1 * HOUR, data_deps=("conf/tokenizer/lang_samples.json",)),
    Stage("shard", "encode documents into memory-mappable token files -> data/shards/",
          inputs=("clean", "tokenizer"), output="shards", config=("shard", "seed")),
    Stage("pretrain", "train the decoder-only transformer with Lightning -> models/pretrain/",
          inputs=("shards", "tokenizer"), output="pretrain", config=("model", "pretrain", "hardware", "seed"),
          retries=1, timeout=48 * HOUR, subprocess=True),
    Stage("finetune", "supervised fine-tuning on question/answer pairs -> models/finetune/",
          inputs=("clean", "tokenizer", "pretrain"), output="finetune",
          config=("finetune", "hardware", "shard.val_fraction", "seed"), retries=1, timeout=24 * HOUR, subprocess=True),
    Stage("eval", "bits-per-byte, perplexity, BLEU/ROUGE, samples, release gate -> reports/",
          inputs=("clean", "tokenizer", "shards", "pretrain", "finetune"), output="reports", config=("eval", "seed"),
          dvc_outs=("report.md", "report.html", "plots", "curves"), dvc_metrics=("metrics.json",)),
)

NAMES: tuple[str, ...] = tuple(s.name for s in STAGES)
BY_NAME: dict[str, Stage] = {s.name: s for s in STAGES}


def get(name: str) -> Stage:
    from pipeline.core.errors import PipelineError

    if name not in BY_NAME:
        raise PipelineError(f"unknown stage {name!r}; expected one of {', '.join(NAMES)}")
    return BY_NAME[name]


def downstream(names) -> list[str]:
    """The stages that read, directly or not, the output of any of `names` (these included), in order."""
    dirty = set(names)
    for s in STAGES:
        if any(BY_NAME_BY_OUTPUT.get(i) in dirty for i in s.inputs):
            dirty.add(s.name)
    return [s.name for s in STAGES if s.name in dirty]


BY_NAME_BY_OUTPUT: dict[str, str] = {s.output: s.name for s in STAGES}
