"""Eval stage: held-out bits per byte and perplexity for the pretrained model, the fine-tuned
model, an LSTM baseline and an interpolated Kneser-Ney n-gram baseline (all on exactly the
same tokens), BLEU and ROUGE-1/2/L on held-out fine-tuning pairs, samples, plots, the
comparison with the parent run and the release gate -> ``reports/``.

The report is always written; when the gate fails it says FAILED and, with
``eval.gate.fail=true``, the stage then raises, so DVC and the Prefect flow stop there and
a scheduled run never publishes a model worse than the last published one.

Model code (``pipeline.model.runs``, ``pipeline.apps.generate``, ``pipeline.training.sft_data``) is imported
lazily, so this package imports without torch models being importable.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np

from pipeline.core.artifacts import (
    Timer,
    atomic_dir,
    code_version,
    hash_tree,
    read_json,
    require_dir,
    write_json,
    write_summary,
)
from pipeline.core.errors import PipelineError
from pipeline.stages import registry
from pipeline.evaluation import metrics as M
from pipeline.evaluation import parent as P
from pipeline.evaluation import report as R
from pipeline.evaluation.ngram import KneserNey, stream_chunks
from pipeline.tokenize.bpe import load as load_tokenizer
from pipeline.tokenize.shards import open_split, read_index
from pipeline.tokenize.special import STOP_STRINGS

# ------------------------------------------------------------------ seams (lazy imports)

def _load_model(run_dir: Path):
    """(model in eval mode, meta) from a training run directory."""
    from pipeline.model.runs import load_trained, require_causal_gpt

    model, meta = load_trained(run_dir)
    require_causal_gpt(model, run_dir, "the evaluation report")
    model.eval()
    return model, meta


def _generate(model, tokenizer, prompt: str, max_new_tokens: int, seed: int) -> str:
    from pipeline.model.sampling import generate

    return generate(model, tokenizer, prompt, max_new_tokens, temperature=0.0, top_k=None, seed=seed)


def _chat_prompt(question: str) -> str:
    from pipeline.tokenize.special import chat_prompt

    return chat_prompt(question)


def _token_byte_lengths(tokenizer) -> np.ndarray:
    from pipeline.tokenize.bpe import token_byte_lengths

    return np.asarray(token_byte_lengths(tokenizer), dtype=np.int64)


# ------------------------------------------------------------------ inputs

def read_tokens(arrays: list[np.ndarray], max_tokens: int) -> np.ndarray:
    """The first ``max_tokens`` tokens of a split (all of it when max_tokens <= 0), as int64."""
    pieces = list(stream_chunks(arrays, max_tokens if max_tokens > 0 else None))
    return np.concatenate(pieces).astype(np.int64) if pieces else np.zeros(0, np.int64)


def read_pairs(path: Path, limit: int) -> list[dict]:
    pairs = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if len(pairs) >= limit:
                break
            if not line.strip():
                continue
            row = json.loads(line)
            if str(row.get("question", "")).strip() and str(row.get("answer", "")).strip():
                pairs.append({"question": str(row["question"]), "answer": str(row["answer"])})
    return pairs


def clean_answer(text: str) -> str:
    """A generated answer up to the first chat/end marker."""
    cut = len(text)
    for s in STOP_STRINGS:
        i = text.find(s)
        if i >= 0:
            cut = min(cut, i)
    return text[:cut].strip()


def _rel(path: Path, root: Path) -> str:
    try:
        return Path(path).resolve().relative_to(Path(root).resolve()).as_posix()
    except ValueError:
        return str(path)


def _r(x: float, digits: int = 6) -> float:
    return round(float(x), digits)


# ------------------------------------------------------------------ stage

def run(cfg) -> dict:
    timer = Timer()
    ec = cfg.eval
    seed = int(cfg.seed)
    timings: dict[str, float] = {}

    tok_dir = require_dir(cfg.paths.tokenizer, "tokenizer", "tokenizer")
    shards_dir = require_dir(cfg.paths.shards, "token shards", "shard")
    pre_dir = require_dir(cfg.paths.pretrain, "pretrained model", "pretrain")
    ft_dir = Path(cfg.paths.finetune)
    has_ft = ft_dir.is_dir()
    funnel_path = Path(cfg.paths.clean) / "funnel.json"
    stats_path = tok_dir / "stats.json"

    tokenizer = load_tokenizer(tok_dir)
    index = read_index(shards_dir)
    byte_len = _token_byte_lengths(tokenizer)
    vocab_size = int(tokenizer.get_vocab_size())

    # the held-out stream: tokens 1..N-1 of the first N val tokens are scored by everyone
    val = read_tokens(open_split(shards_dir, "val", index), int(ec.max_val_tokens))
    if len(val) < 2:
        raise PipelineError(f"the val split in {shards_dir} has {len(val)} tokens; need at least 2 to evaluate")
    if int(val.max()) >= len(byte_len):
        raise PipelineError(
            f"val token id {int(val.max())} is outside the tokenizer's vocabulary ({len(byte_len)}): "
            f"the shards and tokenizer disagree; rerun `python -m pipeline shard`"
        )
    val_tokens = len(val) - 1
    val_bytes = int(byte_len[val[1:]].sum())
    if val_bytes <= 0:
        raise PipelineError(f"the scored val tokens in {shards_dir} decode to 0 bytes")

    # n-gram baseline
    t0 = time.perf_counter()
    cap = int(ec.get("ngram_max_train_tokens", 0) or 0)
    kn = KneserNey(int(ec.ngram_order), float(ec.ngram_discount), vocab_size)
    kn.fit(stream_chunks(open_split(shards_dir, "train", index), cap or None), vocab_size)
    ng_nats, ng_count = kn.nats(val, start=1)
    assert ng_count == val_tokens
    timings["ngram"] = round(time.perf_counter() - t0, 3)
    results: dict[str, dict] = {
        "ngram": {"val_bpb": _r(M.bits_per_byte(ng_nats, val_bytes)), "val_ppl": _r(M.perplexity(ng_nats, ng_count))}
    }

    # LSTM baseline: trained here on the train split, scored like the transformers
    lstm_info = None
    lc = ec.get("lstm")
    if lc is not None and bool(lc.get("enabled", True)):
        from pipeline.evaluation.lstm_baseline import train_lstm

        t0 = time.perf_counter()
        lstm, lstm_info = train_lstm(open_split(shards_dir, "train", index), vocab_size, lc, seed)
        nats, count = M.score_model(lstm, val, int(lc.get("score_block", 256)), int(ec.get("batch_size", 8)),
                                    stride=ec.get("stride"))
        assert count == val_tokens
        results["lstm"] = {"val_bpb": _r(M.bits_per_byte(nats, val_bytes)), "val_ppl": _r(M.perplexity(nats, count))}
        timings["lstm"] = round(time.perf_counter() - t0, 3)
        del lstm

    # held-out fine-tuning pairs (they live with the fine-tuning run)
    pairs_path = ft_dir / "sft" / "heldout.jsonl"
    pairs = read_pairs(pairs_path, int(ec.max_heldout_pairs)) if has_ft and pairs_path.is_file() else []

    runs = {"pretrain": pre_dir, **({"finetune": ft_dir} if has_ft else {})}
    samples = [{"prompt": str(p), "outputs": []} for p in ec.prompts]
    generated: dict[str, list[str]] = {}
    block_sizes: dict[str, int] = {}
    max_new = int(ec.max_new_tokens)
    for name, run_dir in runs.items():
        import torch

        torch.manual_seed(seed)
        model, meta = _load_model(run_dir)
        block_sizes[name] = int(meta["block_size"])
        t0 = time.perf_counter()
        nats, count = M.score_model(
            model, val, block_sizes[name], int(ec.get("batch_size", 8)), stride=ec.get("stride")
        )
        timings[f"{name}_score"] = round(time.perf_counter() - t0, 3)
        assert count == val_tokens
        results[name] = {"val_bpb": _r(M.bits_per_byte(nats, val_bytes)), "val_ppl": _r(M.perplexity(nats, count))}
        t0 = time.perf_counter()
        for s in samples:
            s["outputs"].append((name, _generate(model, tokenizer, s["prompt"], max_new, seed)))
        if pairs:
            answers = [clean_answer(_generate(model, tokenizer, _chat_prompt(p["question"]), max_new, seed)) for p in pairs]
            refs = [p["answer"] for p in pairs]
            generated[name] = answers
            results[name]["bleu"] = _r(M.bleu(answers, refs), 4)
            results[name]["rouge1"] = _r(M.rouge_n(answers, refs, 1), 4)
            results[name]["rouge2"] = _r(M.rouge_n(answers, refs, 2), 4)
            results[name]["rougeL"] = _r(M.rouge_l(answers, refs), 4)
        timings[f"{name}_generate"] = round(time.perf_counter() - t0, 3)
        del model

    beats = results["pretrain"]["val_bpb"] < results["ngram"]["val_bpb"]
    metrics_json = {
        **results,
        "val_tokens": val_tokens,
        "val_bytes": val_bytes,
        "heldout_pairs": len(pairs),
        "pretrain_beats_ngram": bool(beats),
    }
    # what the numbers were measured on: a parent run on other held-out text is flagged
    heldout_sha = hashlib.sha256(np.ascontiguousarray(val, dtype="<i8").tobytes()).hexdigest()
    pairs_sha = hashlib.sha256(json.dumps(pairs, sort_keys=True).encode()).hexdigest()

    # ------------------------------------------------------------ parent run and release gate
    from pipeline.core.config import to_container

    history_dir = Path(str(ec.get("history_dir") or Path(cfg.paths.root) / "runs" / "eval"))
    parent = P.load_parent(ec.get("parent"), history_dir)
    resolved = to_container(cfg)
    gate = P.check_gate(ec.get("gate") or {}, parent, results)
    changes = P.metric_changes((parent or {}).get("metrics"), results)
    cfg_diff = P.config_diff((parent or {}).get("config"), resolved)
    parent_view = None
    if parent is not None:
        same_text = parent.get("heldout_sha256") == heldout_sha
        parent_view = {
            "source": _rel(Path(parent["source"]), Path(cfg.paths.root)),
            "run": parent.get("run"), "created": parent.get("created"),
            "code_version": parent.get("code_version"),
            "heldout_note": "same held-out tokens as this run" if same_text else
            "the held-out tokens differ from this run's (data or tokenizer changed): "
            "bits per byte compare models on different text",
        }
    metrics_json["gate"] = gate["status"]

    # ------------------------------------------------------------ report
    root = Path(cfg.paths.root)
    inputs = {"tokenizer": tok_dir, "shards": shards_dir, "pretrain": pre_dir}
    if has_ft:
        inputs["finetune"] = ft_dir
    if funnel_path.is_file():
        inputs["funnel"] = funnel_path
    lineage = [{"name": k, "path": _rel(p, root), "sha256": hash_tree(p)} for k, p in inputs.items()]
    from pipeline.core.config import config_hash

    pre, ng = results["pretrain"]["val_bpb"], results["ngram"]["val_bpb"]
    if beats:
        headline = (
            f"The pretrained model beats the order-{kn.order} n-gram baseline: {pre:.4f} vs {ng:.4f} bits per byte "
            f"on held-out text ({(ng - pre) / ng:.1%} lower)."
        )
    else:
        headline = (
            f"The pretrained model does NOT beat the order-{kn.order} n-gram baseline: {pre:.4f} vs {ng:.4f} bits "
            f"per byte on held-out text."
        )
    notes = [
        f"Kneser-Ney baseline: order {kn.order}, discount {kn.discount}, trained on {kn.train_tokens} train tokens"
        + (f" (capped by eval.ngram_max_train_tokens={cap})." if cap and kn.train_tokens >= cap else "."),
    ]
    if has_ft:
        ft = results["finetune"]
        notes.append(f"Fine-tuned model: {ft['val_bpb']:.4f} bits per byte on the same held-out text.")
        if pairs:
            notes.append(
                f"Held-out Q&A ({len(pairs)} pairs): BLEU {results['pretrain']['bleu']:.2f} -> {ft['bleu']:.2f}, "
                f"ROUGE-L {results['pretrain']['rougeL']:.2f} -> {ft['rougeL']:.2f} (pretrained -> fine-tuned)."
            )
    else:
        notes.append(
            f"No fine-tuned model at {_rel(ft_dir, root)}: run `python -m pipeline finetune` to add it to this report."
        )
    qa_note = (
        f"No fine-tuned model at {_rel(ft_dir, root)}, so no held-out pairs: run `python -m pipeline finetune` first."
        if not has_ft
        else f"No held-out pairs found at {_rel(pairs_path, root)}."
    )
    if has_ft and not pairs:
        notes.append(qa_note + " BLEU and ROUGE-L were not computed.")

    label = {"ngram": f"n-gram (Kneser-Ney, order {kn.order})", "pretrain": "pretrained", "finetune": "fine-tuned"}
    if lstm_info:
        cfg_l = lstm_info["config"]
        label["lstm"] = (f"LSTM baseline ({cfg_l['layers']}x{cfg_l['hidden']}, {lstm_info['params'] / 1e6:.2f}M params, "
                         f"{lstm_info['steps']} steps)")
        notes.append(
            f"LSTM baseline: {results['lstm']['val_bpb']:.4f} bits per byte after {lstm_info['steps']} steps "
            f"({lstm_info['tokens_seen']} train tokens); the pretrained transformer is "
            f"{'better' if results['pretrain']['val_bpb'] < results['lstm']['val_bpb'] else 'NOT better'}."
        )
    rows = [
        {"label": label[m], "val_bpb": results[m]["val_bpb"], "val_ppl": results[m]["val_ppl"],
         "bleu": results[m].get("bleu"), "rouge1": results[m].get("rouge1"), "rouge2": results[m].get("rouge2"),
         "rougeL": results[m].get("rougeL")}
        for m in ("ngram", "lstm", "pretrain", "finetune") if m in results
    ]
    blocks = ", ".join(f"{m}: {b}" for m, b in block_sizes.items())
    window_note = (
        f"Transformers read consecutive non-overlapping windows of block_size tokens ({blocks}); each token is "
        f"predicted from the earlier tokens of its window. The n-gram model conditions on the {kn.order - 1} "
        f"previous tokens. Bits per byte = total nats / (ln 2 x UTF-8 bytes of the scored tokens); "
        f"perplexity = exp(mean nats per token)."
    )

    curves_data = {name: R.read_curves(d) for name, d in runs.items()}
    curves_notes = []
    for name, d in runs.items():
        c = curves_data[name]
        if c is None:
            curves_notes.append(f"{name}: no metrics.csv with train/val loss under {_rel(d, root)}.")
        else:
            last = {k: c[k][1][-1] for k in ("train", "val") if c[k][1]}
            best_val = min(c["val"][1]) if c["val"][1] else None
            parts = [f"last {k} loss {v:.4f}" for k, v in last.items()]
            if best_val is not None:
                parts.append(f"best val loss {best_val:.4f}")
            curves_notes.append(f"{name}: " + ", ".join(parts) + f" ({_rel(c['path'], root)}).")
    if not has_ft:
        curves_notes.append("finetune: not run.")

    funnel = R.funnel_view(read_json(funnel_path)) if funnel_path.is_file() else None
    funnel_note = f"No data funnel at {_rel(funnel_path, root)}: run `python -m pipeline clean` to produce it."

    stats = read_json(stats_path) if stats_path.is_file() else {}
    tok_rows = [
        ("vocabulary size", vocab_size),
        ("special tokens", len(tokenizer.get_added_tokens_decoder())),
        ("bytes per token (tokenizer stats.json)", _fmt(stats.get("bytes_per_token"))),
        ("bytes per token (scored held-out tokens)", f"{val_bytes / val_tokens:.4f}"),
    ]
    tok_rows += [
        (f"stats.json: {k}", _fmt(v))
        for k, v in sorted(stats.items())
        if k != "bytes_per_token" and isinstance(v, (int, float, str)) and len(str(v)) <= 80
    ]
    if not stats:
        tok_rows.append(("stats.json", f"missing at {_rel(stats_path, root)}"))

    examples = int(ec.get("report_examples", 5))
    qa = [
        {"question": p["question"], "reference": p["answer"], "outputs": {m: generated[m][i] for m in generated}}
        for i, p in enumerate(pairs[:examples])
    ]

    context = dict(
        headline=headline, beats=beats, notes=notes, rows=rows, val_tokens=val_tokens, val_bytes=val_bytes,
        window_note=window_note, heldout_pairs=len(pairs), max_new_tokens=max_new, curves=curves_notes,
        funnel=funnel, funnel_note=funnel_note, tokenizer=tok_rows, samples=samples, qa=qa,
        qa_models=list(generated), qa_note=qa_note, lineage=lineage, config_sha256=config_hash(cfg),
        code_version=code_version(), gate=gate, parent=parent_view, changes=changes, config_diff=cfg_diff,
        stage_configs=_stage_config_hashes(resolved),
    )
    images = {
        "metrics": R.plot_metrics(results),
        "curves": R.plot_curves(curves_data),
        "funnel": R.plot_funnel(funnel) if funnel else None,
    }
    md, page = R.render(context, images)

    out = Path(cfg.paths.reports)
    with atomic_dir(out) as tmp:
        (tmp / "plots").mkdir()
        for name, png in images.items():
            if png:
                (tmp / "plots" / f"{name}.png").write_bytes(png)
        write_json(tmp / "metrics.json", metrics_json)
        R.write_curve_csvs(tmp / "curves", curves_data)
        (tmp / "report.md").write_text(md, encoding="utf-8")
        (tmp / "report.html").write_text(page, encoding="utf-8")
        summary = write_summary(
            tmp, "eval", cfg, inputs, timer,
            metrics=metrics_json,
            ngram_train_tokens=kn.train_tokens,
            models=list(runs),
            finetune_present=has_ft,
            timings=timings,
            lstm=lstm_info,
            gate=gate,
            parent=parent_view,
            heldout_sha256=heldout_sha,
            outputs=sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file()),
        )
    record = P.append_history(history_dir, {
        "metrics": results, "config": resolved, "gate": gate, "heldout_sha256": heldout_sha,
        "heldout_pairs_sha256": pairs_sha, "artifacts": {a["name"]: a["sha256"] for a in lineage},
        "config_sha256": config_hash(cfg), "code_version": code_version(),
        "parent": parent["source"] if parent else None,
    })
    summary["history_record"] = str(record)
    if gate["status"] == "FAILED" and bool((ec.get("gate") or {}).get("fail", True)):
        raise PipelineError(
            f"release gate FAILED against the parent run ({parent['source']}): {gate['reason']}. "
            f"The report at {out / 'report.md'} says why; to publish anyway, rerun with eval.gate.enabled=false "
            f"or eval.gate.fail=false"
        )
    return summary


def _stage_config_hashes(resolved: dict) -> list[tuple[str, str]]:
    """sha256 of each stage's config group, so a reader sees which stage's settings changed."""
    out = []
    groups = [g for s in registry.STAGES for g in s.groups()]
    for group in dict.fromkeys([*groups, "executor"]):
        if group in resolved:
            blob = json.dumps(resolved[group], sort_keys=True, default=str).encode()
            out.append((group, hashlib.sha256(blob).hexdigest()[:16]))
    return out


def _fmt(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)
