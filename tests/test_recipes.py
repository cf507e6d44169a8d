"""Every recipe in conf/recipe/ runs end to end on CPU, shrunk by size overrides only.

Each test runs `python -m pipeline run recipe=<name>` (the Prefect flow, ingest to eval) on
the kind of input the recipe is for, with smaller models, vocabularies, step counts and
evaluation: nothing else is changed, except the GPU recipes' accelerator, since CI has none.
"""

from __future__ import annotations

import inspect
import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import ROOT, run_cli

pytestmark = pytest.mark.slow

SMALL = [
    "model.n_layer=1", "model.n_head=2", "model.d_model=32", "model.mlp_hidden=64", "model.block_size=32",
    "tokenizer.vocab_size=400", "pretrain.max_steps=4", "pretrain.batch_size=4", "pretrain.accumulate=1",
    "pretrain.val_every=2", "pretrain.val_batches=2", "pretrain.warmup_steps=1", "pretrain.log_every=1",
    "pretrain.progress_bar=false", "finetune.max_steps=4", "finetune.batch_size=4", "finetune.val_every=2",
    "finetune.val_batches=2", "finetune.warmup_steps=1", "eval.max_val_tokens=2000", "eval.batch_size=4", "eval.stride=16",
    "eval.max_new_tokens=4", "eval.lstm.steps=3", "eval.lstm.hidden=16", "eval.lstm.embed_dim=16",
    "eval.lstm.seq_len=16", "eval.lstm.batch_size=4", "eval.lstm.score_block=32",
]
ON_CPU = ["hardware.accelerator=cpu"]


def run_recipe(name: str, root: Path, *extra: str) -> dict:
    proc = run_cli("run", f"recipe={name}", f"paths.root={root}", *SMALL, *extra, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    summaries = {}
    for stage, rel in [("ingest", "data/raw"), ("clean", "data/clean"), ("tokenizer", "data/tokenizer"),
                       ("shard", "data/shards"), ("pretrain", "models/pretrain"), ("finetune", "models/finetune"),
                       ("eval", "reports")]:
        summaries[stage] = json.loads((root / rel / "_summary.json").read_text())
    assert summaries["ingest"]["config"]["source"] == summaries["pretrain"]["config"]["source"]
    finetune = summaries["finetune"]
    assert finetune.get("skipped") or finetune["steps"] == 4  # skipped where the corpus holds no SFT pairs
    metrics = json.loads((root / "reports" / "metrics.json").read_text())
    assert 0 < metrics["pretrain"]["val_bpb"] < 10
    assert (root / "models" / "pretrain" / "hf" / "config.json").is_file()
    return {"summaries": summaries, "metrics": metrics, "log": proc.stdout + proc.stderr}


def english_prose(n_docs: int, seed: int = 0) -> list[str]:
    """Documents of real English prose: docstrings of stdlib functions, classes and methods."""
    import importlib

    paras: list[str] = []
    seen: set[str] = set()
    for name in ("argparse", "asyncio", "collections", "configparser", "datetime", "decimal", "email.message",
                 "http.client", "inspect", "json", "logging", "pathlib", "random", "shutil", "subprocess",
                 "tarfile", "textwrap", "threading", "typing", "unittest", "urllib.parse", "zipfile"):
        mod = importlib.import_module(name)
        for _, obj in sorted(vars(mod).items()):
            members = [obj, *vars(obj).values()] if inspect.isclass(obj) else [obj]
            for m in members:
                doc = inspect.getdoc(m) if callable(m) else None
                doc = doc or ""
                words = doc.split()
                prose = sum(any(c.isalpha() for c in w) for w in words) >= 0.9 * len(words) and "{" not in doc
                if len(doc) > 200 and prose and doc not in seen:
                    seen.add(doc)
                    paras.append(" ".join(words))
    rng = random.Random(seed)
    rng.shuffle(paras)
    per = max(1, len(paras) // n_docs)
    return ["\n\n".join(paras[i * per:(i + 1) * per]) for i in range(n_docs)]


def test_shakespeare_one_text_file(tmp_path):
    """nanoGPT's hello world: a single text file is cut into documents, so there is a split."""
    text = "\n\n".join(english_prose(1))
    src = tmp_path / "input.txt"
    src.write_text(text, encoding="utf-8")
    out = run_recipe("shakespeare", tmp_path / "run", f"source.paths=[{src}]")
    ingest, shard = out["summaries"]["ingest"], out["summaries"]["shard"]
    assert ingest["files_read"] == 1 and ingest["docs_out"] > 40
    index = json.loads((tmp_path / "run" / "data/shards/index.json").read_text())
    assert index["splits"]["val"]["docs"] > 0 and index["splits"]["train"]["docs"] > 0, shard
    pre = out["summaries"]["pretrain"]
    assert pre["config"]["source"]["kind"] == "files"
    assert pre["config"]["hardware"]["accelerator"] == "cpu"


def fineweb_folder(root: Path) -> Path:
    docs = english_prose(60)
    for d, dump in enumerate(("CC-MAIN-2024-10", "CC-MAIN-2024-18")):
        folder = root / "data" / dump
        folder.mkdir(parents=True)
        for f in range(2):
            rows = docs[(2 * d + f) * 15:(2 * d + f + 1) * 15]
            table = pa.table({
                "text": rows,
                "id": [f"<urn:uuid:{dump}-{f}-{i}>" for i in range(len(rows))],
                "url": [f"https://example.org/{dump}/{f}/{i}" for i in range(len(rows))],
                "dump": [dump] * len(rows),
            })
            pq.write_table(table, folder / f"{f:03d}_00000.parquet", row_group_size=5)
    return root


@pytest.fixture(scope="module")
def fineweb(tmp_path_factory) -> Path:
    return fineweb_folder(tmp_path_factory.mktemp("fineweb"))


def test_gpt2_124m_from_a_fineweb_folder(tmp_path, fineweb):
    out = run_recipe("gpt2-124m", tmp_path / "run", f"source.name={fineweb}", *ON_CPU, "shard.val_fraction=0.2")
    s = out["summaries"]
    assert s["ingest"]["files_read"] == 4 and s["ingest"]["docs_out"] == 60
    cfg = s["pretrain"]["config"]
    # what the recipe sets, beyond the sizes this test shrinks
    assert cfg["hardware"]["precision"] == "bf16-mixed"
    assert cfg["pretrain"]["optimizer"] == "adamw" and cfg["pretrain"]["lr"] == pytest.approx(6e-4)
    assert cfg["tokenizer"]["pattern"] == "gpt4" and cfg["clean"]["steps"]["gopher_quality"]["enabled"]
    funnel = json.loads((tmp_path / "run/data/clean/funnel.json").read_text())
    assert funnel["in"] == 60 and funnel["kept"] >= 15, funnel  # web filters on docstring prose
    assert s["pretrain"]["memory_estimate"]["total_bytes"] > 0


def test_gpt2_124m_ddp_on_two_cpu_processes(tmp_path, fineweb):
    out = run_recipe("gpt2-124m-ddp", tmp_path / "run", f"source.name={fineweb}", *ON_CPU, "hardware.devices=2",
                     "shard.val_fraction=0.2")
    pre = out["summaries"]["pretrain"]
    assert pre["world_size"] == 2 and len(pre["ranks"]) == 2
    assert pre["config"]["hardware"]["strategy"] == "ddp"
    assert pre["config"]["pretrain"]["accumulate"] == 1  # shrunk; the recipe's own is 2
    weights = {r["weights_sha256"] for r in pre["ranks"]}
    assert len(weights) == 1, pre["ranks"]  # DDP ranks end with the same weights


ZH_PLACES = ["北京", "上海", "广州", "成都", "西安", "杭州", "南京", "武汉", "重庆", "天津", "苏州", "青岛", "长沙", "昆明",
             "厦门", "大连", "沈阳", "郑州", "济南", "合肥"]
ZH_PEOPLE = ["学生", "老师", "工程师", "医生", "农民", "记者", "科学家", "作家", "司机", "工人", "画家", "律师",
             "商人", "护士", "厨师", "演员", "经理", "警察", "邮递员", "设计师"]
ZH_TIMES = ["今天", "去年", "每天早上", "周末", "春节前", "三年以来", "最近", "在冬天", "晚饭以后", "每个月", "上个星期",
            "明年春天", "很多年前", "暑假期间", "中午", "昨天晚上"]
ZH_VERBS = ["认真地讨论了", "开始研究", "努力建设", "仔细观察了", "决定改善", "经常参观", "重新设计了", "热情地介绍了",
            "慢慢地了解了", "积极参加", "打算调查", "详细地记录了", "继续推广", "第一次体验了", "共同组织了", "悄悄地准备了"]
ZH_ADJS = ["新的", "古老的", "安静的", "热闹的", "传统的", "现代的", "美丽的", "复杂的", "简单的", "重要的", "有趣的",
           "困难的", "便宜的", "干净的", "有名的", "普通的"]
ZH_NOUNS = ["交通计划", "历史文化", "公园", "图书馆", "农业技术", "环境问题", "手工艺", "发展方向", "生活方式", "教育",
            "博物馆", "菜市场", "火车站", "医院", "音乐会", "运动会", "电影院", "饭店", "工厂", "小学"]
ZH_TAILS = ["，大家都觉得很有意义", "，并且写了一份报告", "，这让很多人感到高兴", "，结果比预想的更好", "，但是还有一些困难",
            "，因为这关系到每个家庭", "，而且得到了支持", "，所以进展很快", "", "，这是第一次", "，可是时间不够",
            "，于是大家一起想办法", "，听说效果不错", "，孩子们也来帮忙"]


def chinese_docs(n: int, seed: int = 0) -> list[str]:
    """Chinese paragraphs built from phrases, seeded: varied enough for dedup and quality filters."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        paras = []
        for _ in range(2):
            sents = [rng.choice(ZH_TIMES) + rng.choice(ZH_PLACES) + "的" + rng.choice(ZH_PEOPLE)
                     + rng.choice(ZH_VERBS) + rng.choice(ZH_ADJS) + rng.choice(ZH_NOUNS) + rng.choice(ZH_TAILS) + "。"
                     for _ in range(rng.randint(3, 4))]
            paras.append("".join(sents))
        docs.append("\n\n".join(paras))
    return docs


def test_zh_chinese_corpus(tmp_path):
    src = tmp_path / "zh"
    src.mkdir()
    docs = chinese_docs(80)
    with (src / "corpus.jsonl").open("w", encoding="utf-8") as fh:
        for i, d in enumerate(docs):
            fh.write(json.dumps({"text": d, "id": i}, ensure_ascii=False) + "\n")
    (src / "english.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in english_prose(5)))
    out = run_recipe("zh", tmp_path / "run", f"source.paths=[{src}]", "tokenizer.vocab_size=2000")
    funnel = json.loads((tmp_path / "run/data/clean/funnel.json").read_text())
    assert funnel["in"] == 85
    assert funnel["rejected"].get("language_en", 0) == 5, funnel  # only Chinese kept
    assert funnel["kept"] > 70, funnel
    assert "pairs" in out["summaries"]["finetune"]["skipped"]  # no Q&A pairs to mine in Chinese prose
    stats = json.loads((tmp_path / "run/data/tokenizer/stats.json").read_text())
    zh = stats["per_language"]["zh"]
    # 3 UTF-8 bytes per Han character: merges make a token hold more than one character
    assert zh["bytes_per_token"] > 3.0, zh
    assert "zh" in stats["per_language"] and "lang_samples" not in str(zh.get("source", ""))
    cfg = out["summaries"]["eval"]["config"]
    assert cfg["eval"]["prompts"][0] == "今天的天气"


def test_every_recipe_has_a_test():
    names = sorted(p.stem for p in (ROOT / "conf" / "recipe").glob("*.yaml"))
    src = Path(__file__).read_text()
    for name in names:
        assert f'"{name}"' in src, f"conf/recipe/{name}.yaml has no end-to-end test here"
