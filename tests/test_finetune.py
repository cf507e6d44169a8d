"""Fine-tuning: pair derivation from pydoc text, custom data, the answer-only loss mask,
and a tiny end-to-end run from a tiny pretrained model."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from pipeline import finetune, pretrain, sft_data
from pipeline.config import load
from pipeline.errors import PipelineError
from pipeline.generate import generate_from_run
from pipeline.model import load_trained
from fixtures import make_project, write_tokenizer
from pipeline.model.lightning import RowBatches, collate
from pipeline.splits import is_val

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
    assert sft_data.chat_prompt("Q?") == "<|user|>Q?<|end|><|assistant|>"
    assert sft_data.chat_prompt("Q?", "Be brief.") == "<|system|>Be brief.<|end|><|user|>Q?<|end|><|assistant|>"


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return write_tokenizer(tmp_path_factory.mktemp("tok"), [FLAT_PAGE, PLAIN_PAGE], vocab_size=300)


def test_loss_mask_covers_only_answer_tokens(tok):
    ids, labels = sft_data.encode_pair(tok, "What does json.dumps do?", "Serialize obj.")
    answer = tok.encode("Serialize obj.", add_special_tokens=False).ids + [tok.token_to_id("<|end|>")]
    prompt = [0] + tok.encode("<|user|>What does json.dumps do?<|end|><|assistant|>", add_special_tokens=False).ids
    assert ids == prompt + answer
    assert labels == [-100] * len(prompt) + answer
    assert tok.token_to_id("<|user|>") in prompt and tok.token_to_id("<|assistant|>") == prompt[-1]
    # batched: targets are the next token, supervised only where the next token is an answer token
    rows = sft_data.pack([sft_data.encode_pair(tok, f"q{i}?", f"answer {i}.") for i in range(5)], max_len=40)
    assert 1 < len(rows) < 5 and all(len(r[0]) <= 40 for r in rows)
    x, y = collate(rows, pad_id=tok.token_to_id("<|pad|>"))
    for b, (rid, rlab) in enumerate(rows):
        n = len(rid) - 1
        assert x[b, :n].tolist() == rid[:-1]
        for t in range(n):
            assert y[b, t].item() == (rid[t + 1] if rlab[t + 1] != -100 else -100)
        assert (y[b, n:] == -100).all()
    supervised = y[y != -100]
    assert set(supervised.tolist()) <= {t for _, lab in rows for t in lab if t != -100}
    assert (y != -100).sum() == sum(sum(1 for t in lab if t != -100) for _, lab in rows)


def test_long_examples_are_cut_to_the_block(tok):
    ids, labels = sft_data.encode_pair(tok, "q " * 200, "a " * 200, max_len=50)
    assert len(ids) == len(labels) == 50
    assert labels[-1] != -100 and labels[0] == -100 and ids[-26] == tok.token_to_id("<|assistant|>")


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
        {"instruction": "Say hi.", "input": "", "output": "hi"},
        {"instruction": "Say hi.", "input": "", "output": "duplicate question, dropped"},
    ]))
    pairs = sft_data.load_custom(alpaca)
    assert [(p["question"], p["answer"]) for p in pairs] == [("Add the numbers.\n\n2 and 3", "5"), ("Say hi.", "hi")]
    chat = tmp_path / "c.jsonl"
    chat.write_text("\n".join(json.dumps({"messages": m}) for m in [
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "U1"},
         {"role": "assistant", "content": "A1"}, {"role": "user", "content": "U2"},
         {"role": "assistant", "content": "A2"}],
        [{"role": "user", "content": "U3"}, {"role": "assistant", "content": "A3"}],
    ]) + "\n")
    pairs = sft_data.load_custom(chat)
    assert [(p["question"], p["answer"], p.get("system")) for p in pairs] == [
        ("U1", "A1", "Be brief."), ("U2", "A2", "Be brief."), ("U3", "A3", None)]
    assert all(p["doc_id"] == sft_data.content_id(p["question"]) for p in pairs)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "no pairs here"}\n')
    with pytest.raises(PipelineError, match="neither Alpaca"):
        sft_data.load_custom(bad)


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
    train = sft_data.read_jsonl(out / "sft" / "train.jsonl")
    held = sft_data.read_jsonl(out / "sft" / "heldout.jsonl")
    assert train and held
    assert all(set(p) == {"question", "answer", "doc_id"} for p in train + held)
    frac = cfg.shard.val_fraction
    assert all(is_val(p["doc_id"], frac) for p in held) and not any(is_val(p["doc_id"], frac) for p in train)
    assert not {p["question"] for p in train} & {p["question"] for p in held}
    assert summary["steps"] == 12 and summary["pairs"]["train_pairs"] == len(train)
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


def test_finetune_on_custom_chat_data(pretrained, tmp_path):
    root, overrides = pretrained
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(
        json.dumps({"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                                 {"role": "assistant", "content": f"{2 * i}."}]}) + "\n" for i in range(40)))
    cfg = load([*overrides, f"finetune.data={data}", f"paths.finetune={tmp_path / 'ft'}", "finetune.max_steps=4"])
    summary = finetune.run(cfg)
    assert summary["pairs"]["kind"] == "file" and summary["pairs"]["pairs"] == 40
    held = sft_data.read_jsonl(tmp_path / "ft" / "sft" / "heldout.jsonl")
    assert all(is_val(p["doc_id"], cfg.shard.val_fraction) for p in held)


def test_finetune_errors(tmp_path, pretrained):
    cfg = load([f"paths.root={tmp_path}"])
    with pytest.raises(PipelineError, match="python -m pipeline pretrain"):
        finetune.run(cfg)
    root, overrides = pretrained
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(PipelineError, match="no question/answer pairs"):
        finetune.run(load([*overrides, f"finetune.data={empty}", f"paths.finetune={tmp_path / 'ft'}"]))
    with pytest.raises(PipelineError, match="not found"):
        finetune.run(load([*overrides, f"finetune.data={tmp_path / 'missing.json'}"]))
    assert not (tmp_path / "ft").exists()
