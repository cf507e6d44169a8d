"""Plots (matplotlib, Agg) and the Markdown / self-contained HTML report.

The report's text lives in ``templates/report.md.j2`` and ``templates/report.html.j2``
(package data); this module gathers what they show. The HTML one is rendered with
autoescaping on: model samples routinely contain ``<``. The Markdown one escapes table cells
with the ``cell`` filter and puts free text in fences.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import math
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from jinja2 import Environment, PackageLoader, StrictUndefined  # noqa: E402

from pipeline.core.artifacts import hash_tree, read_json  # noqa: E402

# the report's sections, in order, in both templates
SECTIONS = (
    "Summary",
    "Release gate",
    "Metrics",
    "Comparison with the parent run",
    "Training curves",
    "Data funnel",
    "Tokenizer",
    "Samples",
    "Held-out Q&A examples",
    "Lineage",
)
MODEL_COLORS = {"n-gram": "#8c959f", "lstm": "#bf8700", "pretrain": "#0969da", "finetune": "#1a7f37"}


# ------------------------------------------------------------------ training curves

def read_curves(run_dir: Path) -> dict | None:
    """train/val loss series from a Lightning CSVLogger ``metrics.csv`` (rows are sparse)."""
    run_dir = Path(run_dir)
    path = run_dir / "metrics.csv"
    if not path.is_file():
        found = sorted(run_dir.glob("**/metrics.csv"))
        if not found:
            return None
        path = found[-1]
    import pandas as pd

    try:
        df = pd.read_csv(path)
    except (ValueError, OSError):
        return None

    def pick(prefix: str) -> str | None:
        cols = [c for c in df.columns if c.lower().startswith(prefix) and "loss" in c.lower()]
        exact = [c for c in cols if c.lower() in (f"{prefix}_loss", f"{prefix}/loss")]
        return (exact or sorted(cols, key=len) or [None])[0]

    step = "step" if "step" in df.columns else None
    out = {"path": path}
    for key in ("train", "val"):
        col = pick(key)
        if col is None:
            out[key] = ([], [])
            continue
        rows = df[df[col].notna()]
        xs = rows[step].tolist() if step else list(range(len(rows)))
        out[key] = ([float(x) for x in xs], [float(y) for y in rows[col]])
    if not out["train"][0] and not out["val"][0]:
        return None
    return out


def write_curve_csvs(out_dir: Path, curves: dict[str, dict | None]) -> list[Path]:
    """``<model>_<train|val>.csv`` (step, loss): the tidy files ``dvc plots show`` reads."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, c in curves.items():
        if not c:
            continue
        for split in ("train", "val"):
            xs, ys = c[split]
            if not xs:
                continue
            path = out_dir / f"{name}_{split}.csv"
            lines = ["step,loss"] + [f"{int(x)},{y:.6g}" for x, y in zip(xs, ys)]
            path.write_text("\n".join(lines) + "\n")
            written.append(path)
    return written


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def plot_curves(curves: dict[str, dict | None]) -> bytes | None:
    present = {k: v for k, v in curves.items() if v}
    if not present:
        return None
    fig, axes = plt.subplots(1, len(present), figsize=(5.5 * len(present), 3.6), squeeze=False)
    for ax, (name, c) in zip(axes[0], present.items()):
        for key, style in (("train", "-"), ("val", "o-")):
            xs, ys = c[key]
            if xs:
                ax.plot(xs, ys, style, label=f"{key} loss", markersize=3)
        ax.set_title(f"{name}")
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    return _png(fig)


# ------------------------------------------------------------------ funnel

def funnel_view(funnel: dict) -> dict:
    steps = [
        {"step": str(s.get("step", "?")), "in": int(s.get("in", 0)), "out": int(s.get("out", 0))}
        for s in funnel.get("steps", [])
    ]
    for s in steps:
        s["removed"] = s["in"] - s["out"]
    rejected = (funnel.get("rejected") or {}).items()
    rejected = sorted(((str(k), int(v)) for k, v in rejected), key=lambda kv: (-kv[1], kv[0]))
    return {"in": int(funnel.get("in", 0)), "kept": int(funnel.get("kept", 0)), "steps": steps, "rejected": rejected}


def plot_funnel(view: dict) -> bytes | None:
    if not view["steps"] and not view["rejected"]:
        return None
    panels = [p for p in ("steps", "rejected") if view[p]]
    rows = max(3, len(view["steps"]) + 1, len(view["rejected"]))
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 1.4 + 0.4 * rows), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        if panel == "steps":
            labels = ["input"] + [s["step"] for s in view["steps"]]
            values = [view["steps"][0]["in"]] + [s["out"] for s in view["steps"]]
            ax.barh(labels[::-1], values[::-1], color="#0969da")
            ax.set_title("documents remaining after each step")
        else:
            labels = [r for r, _ in view["rejected"]]
            values = [n for _, n in view["rejected"]]
            ax.barh(labels[::-1], values[::-1], color="#cf222e")
            ax.set_title("documents rejected, by reason")
        ax.set_xlabel("documents")
        for y, v in enumerate(values[::-1]):
            ax.text(v, y, f" {v}", va="center", fontsize=8)
        ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return _png(fig)


# ------------------------------------------------------------------ metric comparison

def plot_metrics(metrics: dict) -> bytes:
    models = [m for m in ("ngram", "lstm", "pretrain", "finetune") if m in metrics]
    gen = [m for m in ("pretrain", "finetune") if m in metrics and "bleu" in metrics[m]]
    fig, axes = plt.subplots(1, 2 if gen else 1, figsize=(12 if gen else 6, 3.6), squeeze=False)
    ax = axes[0][0]
    labels = ["n-gram" if m == "ngram" else m for m in models]
    values = [metrics[m]["val_bpb"] for m in models]
    ax.bar(labels, values, color=[MODEL_COLORS[x] for x in labels])
    for x, v in enumerate(values):
        ax.text(x, v, f"{v:.3f}", ha="center", va="bottom", fontsize=9)
    ax.set_title("held-out bits per byte (lower is better)")
    ax.set_ylabel("bits / byte")
    ax.grid(axis="y", alpha=0.3)
    if gen:
        ax = axes[0][1]
        width = 0.8 / len(gen)
        for i, m in enumerate(gen):
            vals = [metrics[m]["bleu"], metrics[m].get("rouge1", 0.0), metrics[m].get("rouge2", 0.0), metrics[m]["rougeL"]]
            xs = [j + (i - (len(gen) - 1) / 2) * width for j in range(4)]
            ax.bar(xs, vals, width, label=m, color=MODEL_COLORS[m])
            for x, v in zip(xs, vals):
                ax.text(x, v, f"{v:.1f}", ha="center", va="bottom", fontsize=9)
        ax.set_xticks([0, 1, 2, 3], ["BLEU", "ROUGE-1", "ROUGE-2", "ROUGE-L"])
        ax.set_title("held-out Q&A (higher is better)")
        ax.grid(axis="y", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    return _png(fig)


# ------------------------------------------------------------------ what the report shows

def rel(path: Path, root: Path) -> str:
    """A path as the report shows it: relative to the run root when it is under it."""
    try:
        return Path(path).resolve().relative_to(Path(root).resolve()).as_posix()
    except ValueError:
        return str(path)


def lineage(inputs: dict[str, Path], root: Path) -> list[dict]:
    """[{name, path, sha256}] of the stage's inputs."""
    return [{"name": k, "path": rel(p, root), "sha256": hash_tree(p)} for k, p in inputs.items()]


def config_group_hashes(resolved: dict, groups) -> list[tuple[str, str]]:
    """sha256 (first 16) of each config group present, so a reader sees which stage's settings changed."""
    out = []
    for group in dict.fromkeys(groups):
        if group in resolved:
            blob = json.dumps(resolved[group], sort_keys=True, default=str).encode()
            out.append((group, hashlib.sha256(blob).hexdigest()[:16]))
    return out


def parent_view(parent: dict | None, heldout_sha256: str, root: Path) -> dict | None:
    """What the report and the stage summary say about the parent run."""
    if parent is None:
        return None
    same_text = parent.get("heldout_sha256") == heldout_sha256
    return {
        "source": rel(Path(parent["source"]), root),
        "run": parent.get("run"), "created": parent.get("created"),
        "code_version": parent.get("code_version"),
        "heldout_note": "same held-out tokens as this run" if same_text else
        "the held-out tokens differ from this run's (data or tokenizer changed): "
        "bits per byte compare models on different text",
    }


def curve_views(curves: dict[str, dict | None], runs: dict[str, Path], root: Path) -> list[dict]:
    """Per model: the last train/val loss and the best val loss, or where no curve was found."""
    out = []
    for name, run_dir in runs.items():
        c = curves[name]
        view = {"name": name, "dir": rel(run_dir, root), "path": None, "last": [], "best_val": None}
        if c is not None:
            view["path"] = rel(c["path"], root)
            view["last"] = [(k, c[k][1][-1]) for k in ("train", "val") if c[k][1]]
            view["best_val"] = min(c["val"][1]) if c["val"][1] else None
        out.append(view)
    return out


def tokenizer_view(tokenizer, stats_path: Path, heldout, root: Path) -> dict:
    """The tokenizer's size, its stats.json (short scalar entries) and the scored bytes per token."""
    stats = read_json(stats_path) if Path(stats_path).is_file() else {}
    return {
        "vocab_size": int(tokenizer.get_vocab_size()),
        "special_tokens": len(tokenizer.get_added_tokens_decoder()),
        "bytes_per_token": stats.get("bytes_per_token"),
        "scored_bytes_per_token": heldout.n_bytes / heldout.n_tokens,
        "stats": [(k, v) for k, v in sorted(stats.items())
                  if k != "bytes_per_token" and isinstance(v, (int, float, str)) and len(str(v)) <= 80],
        "stats_found": bool(stats),
        "stats_path": rel(stats_path, root),
    }


def context(*, results: dict, heldout, pairs: list[dict], answers: dict[str, list[str]], prompts: list[str],
            continuations: dict[str, list[str]], ngram: dict, lstm: dict | None, block_sizes: dict[str, int],
            runs: dict[str, Path], curves: dict[str, dict | None], tokenizer, paths: dict[str, Path],
            comparison: dict, parent: dict | None, lineage: list[dict], config_sha256: str, code_version: str,
            stage_configs: list[tuple[str, str]], max_new_tokens: int, examples: int) -> dict:
    """Everything the two report templates read. ``paths``: root, finetune (run dir), pairs
    (held-out pairs file), funnel (funnel.json), stats (tokenizer stats.json)."""
    root = paths["root"]
    funnel_path = Path(paths["funnel"])
    models = [m for m in ("ngram", "lstm", "pretrain", "finetune") if m in results]
    keys = ("val_bpb", "val_ppl", "bleu", "rouge1", "rouge2", "rougeL")
    return {
        "results": results, "beats": results["pretrain"]["val_bpb"] < results["ngram"]["val_bpb"],
        "ngram": ngram, "lstm": lstm, "finetune": "finetune" in runs, "finetune_dir": rel(paths["finetune"], root),
        "pairs_path": rel(paths["pairs"], root),
        "rows": [{"model": m, **{k: results[m].get(k) for k in keys}} for m in models],
        "val_tokens": heldout.n_tokens, "val_bytes": heldout.n_bytes, "blocks": block_sizes,
        "heldout_pairs": len(pairs), "max_new_tokens": max_new_tokens,
        "curves": curve_views(curves, runs, root),
        "funnel": funnel_view(read_json(funnel_path)) if funnel_path.is_file() else None,
        "funnel_path": rel(funnel_path, root),
        "tokenizer": tokenizer_view(tokenizer, paths["stats"], heldout, root),
        "samples": [{"prompt": p, "outputs": [(m, texts[i]) for m, texts in continuations.items()]}
                    for i, p in enumerate(prompts)],
        "qa": [{"question": p["question"], "reference": p["answer"], "outputs": {m: answers[m][i] for m in answers}}
               for i, p in enumerate(pairs[:examples])],
        "qa_models": list(answers),
        "gate": comparison["gate"], "parent": parent, "changes": comparison["changes"],
        "config_diff": comparison["config_diff"],
        "lineage": lineage, "config_sha256": config_sha256, "code_version": code_version,
        "stage_configs": stage_configs,
    }


# ------------------------------------------------------------------ rendering

def _num(value, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}f}"


def _signed(value, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and (math.isnan(value) or math.isinf(value))):
        return "–"
    return f"{value:+.{digits}f}"


def _pct(value) -> str:
    if value is None or (isinstance(value, float) and (math.isnan(value) or math.isinf(value))):
        return "–"
    return f"{value:+.2%}"


def _cell(value) -> str:
    """One Markdown table cell: no newlines, no pipes, no raw HTML."""
    text = "" if value is None else str(value)
    text = html.escape(text, quote=False).replace("\\", "\\\\").replace("|", "\\|")
    return re.sub(r"\s+", " ", text).strip() or " "


def _text(value) -> str:
    """One line of our own prose (paths, numbers, commands): whitespace collapsed."""
    return re.sub(r"\s+", " ", "" if value is None else str(value)).strip()


def _stat(value) -> str:
    """A tokenizer statistic: floats to 4 places, – for none."""
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _fence(value) -> str:
    """A fenced block longer than any backtick run inside, so any text stays literal."""
    text = "" if value is None else str(value)
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}text\n{text}\n{fence}"


_LOADER = PackageLoader("pipeline.evaluation", "templates")
_FILTERS = {"num": _num, "signed": _signed, "pct": _pct, "stat": _stat, "fmt": format}
_MD = Environment(loader=_LOADER, autoescape=False, undefined=StrictUndefined, keep_trailing_newline=True)
_MD.filters.update(_FILTERS, cell=_cell, fence=_fence, text=_text)
_HTML = Environment(loader=_LOADER, autoescape=True, undefined=StrictUndefined, keep_trailing_newline=True)
_HTML.filters.update(_FILTERS)


def render(context: dict, images: dict[str, bytes | None]) -> tuple[str, str]:
    """(report.md, report.html); plots are linked as files in Markdown and inlined in HTML."""
    plots = {k: f"plots/{k}.png" if v else None for k, v in images.items()}
    uris = {k: "data:image/png;base64," + base64.b64encode(v).decode() if v else None for k, v in images.items()}
    md = _MD.get_template("report.md.j2").render(plots=plots, **context)
    page = _HTML.get_template("report.html.j2").render(images=uris, **context)
    md = re.sub(r"\n{3,}", "\n\n", md)
    return md, page


def write(out: Path, context: dict, results: dict, curves: dict[str, dict | None]) -> None:
    """plots/*.png, curves/*.csv, report.md and report.html into ``out``."""
    out = Path(out)
    images = {
        "metrics": plot_metrics(results),
        "curves": plot_curves(curves),
        "funnel": plot_funnel(context["funnel"]) if context["funnel"] else None,
    }
    md, page = render(context, images)
    (out / "plots").mkdir(parents=True, exist_ok=True)
    for name, png in images.items():
        if png:
            (out / "plots" / f"{name}.png").write_bytes(png)
    write_curve_csvs(out / "curves", curves)
    (out / "report.md").write_text(md, encoding="utf-8")
    (out / "report.html").write_text(page, encoding="utf-8")
