"""Eval stage: Kneser-Ney baseline, metrics, the batched scorer and the report from fixtures."""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from pipeline.core.errors import PipelineError
from pipeline.evaluation import metrics as M
from pipeline.evaluation import parent as P
from pipeline.evaluation import samples, scoring
from pipeline.evaluation.ngram import KneserNey, stream_chunks
from pipeline.evaluation.report import SECTIONS

REAL_GENERATE, REAL_LOAD_MODEL = samples.generate, scoring.load_model

# ------------------------------------------------------------------ Kneser-Ney


def next_probs(kn: KneserNey, context) -> np.ndarray:
    """The whole next-token distribution after ``context``, through KneserNey.prob (shorter
    contexts back off: missing left tokens are -1)."""
    ctx = list(context)[-(kn.order - 1) :] if kn.order > 1 else []
    row = [-1] * (kn.order - 1 - len(ctx)) + [int(t) for t in ctx]
    return kn.prob(np.tile(np.array(row, np.int64), (kn.vocab_size, 1)), np.arange(kn.vocab_size))


def test_kn_bigram_hand_computed():
    # "a b a b c" with V = 4 (token 3 never seen), D = 1/2
    toks = np.array([0, 1, 0, 1, 2])
    kn = KneserNey(order=2, discount=0.5).fit([toks], vocab_size=4)
    # continuation counts N1+(.w): a<-{b}, b<-{a}, c<-{b}: 1 each; 3 bigram types, 3 followers
    p1_seen = (1 - 0.5 + 0.5 * 3 * (1 / 4)) / 3  # 0.291666...
    p1_unseen = 0.5 * 3 * (1 / 4) / 3  # 0.125
    assert next_probs(kn, [2]) == pytest.approx([p1_seen, p1_seen, p1_seen, p1_unseen], abs=1e-12)  # unseen ctx
    # context a: c(a.) = 2, one follower (b)
    assert next_probs(kn, [0]) == pytest.approx(
        [0.5 * 1 * p1_seen / 2, (2 - 0.5 + 0.5 * p1_seen) / 2, 0.5 * p1_seen / 2, 0.5 * p1_unseen / 2], abs=1e-12
    )
    # context b: c(b.) = 2, two followers (a, c)
    pb = next_probs(kn, [1])
    assert pb[0] == pytest.approx((1 - 0.5 + 0.5 * 2 * p1_seen) / 2, abs=1e-12)  # 0.3958333
    assert pb[3] == pytest.approx(0.5 * 2 * p1_unseen / 2, abs=1e-12)  # 0.0625
    assert pb[0] == pytest.approx(0.3958333333, abs=1e-9)
    # scoring tokens 1.. of the stream uses exactly these numbers
    nats, n = kn.nats(toks, start=1)
    expected = -sum(math.log(next_probs(kn, [toks[i - 1]])[toks[i]]) for i in range(1, len(toks)))
    assert n == 4 and nats == pytest.approx(expected, rel=1e-12)


def _reference_kn(toks, order, D, V):
    """Straightforward dict-based interpolated KN, written from the textbook formulas."""
    toks = [int(t) for t in toks]
    grams = {k: defaultdict(int) for k in range(1, order + 1)}
    for k in range(1, order + 1):
        for i in range(len(toks) - k + 1):
            grams[k][tuple(toks[i : i + k])] += 1
    cont = {k: defaultdict(int) for k in range(1, order)}
    for k in range(1, order):
        for g in grams[k + 1]:
            cont[k][g[1:]] += 1

    def table(k):
        return grams[k] if k == order else cont[k]

    def p(w, ctx, k):
        lower = 1.0 / V if k == 1 else p(w, ctx[1:], k - 1)
        t = table(k)
        follow = [g for g in t if g[:-1] == ctx]
        total = sum(t[g] for g in follow)
        if total == 0:
            return lower
        return (max(t.get(ctx + (w,), 0) - D, 0) + D * len(follow) * lower) / total

    return lambda ctx, w: p(w, tuple(ctx)[len(ctx) - (order - 1) :] if order > 1 else (), order)


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_kn_matches_textbook_reference(order):
    rng = np.random.default_rng(order)
    V = 7
    toks = rng.zipf(1.6, size=300) % V
    kn = KneserNey(order, 0.75).fit([toks], vocab_size=V)
    ref = _reference_kn(toks, order, 0.75, V)
    contexts = [list(toks[i : i + order - 1]) for i in (0, 17, 100)] + [[6] * (order - 1), [5, 6, 5][: order - 1]]
    for ctx in contexts:
        got = next_probs(kn, ctx)
        want = [ref(ctx, w) for w in range(V)]
        assert got == pytest.approx(want, abs=1e-12), ctx


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_kn_is_a_distribution_and_chunking_does_not_matter(order):
    rng = np.random.default_rng(0)
    V = 60
    toks = (rng.zipf(1.4, size=20_000) % V).astype(np.uint16)
    kn = KneserNey(order, 0.75).fit(stream_chunks([toks[:9000], toks[9000:]], None, chunk=777), vocab_size=V)
    whole = KneserNey(order, 0.75).fit([toks], vocab_size=V)
    for k in whole.grams:
        np.testing.assert_array_equal(kn.grams[k][0], whole.grams[k][0])
        np.testing.assert_array_equal(kn.grams[k][1], whole.grams[k][1])
    assert kn.train_tokens == len(toks)
    for ctx in ([], [1], [int(toks[10]), int(toks[11]), int(toks[12])], [59, 58, 57], [0, 59, 1]):
        probs = next_probs(kn, ctx)
        assert probs.min() > 0
        assert abs(probs.sum() - 1.0) < 1e-6, (ctx, probs.sum())


def test_kn_rejects_bad_settings():
    with pytest.raises(PipelineError):
        KneserNey(3, 1.5)
    with pytest.raises(PipelineError, match="64 bits"):
        KneserNey(5, 0.75).fit([np.arange(10)], vocab_size=1 << 16)
    with pytest.raises(PipelineError, match="outside the vocabulary"):
        KneserNey(2, 0.75).fit([np.array([0, 1, 9])], vocab_size=4)


def test_stream_chunks_caps_tokens():
    arrays = [np.arange(10), np.arange(10, 25)]
    out = np.concatenate(list(stream_chunks(arrays, 13, chunk=4)))
    np.testing.assert_array_equal(out, np.arange(13))
    assert len(np.concatenate(list(stream_chunks(arrays, None, chunk=4)))) == 25


# ------------------------------------------------------------------ metrics


def test_bits_per_byte_and_perplexity_known_numbers():
    assert M.bits_per_byte(8 * math.log(2), 4) == pytest.approx(2.0)
    assert M.bits_per_byte(100 * math.log(2), 100) == pytest.approx(1.0)
    assert M.perplexity(2 * math.log(3), 2) == pytest.approx(3.0)
    assert M.perplexity(0.0, 5) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        M.bits_per_byte(1.0, 0)


def test_rouge_l_hand_computed():
    # LCS "the cat on the mat" = 5 of 6 both ways
    assert M.rouge_l_f1("the cat sat on the mat", "the cat is on the mat") == pytest.approx(5 / 6)
    # LCS "b d" = 2; P = 2/4, R = 2/3, F = 2PR/(P+R) = 4/7
    assert M.rouge_l_f1("a b c d", "b d e") == pytest.approx(4 / 7)
    assert M.rouge_l_f1("The CAT", "the cat") == 1.0
    assert M.rouge_l_f1("", "the cat") == 0.0
    assert M.rouge_l_f1("dog", "the cat") == 0.0
    # order matters: LCS of "c b a" and "a b c" is 1
    assert M.rouge_l_f1("c b a", "a b c") == pytest.approx(1 / 3)
    assert M.rouge_l(["a b c d", "the cat"], ["b d e", "the cat"]) == pytest.approx(100 * (4 / 7 + 1) / 2)


def test_bleu_sanity():
    refs = ["Serialize obj to a JSON formatted string.", "Join one or more path segments intelligently."]
    assert M.bleu(refs, refs) == pytest.approx(100.0)
    assert M.bleu(["zzz qqq", "www"], refs) < 1.0
    assert 0 < M.bleu(["Serialize obj to a JSON string.", "Join path segments."], refs) < 100


class BigramLM:
    """A tiny real torch model: logits depend only on the current token."""

    def __init__(self, V: int, seed: int = 0):
        import torch

        g = torch.Generator().manual_seed(seed)
        self.table = torch.randn(V, V, generator=g)
        self.training = False
        self.calls = []

    def eval(self):
        return self

    def __call__(self, idx):
        self.calls.append(tuple(idx.shape))
        return self.table[idx]


@pytest.mark.parametrize("stride", [None, 8, 4, 3, 1])
@pytest.mark.parametrize("n", [2, 17, 33, 64, 65])
def test_score_model_scores_every_token_after_the_first_once(n, stride):
    import torch

    V, B = 11, 8
    toks = np.random.default_rng(n).integers(0, V, size=n)
    model = BigramLM(V)
    nats, count = M.score_model(model, toks, block_size=B, batch_size=3, stride=stride)
    logp = torch.log_softmax(model.table, -1).numpy()
    expected = -sum(logp[toks[i - 1], toks[i]] for i in range(1, n))
    assert count == n - 1
    assert nats == pytest.approx(expected, rel=1e-5)
    assert all(t <= B and b <= 3 for b, t in model.calls)


# ------------------------------------------------------------------ the stage, from fixtures

SPECIALS = ["<|endoftext|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
TEXT = [
    "The json module serializes Python objects to JSON text and parses JSON text back.",
    "os.path.join joins one or more path segments intelligently, inserting separators.",
    "def read_file(path):\n    with open(path) as f:\n        return f.read()",
    "The re module provides regular expression matching operations similar to Perl.",
    "collections.Counter is a dict subclass for counting hashable objects in an iterable.",
    "pathlib offers classes representing filesystem paths with semantics for different systems.",
    "functools.lru_cache decorates a function with a memoizing callable that saves calls.",
    "itertools.chain makes an iterator that returns elements from the first iterable.",
]


def _docs(n: int, offset: int = 0) -> list[str]:
    return [f"{TEXT[(i + offset) % len(TEXT)]} Example {i}: x < y and a & b." for i in range(n)]


def _tiny_model_factory(V: int):
    import torch
    import torch.nn as nn

    class Tiny(nn.Module):
        def __init__(self, seed: int):
            super().__init__()
            torch.manual_seed(seed)
            self.emb = nn.Embedding(V, 16)
            self.head = nn.Linear(16, V)

        def forward(self, idx):
            return self.head(self.emb(idx))

    return Tiny


@pytest.fixture
def eval_root(tmp_path, monkeypatch):
    """A run directory with every input of the eval stage, and a tiny model in place of pipeline.model.runs."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from pipeline.core.artifacts import write_json

    root = tmp_path / "run"
    tok_dir = root / "data/tokenizer"
    tok_dir.mkdir(parents=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, min_frequency=2, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    train_docs, val_docs = _docs(60), _docs(12, offset=3)
    tok.train_from_iterator(train_docs, trainer)
    tok.save(str(tok_dir / "tokenizer.json"))
    V = tok.get_vocab_size()

    shards = root / "data/shards"
    index = {"dtype": "uint16", "eot_id": 0, "vocab_size": V, "splits": {}}
    for split, docs in (("train", train_docs), ("val", val_docs)):
        ids = []
        for d in docs:
            ids += tok.encode(d).ids + [0]
        arr = np.array(ids, dtype="<u2")
        (shards / split).mkdir(parents=True)
        half = len(arr) // 2  # two files per split: the stream must continue across them
        files = []
        for j, part in enumerate((arr[:half], arr[half:])):
            name = f"{split}/{j:05d}.bin"
            part.tofile(shards / name)
            files.append({"name": name, "tokens": len(part), "sha256": "x"})
        index["splits"][split] = {"files": files, "tokens": len(arr), "docs": len(docs), "bytes": 0}
    write_json(shards / "index.json", index)
    write_json(tok_dir / "stats.json", {"bytes_per_token": 3.21, "vocab_size": V})

    write_json(root / "data/clean/funnel.json", {
        "in": 100, "kept": 72, "rejected": {"too_short": 20, "duplicate": 8},
        "steps": [{"step": "MinWords", "in": 100, "out": 80}, {"step": "ExactDedup", "in": 80, "out": 72}],
    })
    for run, rows in (("pretrain", 6), ("finetune", 3)):
        d = root / "models" / run
        (d / "checkpoints").mkdir(parents=True)
        (d / "checkpoints/last.ckpt").write_bytes(b"weights-" + run.encode())
        lines = ["epoch,step,train_loss,val_loss"]
        for s in range(rows):
            lines.append(f"0,{s * 10},{5 - s * 0.3:.3f},")
            if s % 2:
                lines.append(f"0,{s * 10},,{5.2 - s * 0.3:.3f}")
        (d / "metrics.csv").write_text("\n".join(lines) + "\n")
    pairs = [
        {"question": "What does json.dumps do?", "answer": "Serialize obj to a JSON formatted str.", "doc_id": "a"},
        {"question": "What does os.path.join do?", "answer": "Join path segments <intelligently>.", "doc_id": "b"},
        {"question": "What is re?", "answer": "Regular expression operations.", "doc_id": "c"},
    ]
    (root / "models/finetune/sft").mkdir()
    (root / "models/finetune/sft/heldout.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))

    Tiny = _tiny_model_factory(V)
    loaded = []

    def fake_load(run_dir, seed):
        loaded.append(Path(run_dir).name)
        return Tiny({"pretrain": 1, "finetune": 2}[Path(run_dir).name]).eval(), {"block_size": 16}

    def fake_generate(model, tokenizer, prompt, max_new_tokens, seed):
        ids = tokenizer.encode(prompt).ids
        with torch.no_grad():
            for _ in range(max_new_tokens):
                ids.append(int(model(torch.tensor([ids[-16:]]))[0, -1].argmax()))
        text = tokenizer.decode(ids[len(tokenizer.encode(prompt).ids):])
        return f"<b>{text}</b> & more<|end|>trailing"

    monkeypatch.setattr(scoring, "load_model", fake_load)
    monkeypatch.setattr(samples, "generate", fake_generate)
    overrides = [
        f"paths.root={root}", "eval.max_new_tokens=6", "eval.max_heldout_pairs=2",
        "eval.prompts=['The json module','<script>alert(1)</script>']",
        "eval.lstm.steps=30", "eval.lstm.hidden=32", "eval.lstm.embed_dim=16", "eval.lstm.seq_len=32",
        "eval.lstm.batch_size=8",
    ]
    return root, overrides, loaded


def _vocab(root: Path) -> dict:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(root / "data/tokenizer/tokenizer.json")).get_vocab()


def _run(overrides):
    from pipeline.core.config import load
    from pipeline.stages.eval import run

    cfg = load(overrides)
    return cfg, run(cfg)


def _sections(text: str, level: str) -> list[str]:
    return re.findall(rf"^{level} (.+)$", text, flags=re.M)


def test_report_from_fixtures(eval_root):
    root, overrides, loaded = eval_root
    cfg, summary = _run(overrides)
    out = root / "reports"
    assert loaded == ["pretrain", "finetune"]
    assert summary["stage"] == "eval" and set(summary["inputs"]) == {"tokenizer", "shards", "pretrain", "finetune", "funnel"}

    m = json.loads((out / "metrics.json").read_text())
    assert set(m) == {"pretrain", "finetune", "ngram", "lstm", "val_tokens", "val_bytes", "heldout_pairs",
                      "pretrain_beats_ngram", "gate"}
    assert set(m["pretrain"]) == set(m["finetune"]) == {"val_bpb", "val_ppl", "bleu", "rouge1", "rouge2", "rougeL"}
    assert set(m["ngram"]) == set(m["lstm"]) == {"val_bpb", "val_ppl"}
    assert m["gate"] == "PASSED" and summary["gate"]["reason"].startswith("no parent run")
    # the LSTM was trained: far better than uniform over the vocabulary
    assert m["lstm"]["val_ppl"] < 0.5 * len(_vocab(root))
    assert isinstance(m["pretrain_beats_ngram"], bool)
    assert m["pretrain_beats_ngram"] == (m["pretrain"]["val_bpb"] < m["ngram"]["val_bpb"])
    assert m["heldout_pairs"] == 2
    assert m["pretrain"]["val_bpb"] != m["finetune"]["val_bpb"]  # each model is loaded and scored on its own

    # the scored tokens and bytes: tokens 1..N-1 of the whole val stream (it spans two files)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(root / "data/tokenizer/tokenizer.json"))
    index = json.loads((root / "data/shards/index.json").read_text())
    val = np.concatenate([np.fromfile(root / "data/shards" / f["name"], dtype="<u2") for f in index["splits"]["val"]["files"]])
    assert m["val_tokens"] == len(val) - 1
    text = tok.decode([int(t) for t in val[1:]], skip_special_tokens=True)
    assert m["val_bytes"] == len(text.encode("utf-8"))
    # the n-gram number is an independent KN on the same tokens
    train = np.concatenate([np.fromfile(root / "data/shards" / f["name"], dtype="<u2") for f in index["splits"]["train"]["files"]])
    kn = KneserNey(3, 0.75).fit([train], vocab_size=tok.get_vocab_size())
    nats, n = kn.nats(val.astype(np.int64))
    assert m["ngram"]["val_bpb"] == pytest.approx(nats / math.log(2) / m["val_bytes"], rel=1e-5)
    assert m["ngram"]["val_ppl"] == pytest.approx(math.exp(nats / n), rel=1e-5)
    # generated answers are cut at <|end|>: "trailing" never reaches the scores or the report
    md = (out / "report.md").read_text()
    page = (out / "report.html").read_text()
    assert "& more" in md and "trailing" not in md.split("## Held-out Q&A examples")[1].split("## Lineage")[0]

    assert _sections(md, "##") == list(SECTIONS)
    h2 = re.findall(r"<h2[^>]*>(.*?)</h2>", page)
    assert [s.replace("&amp;", "&") for s in h2] == list(SECTIONS)
    assert "beats the order-3 n-gram baseline" in md or "does NOT beat the order-3 n-gram baseline" in md

    # self-contained HTML: every resource is a data: URI, nothing is fetched
    urls = re.findall(r"""(?:src|href)\s*=\s*["']([^"']*)["']""", page, flags=re.I)
    assert len(urls) == 3 and all(u.startswith("data:image/png;base64,") for u in urls)
    assert "LSTM baseline (1x32" in md and 'id="gate-status">PASSED' in page
    assert "<link" not in page and "<script" not in page and "url(" not in page
    # text is escaped: the prompt and the samples contain markup
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "&lt;b&gt;" in page and "<b>" not in page
    assert "&lt;intelligently&gt;" in page
    # the Markdown keeps markup in fenced blocks and escapes it in table cells
    assert "```text\n<script>alert(1)</script>\n```" in md
    assert "&lt;intelligently&gt;" in md

    for name in ("curves", "funnel", "metrics"):
        png = (out / "plots" / f"{name}.png").read_bytes()
        assert png.startswith(b"\x89PNG")
        assert f"(plots/{name}.png)" in md
    assert "- Held-out Q&A (2 pairs): BLEU" in md
    assert "72 kept" in md and "too_short" in page
    assert "3.2100" in md  # bytes per token from stats.json
    assert "best val loss" in md
    from pipeline.core.artifacts import hash_tree

    assert hash_tree(root / "models/pretrain") in md and hash_tree(root / "data/shards") in page
    assert summary["config_sha256"] in md
    assert json.loads((out / "_summary.json").read_text())["metrics"] == m


def test_report_is_deterministic(eval_root):
    import shutil

    root, overrides, _ = eval_root
    _run(overrides)
    first = {p.name: p.read_bytes() for p in (root / "reports").rglob("*") if p.is_file() and p.name != "_summary.json"}
    shutil.rmtree(root / "runs")  # same inputs, same (absent) parent
    _run(overrides)
    second = {p.name: p.read_bytes() for p in (root / "reports").rglob("*") if p.is_file() and p.name != "_summary.json"}
    assert first.keys() == second.keys() and first == second


def test_report_without_finetune(eval_root):
    import shutil

    root, overrides, loaded = eval_root
    shutil.rmtree(root / "models/finetune")
    _, summary = _run(overrides)
    m = json.loads((root / "reports/metrics.json").read_text())
    assert "finetune" not in m and m["heldout_pairs"] == 0 and "bleu" not in m["pretrain"]
    assert loaded == ["pretrain"]
    md = (root / "reports/report.md").read_text()
    assert _sections(md, "##") == list(SECTIONS)
    assert "No fine-tuned model at models/finetune: run `python -m pipeline finetune`" in md
    assert "finetune" not in summary["inputs"]


@pytest.mark.parametrize(
    "remove, stage",
    [("models/pretrain", "pretrain"), ("data/shards", "shard"), ("data/tokenizer", "tokenizer"),
     ("data/shards/index.json", "shard"), ("data/tokenizer/tokenizer.json", "tokenizer")],
)
def test_missing_inputs_name_the_path_and_the_command(eval_root, remove, stage):
    import shutil

    root, overrides, _ = eval_root
    target = root / remove
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(PipelineError) as err:
        _run(overrides)
    assert str(target) in str(err.value) and f"python -m pipeline {stage}" in str(err.value)
    assert not (root / "reports").exists()


def test_stage_with_the_real_transformer(eval_root, monkeypatch):
    """The real GPT through the real `load_trained` and `generate` (checkpoint + meta.json written here)."""
    model_pkg = pytest.importorskip("pipeline.model.runs", reason="pipeline.model.runs (load_trained) is not written yet")
    pytest.importorskip("pipeline.apps.generate", reason="pipeline.apps.generate is not written yet")
    import torch

    root, overrides, _ = eval_root
    monkeypatch.setattr(scoring, "load_model", REAL_LOAD_MODEL)  # undo the fixture's fakes
    monkeypatch.setattr(samples, "generate", REAL_GENERATE)
    V = json.loads((root / "data/shards/index.json").read_text())["vocab_size"]
    model_cfg = {"n_layer": 1, "n_head": 2, "d_model": 16, "mlp_hidden": 32, "block_size": 32}
    for i, run in enumerate(("pretrain", "finetune")):
        torch.manual_seed(i)
        gpt = model_pkg.build_model(model_cfg, V)
        d = root / "models" / run
        torch.save({"state_dict": {f"model.{k}": v for k, v in gpt.state_dict().items()}}, d / "checkpoints/last.ckpt")
        (d / "meta.json").write_text(json.dumps({"model": gpt.cfg.to_dict(), "vocab_size": V, "block_size": 32}))
    _, summary = _run(overrides)
    m = summary["metrics"]
    # an untrained transformer is close to uniform over the vocabulary
    assert m["pretrain"]["val_ppl"] == pytest.approx(V, rel=0.25)
    assert m["pretrain"]["val_bpb"] != m["finetune"]["val_bpb"]
    md = (root / "reports/report.md").read_text()
    assert "pretrain: 32, finetune: 32" in md
    assert m["pretrain"]["bleu"] >= 0 and m["finetune"]["rougeL"] >= 0 and m["heldout_pairs"] == 2
    # the real generate is deterministic: a second run (same, absent parent) writes the same report
    import shutil

    shutil.rmtree(root / "runs")
    _run(overrides)
    assert (root / "reports/report.md").read_text() == md


# ------------------------------------------------------------------ ROUGE by hand


def test_rouge_hand_computed():
    hyp, ref = "the cat sat on the mat", "the cat is on the mat"
    # unigrams: 5 of 6 shared (clipped "the" x2); bigrams: the-cat, on-the, the-mat = 3 of 5
    assert M.rouge_n_f1(hyp, ref, 1) == pytest.approx(5 / 6)
    assert M.rouge_n_f1(hyp, ref, 2) == pytest.approx(3 / 5)
    assert M.rouge_l_f1(hyp, ref) == pytest.approx(5 / 6)  # LCS: the cat on the mat
    assert M.rouge_n_f1("a a a", "a", 1) == pytest.approx(0.5)  # clipped: P = 1/3, R = 1
    assert M.rouge_n_f1("x", "y", 1) == 0.0 and M.rouge_n_f1("", "y", 1) == 0.0
    # Chinese has no spaces: characters are the tokens
    assert M.rouge_n_f1("我爱北京", "我爱上海", 1) == pytest.approx(0.5)
    assert M.rouge_n_f1("我爱北京", "我爱上海", 2) == pytest.approx(1 / 3)
    assert M.rouge_n([hyp, "x"], [ref, "y"], 1) == pytest.approx(100 * (5 / 6) / 2)


def test_bleu_counts_chinese_by_character():
    hyp, ref = "今天的天气非常好，我们去公园。", "今天的天气很好，我们去公园散步。"
    # 13a sees one token per sentence (no spaces), so a near match would score 0
    import sacrebleu

    assert sacrebleu.corpus_bleu([hyp], [[ref]], tokenize="13a").score == 0.0
    assert 40 < M.bleu([hyp], [ref]) < 100
    assert M.bleu([ref], [ref]) == pytest.approx(100.0)
    english = ("the cat sat on the mat", "the cat sat on a mat")
    assert M.bleu([english[0]], [english[1]]) == pytest.approx(
        sacrebleu.corpus_bleu([english[0]], [[english[1]]], tokenize="13a").score)


# ------------------------------------------------------------------ parent run and release gate


def test_parent_diff_and_gate(eval_root):
    root, overrides, _ = eval_root
    _, first = _run(overrides)
    history = sorted((root / "runs/eval").glob("run-*.json"))
    assert [p.name for p in history] == ["run-000001.json"]
    rec = json.loads(history[0].read_text())
    assert rec["gate"]["status"] == "PASSED" and rec["metrics"]["pretrain"] == first["metrics"]["pretrain"]

    # second run, one config change: the parent is run 1, the diff names the key, metrics are flagged
    _, second = _run(overrides + ["eval.max_new_tokens=5"])
    md = (root / "reports/report.md").read_text()
    section = md.split("## Comparison with the parent run")[1].split("\n## ")[0]
    assert "Parent: run 1" in section and "same held-out tokens as this run" in section
    assert "| eval.max_new_tokens | 6 | 5 |" in section
    assert "| pretrain.val_bpb |" in section and "| same |" in section  # val bpb does not depend on generation
    assert second["gate"]["status"] == "PASSED" and {r["metric"] for r in second["gate"]["rules"]} == {
        "pretrain.val_bpb", "finetune.val_bpb"}

    # a parent that was much better: the gate fails, the report says so, the stage raises
    better = dict(rec, metrics={**rec["metrics"], "pretrain": {**rec["metrics"]["pretrain"],
                                                              "val_bpb": rec["metrics"]["pretrain"]["val_bpb"] * 0.9}})
    parent_file = root / "better-parent.json"
    parent_file.write_text(json.dumps(better))
    with pytest.raises(PipelineError, match=r"release gate FAILED.*pretrain.val_bpb regressed 11\.\d+% > 2\.00%"):
        _run(overrides + [f"eval.parent={parent_file}"])
    md = (root / "reports/report.md").read_text()
    page = (root / "reports/report.html").read_text()
    assert "**FAILED**: pretrain.val_bpb regressed" in md and 'id="gate-status">FAILED' in page
    assert json.loads((root / "reports/metrics.json").read_text())["gate"] == "FAILED"
    assert "| pretrain.val_bpb |" in md and "| worse |" in md

    # a failed run is recorded but never becomes the parent: the next run compares with run 2
    assert json.loads((root / "runs/eval/run-000003.json").read_text())["gate"]["status"] == "FAILED"
    _, fourth = _run(overrides)
    assert fourth["parent"]["run"] == 2 and fourth["gate"]["status"] == "PASSED"

    # configurable: report FAILED without failing the stage, or no gate at all
    _, s = _run(overrides + [f"eval.parent={parent_file}", "eval.gate.fail=false"])
    assert s["gate"]["status"] == "FAILED"
    _, s = _run(overrides + [f"eval.parent={parent_file}", "eval.gate.enabled=false"])
    assert s["gate"]["status"] == "SKIPPED"
    with pytest.raises(PipelineError, match="eval.gate rule metric 'pretrain.loss'"):
        _run(overrides + ["eval.gate.rules=[{metric: pretrain.loss, max_regression: 0.1}]"])


def test_parent_from_a_reports_directory(eval_root, tmp_path):
    import shutil

    root, overrides, _ = eval_root
    _run(overrides)
    shutil.copytree(root / "reports", tmp_path / "old-reports")
    shutil.rmtree(root / "runs")
    _, s = _run(overrides + [f"eval.parent={tmp_path / 'old-reports'}", "eval.ngram_order=2"])
    md = (root / "reports/report.md").read_text()
    assert "| eval.ngram_order | 3 | 2 |" in md
    assert any(c["metric"] == "ngram.val_bpb" and c["flag"] in ("better", "worse") for c in P.metric_changes(
        json.loads((tmp_path / "old-reports/metrics.json").read_text()), s["metrics"]))
    with pytest.raises(PipelineError, match="eval.parent=.*does not exist"):
        _run(overrides + [f"eval.parent={tmp_path / 'nope.json'}"])


# ------------------------------------------------------------------ DVC metrics and plots


def test_dvc_metrics_and_plots_read_the_report(eval_root):
    """The repo's own dvc.yaml: `dvc metrics show` and `dvc plots show` find what eval wrote."""
    import shutil
    import subprocess
    import sys

    root, overrides, _ = eval_root
    _run(overrides)
    assert (root / "reports/curves/pretrain_train.csv").read_text().startswith("step,loss\n0,5\n")
    shutil.copy(Path(__file__).resolve().parents[1] / "dvc.yaml", root / "dvc.yaml")
    dvc = [sys.executable, "-m", "dvc"]
    subprocess.run(dvc + ["init", "--no-scm", "-q"], cwd=root, check=True)
    out = subprocess.run(dvc + ["metrics", "show", "--json"], cwd=root, check=True, capture_output=True, text=True)
    shown = json.loads(out.stdout)
    metrics = next(iter(shown.values()))["data"]["reports/metrics.json"]["data"]
    assert metrics["pretrain"]["val_bpb"] == json.loads((root / "reports/metrics.json").read_text())["pretrain"]["val_bpb"]
    out = subprocess.run(dvc + ["plots", "show", "--json"], cwd=root, check=True, capture_output=True, text=True)
    assert "pretrain_train.csv" in out.stdout and "finetune_val.csv" in out.stdout
    assert "error" not in out.stdout.lower()


# ------------------------------------------------------------------ the HTML in a real browser


def test_report_in_headless_chromium(eval_root, tmp_path):
    """Open report.html in Debian's Chromium: every image decodes, every section is there, nothing is fetched."""
    import shutil

    sync_api = pytest.importorskip("playwright.sync_api")  # a dev dependency: installed by scripts/setup.sh
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "Chromium is not installed: `apt-get install chromium` (scripts/setup.sh does it as root)"
    root, overrides, _ = eval_root
    _run(overrides)
    page_path = root / "reports/report.html"
    shot = tmp_path / "report.png"
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=chromium, headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run"],
        )
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            fetched, errors = [], []
            page.on("request", lambda r: fetched.append(r.url))
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(page_path.as_uri())
            page.wait_for_load_state("load")
            images = page.eval_on_selector_all(
                "img", "els => els.map(e => ({alt: e.alt, ok: e.complete && e.naturalWidth > 0, w: e.naturalWidth}))")
            headings = page.eval_on_selector_all("h2", "els => els.map(e => e.textContent.trim())")
            gate = page.text_content("#gate-status")
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert len(images) == 3 and all(i["ok"] for i in images), f"broken image(s) in the report: {images}"
    assert headings == list(SECTIONS)
    assert gate == "PASSED" and not errors
    assert [u for u in fetched if not u.startswith(("data:", "file:"))] == []
    assert shot.stat().st_size > 20_000  # a real full-page render, not a blank frame


# ------------------------------------------------------------------ published by the Prefect flow


def test_flow_publishes_the_report_even_when_the_gate_fails(eval_root):
    """`evaluation-report` artifact on a real (temporary) Prefect server, PASSED then FAILED."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.testing.utilities import prefect_test_harness

    from flows.build import build_model

    root, overrides, _ = eval_root

    async def latest():
        async with get_client() as client:
            arts = await client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["evaluation-report"])))
            return sorted(arts, key=lambda a: a.created)[-1]

    with prefect_test_harness(server_startup_timeout=180):
        build_model(overrides=overrides, stages=["eval"])
        art = asyncio.run(latest())
        assert art.type == "markdown" and "**PASSED**" in art.data and "## Release gate" in art.data
        rec = json.loads((root / "runs/eval/run-000001.json").read_text())
        pre = rec["metrics"]["pretrain"]
        rec["metrics"]["pretrain"] = {**pre, "val_bpb": pre["val_bpb"] * 0.5}
        (root / "better.json").write_text(json.dumps(rec))
        with pytest.raises(PipelineError, match="release gate FAILED"):
            build_model(overrides=overrides + [f"eval.parent={root / 'better.json'}"], stages=["eval"])
        art = asyncio.run(latest())
        assert "**FAILED**" in art.data and "stage failed" in art.description
