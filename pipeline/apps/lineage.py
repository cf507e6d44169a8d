"""`python -m pipeline lineage <document id | url | shard file | checkpoint>`.

Answers "where did this come from, and what did it feed?" from what the stages already
record, without a separate metadata store: the raw Parquet columns (id, url, source and the
ingest provenance columns such as the input file, byte offset and WARC record id, whichever
exist), `data/clean/rejected/` (step and reason), the clean summary (the steps, the funnel,
and which raw shards each clean shard came from), `data/shards/index.json` (which clean
shards each token file holds) and each model's `_summary.json` (the hashes of its inputs,
compared with the inputs on disk now, so a stale link is reported as stale).

Scans read one Parquet file at a time and only the small columns, so memory stays bounded.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pyarrow.parquet as pq

from pipeline.core.artifacts import SUMMARY, hash_tree
from pipeline.core.errors import PipelineError
from pipeline.core.parquet import parquet_files
from pipeline.stages import registry

BODY_COLUMNS = {"text", "html"}  # never printed; everything else in a raw row is provenance
MODEL_STAGES = tuple(s.name for s in registry.STAGES if s.subprocess)  # the training stages


class _Ctx:
    def __init__(self, cfg) -> None:
        p = cfg.paths
        self.root = Path(p.root)
        self.raw, self.clean, self.shards = Path(p.raw), Path(p.clean), Path(p.shards)
        self.models = {s: Path(p[s]) for s in MODEL_STAGES}
        self._hashes: dict[str, str | None] = {}

    def rel(self, path: Path | str) -> str:
        path = Path(path)
        try:
            return str(path.resolve().relative_to(self.root.resolve()))
        except ValueError:
            return str(path)

    def summary(self, d: Path) -> dict:
        f = Path(d) / SUMMARY
        return json.loads(f.read_text()) if f.is_file() else {}

    def current_hash(self, path: str) -> str | None:
        if path not in self._hashes:
            self._hashes[path] = hash_tree(Path(path)) if Path(path).exists() else None
        return self._hashes[path]

    def index(self) -> dict:
        f = self.shards / "index.json"
        return json.loads(f.read_text()) if f.is_file() else {}

    def clean_from(self) -> dict[str, list[str]]:
        """clean shard name -> raw shard names it holds documents of."""
        return self.summary(self.clean).get("lineage") or {}

    def token_files(self, clean_names: set[str], split: str | None = None) -> list[str]:
        out = []
        for name, info in (self.index().get("splits") or {}).items():
            if split and name != split:
                continue
            out += [self.rel(self.shards / f["name"]) for f in info.get("files", []) if set(f.get("from", [])) & clean_names]
        return out

    def models_fed(self) -> list[dict]:
        """Every model whose recorded inputs include the token shards (pretrain) or a model that did."""
        fed, fed_dirs = [], {str(self.shards.resolve())}
        for stage in MODEL_STAGES:
            d = self.models[stage]
            s = self.summary(d)
            inputs = s.get("inputs") or {}
            used = [k for k, v in inputs.items() if str(Path(v["path"]).resolve()) in fed_dirs]
            if not used:
                continue
            fed_dirs.add(str(d.resolve()))
            fed.append(self.model_entry(d, s))
        return fed

    def model_entry(self, d: Path, s: dict) -> dict:
        ckpt = d / "checkpoints" / "last.ckpt"
        inputs = {}
        for k, v in (s.get("inputs") or {}).items():
            now = self.current_hash(v["path"])
            inputs[k] = {"path": self.rel(v["path"]), "sha256": v["sha256"][:16],
                         "matches_disk": now == v["sha256"] if now else None}
        return {"model": self.rel(d), "stage": s.get("stage"), "steps": s.get("steps"),
                "checkpoint": self.rel(ckpt) if ckpt.is_file() else None, "inputs": inputs}


def _scan(files: list[Path], match, columns: list[str] | None = None) -> list[dict]:
    """Rows (without text/html) of the given Parquet files for which `match(row)` holds."""
    hits = []
    for f in files:
        pf = pq.ParquetFile(f)
        cols = [c for c in pf.schema_arrow.names if c not in BODY_COLUMNS] if columns is None else columns
        row_no = 0
        for batch in pf.iter_batches(batch_size=4096, columns=cols):
            for row in batch.to_pylist():
                if match(row):
                    hits.append({"file": f, "row": row_no, **row})
                row_no += 1
    return hits


def _id_matcher(target: str, *keys: str):
    prefix = len(target) >= 8 and re.fullmatch(r"[0-9a-f]+", target) is not None

    def match(row: dict) -> bool:
        for k in keys:
            v = row.get(k)
            if v is None:
                continue
            if v == target or (prefix and k != "url" and str(v).startswith(target)):
                return True
        return False

    return match


def _steps(ctx: _Ctx) -> list[str]:
    s = ctx.summary(ctx.clean)
    return [row["step"] for row in (s.get("funnel") or {}).get("steps", [])]


def trace_document(ctx: _Ctx, target: str) -> dict:
    clean_rows = _scan(parquet_files(ctx.clean), _id_matcher(target, "id", "raw_id", "url"),
                       columns=None) if ctx.clean.is_dir() else []
    raw_ids = {r["raw_id"] for r in clean_rows if r.get("raw_id")} or {target}
    raw_rows = []
    for rid in sorted(raw_ids):
        raw_rows += _scan(parquet_files(ctx.raw), _id_matcher(rid, "id", "url")) if ctx.raw.is_dir() else []
    ids = {r["id"] for r in raw_rows} | ({target} if not raw_rows else set())
    rejected = _scan(parquet_files(ctx.clean / "rejected"), lambda r: r.get("id") in ids
                     or _id_matcher(target, "id", "url")(r)) if (ctx.clean / "rejected").is_dir() else []
    if not (clean_rows or raw_rows or rejected):
        raise PipelineError(
            f"no document, shard or checkpoint matches {target!r}: searched document ids and urls in "
            f"{ctx.rel(ctx.raw)} and {ctx.rel(ctx.clean)}, and paths under {ctx.root}"
        )
    report: dict = {"kind": "document", "target": target}
    report["raw"] = [{**{k: v for k, v in r.items() if k != "file"}, "shard": ctx.rel(r["file"])} for r in raw_rows]
    steps = _steps(ctx)
    if rejected:
        rej = rejected[0]
        done = steps[: steps.index(rej["step"]) + 1] if rej.get("step") in steps else [rej.get("step")]
        report["filters"] = {"decision": "rejected", "step": rej.get("step"), "reason": rej.get("reason"),
                             "passed": done[:-1], "rejected_shard": ctx.rel(rej["file"])}
    if clean_rows:
        val_fraction = ((ctx.summary(ctx.shards).get("config") or {}).get("shard") or {}).get("val_fraction")
        kept = []
        for r in clean_rows:
            entry = {"id": r["id"], "shard": ctx.rel(r["file"]), "row": r["row"]}
            if val_fraction is not None:
                from pipeline.core.splits import is_val

                split = "val" if is_val(r["id"], val_fraction) else "train"
                entry["split"] = split
                entry["token_files"] = ctx.token_files({r["file"].name}, split)
            kept.append(entry)
        report["filters"] = {"decision": "kept", "passed": steps}
        report["clean"] = kept
        if any(k.get("token_files") for k in kept):
            report["fed"] = ctx.models_fed()
    return report


def trace_shard(ctx: _Ctx, path: Path) -> dict:
    path = path.resolve()
    from_clean = ctx.clean_from()
    if path.suffix == ".bin":
        info = next((f for s in (ctx.index().get("splits") or {}).values() for f in s.get("files", [])
                     if (ctx.shards / f["name"]).resolve() == path), None)
        if info is None:
            raise PipelineError(f"{path} is not listed in {ctx.rel(ctx.shards / 'index.json')}")
        clean_names = list(info.get("from", []))
        raw_names = sorted({r for c in clean_names for r in from_clean.get(c, [])})
        return {"kind": "token_file", "target": ctx.rel(path), "tokens": info.get("tokens"),
                "sha256": info.get("sha256"), "from_clean": [ctx.rel(ctx.clean / c) for c in clean_names],
                "from_raw": [ctx.rel(ctx.raw / r) for r in raw_names], "sources": _sources(ctx, raw_names),
                "filters": _steps(ctx), "fed": ctx.models_fed()}
    if path.parent == ctx.clean.resolve():
        raw_names = from_clean.get(path.name, [])
        return {"kind": "clean_shard", "target": ctx.rel(path), "rows": pq.ParquetFile(path).metadata.num_rows,
                "from_raw": [ctx.rel(ctx.raw / r) for r in raw_names], "sources": _sources(ctx, raw_names),
                "filters": _steps(ctx), "token_files": ctx.token_files({path.name}), "fed": ctx.models_fed()}
    if path.parent == ctx.raw.resolve():
        clean_names = {c for c, raws in from_clean.items() if path.name in raws}
        ids = {r["id"] for r in _scan([path], lambda r: True, columns=["id"])}
        rejected: dict[str, int] = {}
        if (ctx.clean / "rejected").is_dir():
            for r in _scan(parquet_files(ctx.clean / "rejected"), lambda r: r["id"] in ids, columns=["id", "reason"]):
                rejected[r["reason"]] = rejected.get(r["reason"], 0) + 1
        return {"kind": "raw_shard", "target": ctx.rel(path), "rows": len(ids), "sources": _sources(ctx, [path.name]),
                "rejected": rejected, "clean_shards": sorted(ctx.rel(ctx.clean / c) for c in clean_names),
                "token_files": ctx.token_files(clean_names), "fed": ctx.models_fed()}
    raise PipelineError(f"{path} is not a raw, clean or token shard under {ctx.root}")


def _sources(ctx: _Ctx, raw_names: list[str]) -> dict:
    """Per source: documents and the distinct input files (WARC, JSONL, ...) recorded by ingest."""
    out: dict[str, dict] = {}
    files = [ctx.raw / n for n in raw_names if (ctx.raw / n).is_file()]
    for f in files:
        cols = [c for c in ("source", "source_file") if c in pq.ParquetFile(f).schema_arrow.names]
        for row in _scan([f], lambda r: True, columns=cols):
            entry = out.setdefault(row.get("source") or "?", {"documents": 0, "files": set()})
            entry["documents"] += 1
            if row.get("source_file"):
                entry["files"].add(row["source_file"])
    ingest = ctx.summary(ctx.raw)
    src_cfg = (ingest.get("config") or {}).get("source") or {}
    for entry in out.values():
        entry["files"] = sorted(entry["files"])
        if ingest.get("warc_file"):
            entry["warc"] = ingest["warc_file"]
        entry["config"] = {k: src_cfg[k] for k in ("kind", "seeds", "paths", "name", "split", "max_pages") if k in src_cfg}
    return out


def trace_checkpoint(ctx: _Ctx, path: Path) -> dict:
    d = path.resolve()
    d = d if d.is_dir() else d.parent
    while not ((d / SUMMARY).is_file() and json.loads((d / SUMMARY).read_text()).get("stage") in MODEL_STAGES):
        if d.parent == d or d == ctx.root.resolve():
            raise PipelineError(f"{path} is not inside a trained model directory (no {SUMMARY} of pretrain/finetune)")
        d = d.parent
    chain = []
    while d is not None:
        s = ctx.summary(d)
        chain.append(ctx.model_entry(d, s))
        parent = (s.get("inputs") or {}).get("pretrain")
        d = Path(parent["path"]) if parent and (Path(parent["path"]) / SUMMARY).is_file() else None
    index = ctx.index()
    files = [f for s in (index.get("splits") or {}).values() for f in s.get("files", [])]
    clean_names = sorted({c for f in files for c in f.get("from", [])})
    from_clean = ctx.clean_from()
    raw_names = sorted({r for c in clean_names for r in from_clean.get(c, [])})
    clean_s = ctx.summary(ctx.clean)
    funnel = clean_s.get("funnel") or {}
    return {
        "kind": "checkpoint", "target": ctx.rel(path), "models": chain,
        "token_files": [{"file": ctx.rel(ctx.shards / f["name"]), "tokens": f.get("tokens"),
                         "sha256": (f.get("sha256") or "")[:16]} for f in files],
        "clean_shards": [ctx.rel(ctx.clean / c) for c in clean_names],
        "filters": {"steps": clean_s.get("steps") or _steps(ctx), "in": funnel.get("in"), "kept": funnel.get("kept"),
                    "rejected": funnel.get("rejected")},
        "raw_shards": [ctx.rel(ctx.raw / r) for r in raw_names],
        "sources": _sources(ctx, raw_names),
    }


def trace(cfg, target: str) -> dict:
    ctx = _Ctx(cfg)
    cand = [Path(target).expanduser(), ctx.root / target]
    path = next((p for p in cand if p.exists()), None)
    if path is None:
        return trace_document(ctx, target)
    rp = path.resolve()
    if any(rp == m.resolve() or m.resolve() in rp.parents for m in ctx.models.values()) or rp.suffix == ".ckpt":
        return trace_checkpoint(ctx, path)
    if rp.is_file() and rp.suffix in (".parquet", ".bin"):
        return trace_shard(ctx, path)
    raise PipelineError(f"{path}: expected a document id or url, a .parquet / .bin shard, or a model checkpoint")


def render(report: dict, indent: int = 0) -> str:
    """Indented `key: value` lines; lists of dicts as blocks, short lists inline."""
    pad = "  " * indent
    lines = []
    for k, v in report.items():
        if isinstance(v, dict):
            if not v:
                lines.append(f"{pad}{k}: -")
                continue
            lines.append(f"{pad}{k}:")
            lines.append(render(v, indent + 1))
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            lines.append(f"{pad}{k}:")
            for x in v:
                block = render(x, indent + 2).splitlines()
                lines.append(f"{pad}  - {block[0].strip()}")
                lines += block[1:]
        elif isinstance(v, list):
            lines.append(f"{pad}{k}: {', '.join(map(str, v)) if v else '-'}")
        else:
            lines.append(f"{pad}{k}: {v}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline lineage",
        description="Which sources, WARC records, filters and shards a document, shard or checkpoint came from or fed.",
    )
    parser.add_argument("target", help="document id (or a unique prefix, >= 8 hex), url, shard file, or checkpoint")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. paths.root=/data/run")
    args = parser.parse_intermixed_args(argv)
    from pipeline.core.config import load

    report = trace(load(args.overrides), args.target)
    print(json.dumps(report, indent=2, default=str) if args.json else render(report))
    return 0
