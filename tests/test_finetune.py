"""Fine-tuning: pair derivation from pydoc text, user data (Alpaca, chat, local HF datasets)
with bad records counted, the assistant-only loss mask token by token, packing without
attention leaking across examples, overlong examples, LoRA, and tiny end-to-end runs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from pipeline.stages import finetune, pretrain

from pipeline.training import sft_data
from pipeline.core.config import load
from pipeline.core.errors import PipelineError
from pipeline.apps.generate import generate_from_run
from pipeline.model.runs import load_trained
from fixtures import make_project, write_tokenizer
from pipeline.training.lightning import RowBatches, collate
from pipeline.core.splits import is_val
from pipeline.tokenize import special

# What the clean stage makes of a pydoc HTML page: flat class bodies, indented docstrings.
FLAT_PAGE = """json (version 2.0.9)
index
/usr/lib/python3.11/json/__init__.py
Module Reference

JSON (JavaScript Object Notation) <https://json.org> is a subset of
JavaScript syntax (ECMA-262 3rd edition) used as a lightweight data
interchange format.

:mod:`json` exposes an API familiar to users.

Package Contents

decoder
encoder

Classes

class JSONDecoder(builtins.object)

JSONDecoder(*, object_hook=None, parse_float=None, strict=True)

Simple JSON <https://json.org> decoder

Performs the following translations in decoding by default:

Methods defined here:
__init__(self, *, object_hook=None, parse_float=None, strict=True)
    ``object_hook``, if specified, will be called with the result
    of every JSON object decoded.
decode(self, s, _w=<built-in method match>)
    Return the Python representation of ``s`` (a ``str`` instance
    containing a JSON document).

    More text here.
raw_decode(self, s, idx=0)
    Decode a JSON document from ``s`` and return a 2-tuple. E.g. see below.

Data descriptors defined here:
__dict__
    dictionary for instance variables

class JSONDecodeError(builtins.ValueError)

JSONDecodeError(msg, doc, pos)

Subclass of ValueError with the following additional properties:

Methods inherited from builtins.ValueError:
with_traceback(self, tb)
    Set self.__traceback__ to tb and return self.

Functions

dumps(obj, *, skipkeys=False, ensure_ascii=True, separators=(', ', ': '), **kw)
    Serialize ``obj`` to a JSON formatted ``str``.

    If ``skipkeys`` is true then ``dict`` keys that are not basic types
    will be skipped instead of raising a ``TypeError``.
loads(s, *, cls=None, object_hook=None, **kw) -> object
    Deserialize ``s`` (a ``str``, ``bytes`` or ``bytearray`` instance
    containing a JSON document) to a Python object, i.e. parse it. And more.
_private(x)
    Never asked about.

Data

__all__ = ['dump', 'dumps']
"""

# pydoc's own plain text: class bodies indented behind " |  " bars.
PLAIN_PAGE = """Python Library Documentation: module shlex

NAME
    shlex - A lexical analyzer class for simple shell-like syntaxes.

CLASSES
    builtins.object
        shlex

    class shlex(builtins.object)
     |  shlex(instream=None, infile=None, posix=False, punctuation_chars=False)
     |
     |  A lexical analyzer class for simple shell-like syntaxes.
     |
     |  Methods defined here:
     |
     |  get_token(self)
     |      Get a token from the input stream (or from stack if it's nonempty)
     |
     |  push_token(self, tok)
     |      Push a token onto the stack popped by the get_token method
     |
     |  ----------------------------------------------------------------------
     |  Methods inherited from builtins.object:
     |
     |  __repr__(self)
     |      Return repr(self).
     |
     |  inherited_thing(self)
     |      Lives on another page.

FUNCTIONS
    quote(s)
        Return a shell-escaped version of the string *s*.

    split(s, comments=False, posix=True)
        Split the string *s* using shell-like syntax.
"""


def test_pairs_from_flat_html_text():
    pairs = dict(sft_data.pydoc_pairs(FLAT_PAGE, "json", max_answer_words=40))
    assert pairs["What does the json module do?"].startswith("JSON (JavaScript Object Notation)")
    assert pairs["What does the json module do?"].endswith("interchange format.")
    assert pairs["What is the json.JSONDecoder class?"] == "Simple JSON <https://json.org> decoder"
    assert pairs["What does json.JSONDecoder.decode do?"] == (
        "Return the Python representation of ``s`` (a ``str`` instance containing a JSON document)."
    )
    assert pairs["What does json.JSONDecoder.raw_decode do?"] == (
        "Decode a JSON document from ``s`` and return a 2-tuple."
    )
    assert pairs["What is the json.JSONDecodeError class?"].startswith("Subclass of ValueError")
    assert pairs["What does json.dumps do?"] == "Serialize ``obj`` to a JSON formatted ``str``."
    # abbreviations do not end a sentence
    assert pairs["What does json.loads do?"].endswith("to a Python object, i.e. parse it.")
    questions = set(pairs)
    assert not any("_private" in q or "__init__" in q or "with_traceback" in q for q in questions)
    assert not any("JSONDecoder.JSONDecoder" in q for q in questions)  # the repeated constructor line
    assert len(questions) == 7


def test_pairs_from_plain_pydoc_text_and_truncation():
    pairs = sft_data.pydoc_pairs(PLAIN_PAGE, "shlex", max_answer_words=40)
    got = dict(pairs)
    assert got == {
        "What does the shlex module do?": "A lexical analyzer class for simple shell-like syntaxes.",
        "What is the shlex.shlex class?": "A lexical analyzer class for simple shell-like syntaxes.",
        "What does shlex.shlex.get_token do?": "Get a token from the input stream (or from stack if it's nonempty)",
        "What does shlex.shlex.push_token do?": "Push a token onto the stack popped by the get_token method",
        "What does shlex.quote do?": "Return a shell-escaped version of the string *s*.",
        "What does shlex.split do?": "Split the string *s* using shell-like syntax.",
    }
    assert [q for q, _ in pairs][0] == "What does the shlex module do?"  # page order
    short = dict(sft_data.pydoc_pairs(PLAIN_PAGE, "shlex", max_answer_words=3))
    assert short["What does shlex.quote do?"] == "Return a shell-escaped"


def test_helpers():
    assert sft_data.module_from_url("pydoc:///json.html") == "json"
    assert sft_data.module_from_url("http://127.0.0.1:4321/os.path.html") == "os.path"
    assert sft_data.module_from_url("http://127.0.0.1:4321/") is None
    assert sft_data.module_from_url("http://127.0.0.1:4321/topic?key=X") is None
    assert sft_data.first_sentence("Do it, e.g. now.  Then more.", 10) == "Do it, e.g. now."
    assert special.chat_prompt("Q?") == "<|user|>Q?<|end|><|assistant|>"
    assert special.chat_prompt("Q?", "Be brief.") == "<|system|>Be brief.<|end|><|user|>Q?<|end|><|assistant|>"


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return write_tokenizer(tmp_path_factory.mktemp("tok"), [FLAT_PAGE, PLAIN_PAGE], vocab_size=300)


def _labels_by_hand(tok, messages):
    """The expected token-level mask, built independently: tokenize the rendered text piece by
    piece and mark which pieces are assistant contents (+ their <|end|>)."""
    ids, sup = [tok.token_to_id("<|endoftext|>")], [False]
    for m in messages:
        for text, supervised in ((f"<|{m['role']}|>", False), (m["content"], m["role"] == "assistant"),
                                 ("<|end|>", m["role"] == "assistant")):
            piece = tok.encode(text, add_special_tokens=False).ids
            ids += piece
            sup += [supervised] * len(piece)
    return ids, sup


def test_loss_mask_covers_only_assistant_tokens_token_by_token(tok):
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What does json.dumps do?"},
            {"role": "assistant", "content": "Serialize obj."}, {"role": "user", "content": "And loads?"},
            {"role": "assistant", "content": "Parse a string."}]
    ids, labels, status = sft_data.encode_messages(tok, conv)
    assert status == "ok"
    want_ids, supervised = _labels_by_hand(tok, conv)
    # the ids are exactly the tokenization of the rendered chat text (what the HF chat template gives)
    assert ids == want_ids == tok.encode("<|endoftext|>" + special.render_chat(conv), add_special_tokens=False).ids
    role = {tok.token_to_id(t) for t in ("<|system|>", "<|user|>", "<|assistant|>")}
    for t, (i, lab, sup) in enumerate(zip(ids, labels, supervised)):
        assert lab == (i if sup else -100), f"token {t} ({tok.id_to_token(i)!r}): label {lab}, supervised={sup}"
        if i in role or i == tok.token_to_id("<|endoftext|>"):
            assert lab == -100
    answers = [tok.encode(a, add_special_tokens=False).ids + [tok.token_to_id("<|end|>")]
               for a in ("Serialize obj.", "Parse a string.")]
    assert [t for t in labels if t != -100] == answers[0] + answers[1]
    # one question: the prompt is what generation sees (chat_prompt), the answer follows
    ids, labels = sft_data.encode_pair(tok, "What does json.dumps do?", "Serialize obj.")
    prompt = [0] + tok.encode(special.chat_prompt("What does json.dumps do?"), add_special_tokens=False).ids
    assert ids == prompt + answers[0] and labels == [-100] * len(prompt) + answers[0]
    # batched: targets are the next token, supervised only where the next token is an answer token
    rows = sft_data.pack([sft_data.encode_pair(tok, f"q{i}?", f"answer {i}.") for i in range(5)], max_len=40)
    assert 1 < len(rows) < 5 and all(len(r[0]) <= 40 for r in rows)
    x, y, seg = collate(rows, pad_id=tok.token_to_id("<|pad|>"))
    for b, (rid, rlab, rseg) in enumerate(rows):
        n = len(rid) - 1
        assert x[b, :n].tolist() == rid[:-1] and seg[b, :n].tolist() == rseg[:-1]
        for t in range(n):
            assert y[b, t].item() == (rid[t + 1] if rlab[t + 1] != -100 else -100)
        assert (y[b, n:] == -100).all() and (seg[b, n:] == -1).all()
    assert (y != -100).sum() == sum(sum(1 for t in lab if t != -100) for _, lab, _ in rows)


def test_packed_examples_do_not_attend_to_each_other(tok):
    from pipeline.model.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.get_vocab_size(), block_size=64, n_layer=2, n_head=2, d_model=32,
                          mlp_hidden=48)).eval()
    examples = [sft_data.encode_pair(tok, q, a) for q, a in
                [("What is x?", "A letter."), ("Why?", "Because it is documented so."), ("Who?", "Me.")]]
    rows = sft_data.pack(examples, max_len=65)
    assert len(rows) == 1 and sorted(set(rows[0][2])) == [0, 1, 2]
    padded = sft_data.pack(examples, max_len=65, packing=False)
    assert len(padded) == 3 and all(len(r) == 2 for r in padded)
    pad = tok.token_to_id("<|pad|>")
    for arch in ("llama", "gpt2"):
        torch.manual_seed(1)
        model = GPT(GPTConfig(**{**model.cfg.to_dict(), "arch": arch})).eval()
        x, _, seg = collate(rows, pad)
        xp, _ = collate(padded, pad)
        with torch.no_grad():
            packed_logits = model(x, segments=seg)
            alone = model(xp)
            leaky = model(x)  # plain causal attention over the packed row
        start = 0
        for k, (ids, _) in enumerate(examples):
            n = len(ids) - 1  # a padded row's inputs stop before its last token
            torch.testing.assert_close(packed_logits[0, start : start + n], alone[k, :n], rtol=0, atol=1e-5)
            start += len(ids)
        assert (leaky[0, len(examples[0][0]):] - packed_logits[0, len(examples[0][0]):]).abs().max() > 1e-3


def test_overlong_examples_truncated_or_dropped_and_counted(tok):
    ids, labels = sft_data.encode_pair(tok, "q " * 200, "a " * 200, max_len=50)
    assert len(ids) == len(labels) == 50
    assert labels[-1] != -100 and labels[0] == -100 and ids[-26] == tok.token_to_id("<|assistant|>")
    pairs = [{"question": "q " * 200, "answer": "a " * 200}, {"question": "Short?", "answer": "Yes."},
             {"messages": [{"role": "user", "content": "u " * 100}, {"role": "assistant", "content": "x"},
                           {"role": "user", "content": "again"}, {"role": "assistant", "content": "y"}]}]
    stats: dict = {}
    rows = sft_data.build_rows(tok, pairs, block_size=49, packing=False, overlong="truncate", stats=stats)
    # the conversation's answers lie past the first 50 tokens: nothing left to learn, dropped
    assert stats == {"examples": 3, "truncated": 1, "dropped_overlong": 1} and len(rows) == 2
    stats = {}
    rows = sft_data.build_rows(tok, pairs, block_size=49, packing=True, overlong="drop", stats=stats)
    assert stats == {"examples": 3, "truncated": 0, "dropped_overlong": 2} and len(rows) == 1
    with pytest.raises(PipelineError, match="overlong"):
        sft_data.encode_messages(tok, sft_data.pair_messages(pairs[1]), 10, overlong="cut")


def test_row_batches_cover_each_row_once_per_epoch():
    rows = [([0, i, i], [-100, i, i]) for i in range(10)]
    rb = RowBatches(rows, batch_size=5, seed=3, pad_id=1)
    seen = rb.indices(0) + rb.indices(1)
    assert sorted(seen) == list(range(10))
    assert rb.indices(2) != rb.indices(0) or rb.indices(3) != rb.indices(1)  # reshuffled next epoch
    r0 = RowBatches(rows, 5, 3, 1, rank=0, world=2)
    r1 = RowBatches(rows, 5, 3, 1, rank=1, world=2)
    assert sorted(r0.indices(0) + r1.indices(0)) == list(range(10))  # ranks split an epoch




def test_custom_alpaca_and_chat_data(tmp_path):
    alpaca = tmp_path / "a.json"
    alpaca.write_text(json.dumps([
        {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
        {"instruction": "Say hi.", "input": "", "output": "hi", "system": "Be kind."},
        {"instruction": "Say hi.", "input": "", "output": "duplicate question, dropped"},
        {"instruction": "", "output": "empty instruction"},
        ["not", "an", "object"],
    ]))
    report = sft_data.DataReport()
    pairs = sft_data.load_custom(alpaca, report=report)
    assert [(p["question"], p["answer"], p.get("system")) for p in pairs] == [
        ("Add the numbers.\n\n2 and 3", "5", None), ("Say hi.", "hi", "Be kind.")]
    r = report.to_dict()
    assert r["records"] == 5 and r["kept"] == 2
    assert r["skipped"] == {"duplicate": 1, "empty": 1, "not_an_object": 1}
    assert r["problems"]["not_an_object"] == [f"{alpaca}: record 5: a list, not a JSON object"]

    chat = tmp_path / "c.jsonl"
    lines = [json.dumps({"messages": m}) for m in [
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "U1"},
         {"role": "assistant", "content": "A1"}, {"role": "user", "content": "U2"},
         {"role": "assistant", "content": "A2"}, {"role": "user", "content": "dangling, no answer"}],
        [{"role": "user", "content": "U3"}, {"role": "assistant", "content": "A3"}],
    ]]
    lines.insert(1, '{"messages": [{"role": "user", "content": "cut off')  # line 2: bad JSON
    lines.insert(2, "")  # blank lines are not records
    lines.insert(3, json.dumps({"messages": [{"role": "robot", "content": "?"}]}))  # line 4
    lines.append(json.dumps({"messages": [{"role": "user", "content": "no answer"}]}))  # line 6
    lines.append(json.dumps({"text": "neither format"}))  # line 7
    chat.write_text("\n".join(lines) + "\n")
    report = sft_data.DataReport()
    pairs = sft_data.load_custom(chat, report=report)
    assert len(pairs) == 2
    conv, single = pairs
    assert conv["question"] == "U2" and conv["answer"] == "A2" and [m["role"] for m in conv["messages"]] == [
        "system", "user", "assistant", "user", "assistant"]  # the dangling user turn is dropped
    assert single == {"question": "U3", "answer": "A3", "doc_id": sft_data.content_id("U3")}
    r = report.to_dict()
    assert r["records"] == 6 and r["kept"] == 2 and r["skipped_total"] == 4
    assert r["skipped"] == {"bad_json": 1, "bad_messages": 1, "no_assistant_turn": 1, "unknown_format": 1}
    assert r["problems"]["bad_json"][0].startswith(f"{chat}:2: ")
    assert r["problems"]["bad_messages"][0].startswith(f"{chat}:4: ")
    assert r["problems"]["no_assistant_turn"][0].startswith(f"{chat}:6: ")
    assert r["problems"]["unknown_format"][0].startswith(f"{chat}:7: neither Alpaca")
    # a stored conversation encodes with every assistant turn supervised
    assert sft_data.pair_messages(conv) == conv["messages"]


def test_local_hugging_face_datasets(tmp_path):
    import datasets

    rows = [{"instruction": f"Double {i}.", "input": "", "output": str(2 * i)} for i in range(6)]
    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows),
                          "test": datasets.Dataset.from_list(rows[:2])}).save_to_disk(str(saved))
    assert [p["answer"] for p in sft_data.load_custom(saved)] == ["0", "2", "4", "6", "8", "10"]
    assert len(sft_data.load_custom(saved, split="test")) == 2
    with pytest.raises(PipelineError, match="no split 'dev'"):
        sft_data.load_custom(saved, split="dev")
    data_dir = tmp_path / "parquet_dir"
    data_dir.mkdir()
    chats = [{"messages": [{"role": "user", "content": f"Hi {i}"}, {"role": "assistant", "content": f"Hello {i}"}]}
             for i in range(3)]
    datasets.Dataset.from_list(chats).to_parquet(str(data_dir / "train.parquet"))
    report = sft_data.DataReport()
    pairs = sft_data.load_custom(data_dir, report=report)
    assert [p["answer"] for p in pairs] == ["Hello 0", "Hello 1", "Hello 2"] and report.records == 3
    with pytest.raises(PipelineError, match="not a readable Hugging Face dataset"):
        sft_data.load_custom(tmp_path / "missing.parquet")


# ---------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    root = tmp_path_factory.mktemp("ftproj")
    overrides = make_project(root)
    cfg = load(overrides)
    pretrain.run(cfg)
    return root, overrides


def test_finetune_run_writes_layout_and_splits_by_document(pretrained):
    root, overrides = pretrained
    cfg = load(overrides)
    summary = finetune.run(cfg)
    out = Path(cfg.paths.finetune)
    for rel in ("checkpoints/last.ckpt", "metrics.csv", "meta.json", "tokenizer.json", "_summary.json",
                "hf/config.json", "hf/model.safetensors", "sft/train.jsonl", "sft/heldout.jsonl"):
        assert (out / rel).is_file(), rel
    train = [json.loads(s) for s in (out / "sft" / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    held = [json.loads(s) for s in (out / "sft" / "heldout.jsonl").read_text(encoding="utf-8").splitlines()]
    assert train and held
    assert all(set(p) == {"question", "answer", "doc_id"} for p in train + held)
    frac = cfg.shard.val_fraction
    assert all(is_val(p["doc_id"], frac) for p in held) and not any(is_val(p["doc_id"], frac) for p in train)
    assert not {p["question"] for p in train} & {p["question"] for p in held}
    assert summary["steps"] == 12 and summary["pairs"]["train_pairs"] == len(train)
    assert summary["method"] == "full" and summary["packing"] and summary["trainable_params"] == summary["params"]
    assert summary["length"]["train"]["examples"] == len(train)
    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows if r["val_loss"]] == [6, 12]
    # started from the pretrained weights, and moved away from them
    base, _ = load_trained(cfg.paths.pretrain)
    tuned, meta = load_trained(out)
    assert meta["stage"] == "finetune" and tuned.cfg == base.cfg
    diffs = [(a - b).abs().max().item() for a, b in zip(base.state_dict().values(), tuned.state_dict().values())]
    assert 0 < max(diffs) < 1.0
    # "latest" now means the fine-tuned model, prompted with the chat template
    a = generate_from_run(cfg, "What does json.dumps do?", max_new_tokens=8, temperature=0.0)
    b = generate_from_run(cfg, "<|user|>What does json.dumps do?<|end|><|assistant|>", which="finetune",
                          max_new_tokens=8, temperature=0.0)
    assert a == b
    # rerunning gives the same weights (seeded, step-indexed batches)
    finetune.run(cfg)
    again, _ = load_trained(out)
    assert all(torch.equal(p, q) for p, q in zip(tuned.state_dict().values(), again.state_dict().values()))


def test_finetune_on_custom_chat_data_counts_bad_lines(pretrained, tmp_path):
    root, overrides = pretrained
    data = tmp_path / "chat.jsonl"
    good = [json.dumps({"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                                     {"role": "assistant", "content": f"{2 * i}."}]}) for i in range(40)]
    data.write_text("\n".join(good[:10] + ["{not json", json.dumps({"prompt": "x"})] + good[10:]) + "\n")
    cfg = load([*overrides, f"finetune.data={data}", f"paths.finetune={tmp_path / 'ft'}", "finetune.max_steps=4"])
    summary = finetune.run(cfg)
    info = summary["pairs"]
    assert info["kind"] == "file" and info["pairs"] == 40
    assert info["data"]["records"] == 42 and info["data"]["skipped"] == {"bad_json": 1, "unknown_format": 1}
    assert info["data"]["problems"]["bad_json"][0].startswith(f"{data}:11: ")
    held = [json.loads(s) for s in (tmp_path / "ft" / "sft" / "heldout.jsonl").read_text(encoding="utf-8").splitlines()]
    assert all(is_val(p["doc_id"], cfg.shard.val_fraction) for p in held)
    # a local Hugging Face dataset (save_to_disk) goes through the same stage
    import datasets

    saved = tmp_path / "hf_ds"
    rows = [{"instruction": f"Triple {i}.", "input": "", "output": f"{3 * i}."} for i in range(30)]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(saved))
    cfg = load([*overrides, f"finetune.data={saved}", f"paths.finetune={tmp_path / 'ft2'}", "finetune.max_steps=2",
                "finetune.val_every=2", "finetune.overlong=drop"])
    summary = finetune.run(cfg)
    assert summary["pairs"]["pairs"] == 30 and summary["pairs"]["data"]["records"] == 30
    assert summary["overlong"] == "drop" and summary["length"]["train"]["dropped_overlong"] == 0


def test_lora_finetune_trains_adapters_and_merges_them(pretrained, tmp_path):
    from pipeline.model.hf import to_hf
    from pipeline.model.runs import CKPT

    root, overrides = pretrained
    out = tmp_path / "lora"
    cfg = load([*overrides, "finetune=lora", f"paths.finetune={out}", "finetune.max_steps=6",
                "finetune.val_every=6", "finetune.packing=false", "finetune.lora.r=4"])
    summary = finetune.run(cfg)
    assert summary["method"] == "lora" and summary["lora"]["r"] == 4 and not summary["packing"]
    assert 0 < summary["trainable_params"] < summary["params"] / 4
    sd = torch.load(out / CKPT, map_location="cpu", weights_only=True)["state_dict"]
    assert any(k.endswith("lora_A") for k in sd) and any(k.endswith(".parametrizations.weight.original") for k in sd)
    base, _ = load_trained(cfg.paths.pretrain)
    tuned, _ = load_trained(out)  # merged: a plain model of the same architecture
    b, t = base.state_dict(), tuned.state_dict()
    assert b.keys() == t.keys()
    changed = {k for k in b if not torch.equal(b[k], t[k])}
    assert changed and all(k.startswith("blocks.") and k.endswith(".weight") and "norm" not in k for k in changed)
    assert "tok_emb.weight" not in changed
    # the export carries the merged weights
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(out / "hf")
    idx = torch.randint(0, tuned.cfg.vocab_size, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, tuned(idx), rtol=0, atol=1e-4)
        torch.testing.assert_close(to_hf(tuned)(idx).logits, tuned(idx), rtol=0, atol=1e-4)


def test_lora_merge_matches_the_parametrized_model():
    from pipeline.model.gpt import GPT, GPTConfig
    from pipeline.model.lora import apply_lora, merge_state_dict, merged

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, d_model=16, mlp_hidden=32))
    names = apply_lora(model, r=2, alpha=4, targets=["attn.qkv", "mlp.down"])
    assert names == ["blocks.0.attn.qkv", "blocks.0.mlp.down", "blocks.1.attn.qkv", "blocks.1.mlp.down"]
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        f"blocks.{i}.{m}.parametrizations.weight.0.lora_{ab}" for i in (0, 1) for m in ("attn.qkv", "mlp.down")
        for ab in "AB"}
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    idx = torch.randint(0, 50, (2, 16))
    plain = merged(model)
    fresh = GPT(model.cfg)
    fresh.load_state_dict(merge_state_dict(model.state_dict()))
    with torch.no_grad():
        torch.testing.assert_close(plain(idx), model(idx), rtol=0, atol=1e-5)
        torch.testing.assert_close(fresh(idx), model(idx), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="match no Linear"):
        apply_lora(GPT(model.cfg), 2, 4, ["nothing"])


def test_finetune_errors(tmp_path, pretrained):
    cfg = load([f"paths.root={tmp_path}"])
    with pytest.raises(PipelineError, match="python -m pipeline pretrain"):
        finetune.run(cfg)
    root, overrides = pretrained
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(PipelineError, match="no question/answer pairs"):
        finetune.run(load([*overrides, f"finetune.data={empty}", f"paths.finetune={tmp_path / 'ft'}"]))
    bad = tmp_path / "bad.jsonl"
    bad.write_text("nope\n{}\n")
    with pytest.raises(PipelineError, match="2 records skipped"):
        finetune.run(load([*overrides, f"finetune.data={bad}", f"paths.finetune={tmp_path / 'ft'}"]))
    with pytest.raises(PipelineError, match="not found"):
        finetune.run(load([*overrides, f"finetune.data={tmp_path / 'missing.json'}"]))
    with pytest.raises(PipelineError, match="finetune.method"):
        finetune.run(load([*overrides, "finetune.method=qlora", f"paths.finetune={tmp_path / 'ft'}"]))
    assert not (tmp_path / "ft").exists()


def test_a_corpus_without_pairs_skips_fine_tuning_and_eval_reports_the_pretrained_model(tmp_path, pretrained):
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.core.artifacts import doc_id
    from pipeline.model.runs import run_dir_for
    from pipeline.stages import eval as evaluate

    root, overrides = pretrained
    clean = tmp_path / "clean"
    clean.mkdir()
    texts = [f"Chapter {i}. The ship sailed north for {i} days and the crew sang." * 5 for i in range(8)]
    pq.write_table(pa.Table.from_pylist([{"id": doc_id(t), "text": t, "url": f"file:///book/{i}.txt",
                                          "source": "files", "raw_id": doc_id(t)} for i, t in enumerate(texts)]),
                   clean / "part-00000.parquet")
    args = [*overrides, f"paths.clean={clean}", f"paths.finetune={tmp_path / 'ft'}",
            f"paths.reports={tmp_path / 'reports'}", f"eval.history_dir={tmp_path / 'history'}",
            "eval.max_val_tokens=2000", "eval.lstm.enabled=false", "eval.max_new_tokens=4", "eval.gate.enabled=false"]
    summary = finetune.run(load(args))
    assert "no question/answer pairs" in summary["skipped"] and summary["steps"] == 0
    assert json.loads((tmp_path / "ft" / "_summary.json").read_text())["skipped"] == summary["skipped"]
    assert not (tmp_path / "ft" / "checkpoints").exists()
    assert run_dir_for(load(args), "latest") == root / "models" / "pretrain"
    report = evaluate.run(load(args))
    metrics = json.loads((tmp_path / "reports" / "metrics.json").read_text())
    assert "pretrain" in metrics and "finetune" not in metrics, metrics.keys()
    assert report["stage"] == "eval"


def test_a_max_pairs_cap_is_logged(tmp_path, caplog):
    from pipeline.training.sft_data import load_custom

    data = tmp_path / "alpaca.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"q{i}?", "output": f"a{i}."}) + "\n" for i in range(10)))
    assert len(load_custom(data)) == 10  # no cap: all of it
    with caplog.at_level("WARNING"):
        assert len(load_custom(data, max_pairs=4)) == 4
    assert "finetune.max_pairs=4 keeps the first 4 of 10 records" in caplog.text
