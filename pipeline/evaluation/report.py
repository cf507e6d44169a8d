"""Plots (matplotlib, Agg) and the Markdown / self-contained HTML report."""

from __future__ import annotations

import base64
import html
import io
import math
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from jinja2 import Environment, StrictUndefined  # noqa: E402

from pipeline.evaluation import templates  # noqa: E402

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


def _fence(value) -> str:
    """A fenced block longer than any backtick run inside, so any text stays literal."""
    text = "" if value is None else str(value)
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}text\n{text}\n{fence}"


def render(context: dict, images: dict[str, bytes | None]) -> tuple[str, str]:
    """(report.md, report.html); plots are linked as files in Markdown and inlined in HTML."""
    md_env = Environment(autoescape=False, undefined=StrictUndefined, keep_trailing_newline=True)
    md_env.filters.update(num=_num, cell=_cell, fence=_fence, text=_text, signed=_signed, pct=_pct)
    html_env = Environment(autoescape=True, undefined=StrictUndefined, keep_trailing_newline=True)
    html_env.filters.update(num=_num, signed=_signed, pct=_pct)
    plots = {k: f"plots/{k}.png" if v else None for k, v in images.items()}
    uris = {k: "data:image/png;base64," + base64.b64encode(v).decode() if v else None for k, v in images.items()}
    md = md_env.from_string(templates.MARKDOWN).render(plots=plots, **context)
    page = html_env.from_string(templates.HTML).render(images=uris, **context)
    md = re.sub(r"\n{3,}", "\n\n", md)
    return md, page
