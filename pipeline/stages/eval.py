"""Eval stage: held-out bits per byte and perplexity for the pretrained model, the fine-tuned
model, an LSTM baseline and an interpolated Kneser-Ney n-gram baseline (all on exactly the
same tokens), BLEU and ROUGE-1/2/L on held-out fine-tuning pairs, samples, plots, the
comparison with the parent run and the release gate -> ``reports/``.

The report is always written; when the gate fails it says FAILED and, with
``eval.gate.fail=true``, the stage then raises, so DVC and the Prefect flow stop there and
a scheduled run never publishes a model worse than the last published one.

The work lives in ``pipeline.evaluation`` (heldout, baselines, scoring, samples, metrics,
parent, report); the report's text in its templates. Model code is imported lazily there,
so this module imports without torch models being importable.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path

from pipeline.core.artifacts import (
    Timer,
    atomic_dir,
    code_version,
    require_dir,
    write_json,
    write_summary,
)
from pipeline.core.config import config_hash, to_container
from pipeline.evaluation import baselines, samples, scoring
from pipeline.evaluation import metrics as M
from pipeline.evaluation import parent as P
from pipeline.evaluation import report as R
from pipeline.evaluation.heldout import load_heldout, pairs_sha256, read_pairs
from pipeline.model.runs import CKPT, resolve_device
from pipeline.stages import registry
from pipeline.tokenize.bpe import load as load_tokenizer
from pipeline.tokenize.shards import open_split, read_index


def run(cfg) -> dict:
    timer, ec, seed = Timer(), cfg.eval, int(cfg.seed)
    root = Path(cfg.paths.root)
    tok_dir = require_dir(cfg.paths.tokenizer, "tokenizer", "tokenizer")
    shards_dir = require_dir(cfg.paths.shards, "token shards", "shard")
    pre_dir = require_dir(cfg.paths.pretrain, "pretrained model", "pretrain")
    ft_dir = Path(cfg.paths.finetune)
    runs = {"pretrain": pre_dir, **({"finetune": ft_dir} if (ft_dir / CKPT).is_file() else {})}
    paths = {"root": root, "finetune": ft_dir, "pairs": ft_dir / "sft" / "heldout.jsonl",
             "funnel": Path(cfg.paths.clean) / "funnel.json", "stats": tok_dir / "stats.json"}
    batch_size, stride, max_new = int(ec.get("batch_size", 8)), ec.get("stride"), int(ec.max_new_tokens)
    device = resolve_device(ec.get("device", "auto"), "eval.device")
    timings: dict[str, float] = {}

    # the held-out tokens every model scores, and the held-out fine-tuning pairs (with the run)
    tokenizer = load_tokenizer(tok_dir)
    vocab_size = int(tokenizer.get_vocab_size())
    index = read_index(shards_dir)
    heldout = load_heldout(shards_dir, index, tokenizer, int(ec.max_val_tokens))
    pairs = read_pairs(paths["pairs"], int(ec.max_heldout_pairs))

    # baselines, fit here on the train split
    with _timed(timings, "ngram"):
        ngram_scores, ngram = baselines.ngram(open_split(shards_dir, "train", index), heldout, vocab_size, ec)
    results: dict[str, dict] = {"ngram": ngram_scores}
    lstm = None
    if baselines.lstm_enabled(ec):
        with _timed(timings, "lstm"):
            results["lstm"], lstm = baselines.lstm(open_split(shards_dir, "train", index), heldout, vocab_size, ec, seed,
                                                   device)

    # each model: bits per byte, samples, answers to the held-out questions and their BLEU / ROUGE
    prompts = [str(p) for p in ec.prompts]
    continuations: dict[str, list[str]] = {}
    answers: dict[str, list[str]] = {}
    block_sizes: dict[str, int] = {}
    for name, run_dir in runs.items():
        model, meta = scoring.load_model(run_dir, seed)
        model = model.to(device)
        block_sizes[name] = int(meta["block_size"])
        with _timed(timings, f"{name}_score"):
            results[name] = scoring.score(model, heldout, block_sizes[name], batch_size, stride)
        with _timed(timings, f"{name}_generate"):
            continuations[name] = samples.continuations(model, tokenizer, prompts, max_new, seed)
            if pairs:
                answers[name] = samples.answers(model, tokenizer, pairs, max_new, seed)
                results[name].update(M.generation_scores(answers[name], [p["answer"] for p in pairs]))
        del model

    # the parent run and the release gate
    resolved = to_container(cfg)
    history = P.history_dir_for(ec, root)
    comparison = P.compare(ec, history, resolved, results)
    gate, parent = comparison["gate"], comparison["parent"]
    parent_view = R.parent_view(parent, heldout.sha256, root)
    metrics_json = {
        **results,
        "val_tokens": heldout.n_tokens,
        "val_bytes": heldout.n_bytes,
        "heldout_pairs": len(pairs),
        "pretrain_beats_ngram": bool(results["pretrain"]["val_bpb"] < results["ngram"]["val_bpb"]),
        "gate": gate["status"],
    }

    # the report
    inputs = {"tokenizer": tok_dir, "shards": shards_dir, "pretrain": pre_dir}
    if "finetune" in runs:
        inputs["finetune"] = ft_dir
    if paths["funnel"].is_file():
        inputs["funnel"] = paths["funnel"]
    lineage = R.lineage(inputs, root)
    version = code_version()
    curves = {name: R.read_curves(d) for name, d in runs.items()}
    groups = [g for s in registry.STAGES for g in s.groups()] + ["executor"]
    context = R.context(
        results=results, heldout=heldout, pairs=pairs, answers=answers, prompts=prompts,
        continuations=continuations, ngram=ngram, lstm=lstm, block_sizes=block_sizes, runs=runs, curves=curves,
        tokenizer=tokenizer, paths=paths, comparison=comparison, parent=parent_view, lineage=lineage,
        config_sha256=config_hash(cfg), code_version=version,
        stage_configs=R.config_group_hashes(resolved, groups), max_new_tokens=max_new,
        examples=int(ec.get("report_examples", 5)),
    )
    out = Path(cfg.paths.reports)
    with atomic_dir(out) as tmp:
        R.write(tmp, context, results, curves)
        write_json(tmp / "metrics.json", metrics_json)
        summary = write_summary(
            tmp, "eval", cfg, inputs, timer,
            metrics=metrics_json,
            ngram_train_tokens=ngram["train_tokens"],
            models=list(runs),
            device=device,
            finetune_present="finetune" in runs,
            timings=timings,
            lstm=lstm,
            gate=gate,
            parent=parent_view,
            heldout_sha256=heldout.sha256,
            outputs=sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file()),
        )
    record = P.append_history(history, {
        "metrics": results, "config": resolved, "gate": gate, "heldout_sha256": heldout.sha256,
        "heldout_pairs_sha256": pairs_sha256(pairs), "artifacts": {a["name"]: a["sha256"] for a in lineage},
        "config_sha256": config_hash(cfg), "code_version": version,
        "parent": parent["source"] if parent else None,
    })
    summary["history_record"] = str(record)
    P.enforce_gate(gate, ec.get("gate"), parent, out / "report.md")
    return summary


@contextmanager
def _timed(timings: dict[str, float], key: str):
    t0 = time.perf_counter()
    yield
    timings[key] = round(time.perf_counter() - t0, 3)
