"""Hugging Face export: `python -m pipeline export` writes a `transformers` directory that loads
without unpickling, gives our logits, runs in `pipeline("text-generation")`, and (for the GPT-2
architecture) works with GPT-2's classes exactly as blog-post code calls them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from unittest import mock

import pytest
import torch

from fixtures import make_project
from pipeline.apps import cli
from pipeline.stages import pretrain
from pipeline.core.config import load
from pipeline.model.hf import PICKLE_SUFFIXES
from pipeline.model.runs import load_trained
from pipeline.tokenize.bpe import load as load_tokenizer

FAST = ["pretrain.max_steps=8", "pretrain.val_every=4"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One tiny project, two pretrained runs: the default (Llama) and the GPT-2 architecture."""
    root = tmp_path_factory.mktemp("exportproj")
    overrides = [*make_project(root), *FAST]
    pretrain.run(load(overrides))
    gpt2 = [*overrides, "model=gpt2_tiny", f"paths.pretrain={root / 'models' / 'gpt2'}",
            "model.n_layer=2", "model.n_head=2", "model.d_model=32", "model.mlp_hidden=128", "model.block_size=64"]
    pretrain.run(load(gpt2))
    return {"root": root, "llama": overrides, "gpt2": gpt2}


def _no_unpickling():
    """Loading must not go through pickle: make torch.load and pickle.load fail loudly."""
    boom = mock.Mock(side_effect=AssertionError("an export was loaded with unpickling"))
    return mock.patch.multiple("pickle", load=boom, loads=boom), mock.patch("torch.load", boom)


def _assert_safe_dir(path: Path) -> None:
    names = {p.name for p in path.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json"} <= names, names
    assert not [n for n in names if n.endswith(PICKLE_SUFFIXES)], names


def test_export_command_writes_a_transformers_dir_with_our_logits(runs, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "hf"
    assert cli.main(["export", "--model", "pretrain", "--out", str(out), *runs["llama"]]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["architecture"] == "LlamaForCausalLM" and summary["out"] == str(out)
    _assert_safe_dir(out)
    cfg = load(runs["llama"])
    ours, _ = load_trained(cfg.paths.pretrain)
    p1, p2 = _no_unpickling()
    with p1, p2:
        hf = AutoModelForCausalLM.from_pretrained(out)
        tok = AutoTokenizer.from_pretrained(out)
    assert type(hf).__name__ == "LlamaForCausalLM"
    idx = torch.randint(0, ours.cfg.vocab_size, (2, ours.cfg.block_size))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, ours(idx), rtol=0, atol=1e-4)
    # the tokenizer gives our ids, preceded by <|endoftext|> as training documents are
    ours_tok = load_tokenizer(cfg.paths.tokenizer)
    text = "Serialize obj to a JSON formatted str."
    assert tok(text)["input_ids"] == [ours_tok.token_to_id("<|endoftext|>")] + ours_tok.encode(text).ids
    # its chat template renders the fine-tuning format
    from pipeline.tokenize.special import chat_prompt

    msgs = [{"role": "user", "content": "What does json.dumps do?"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert list(ids) == [0] + ours_tok.encode(chat_prompt("What does json.dumps do?")).ids
    # the training run's own hf/ export is the same model
    theirs = AutoModelForCausalLM.from_pretrained(Path(cfg.paths.pretrain) / "hf")
    with torch.no_grad():
        torch.testing.assert_close(theirs(idx).logits, hf(idx).logits, rtol=0, atol=0)


def test_text_generation_pipeline_loads_the_export(runs):
    from transformers import pipeline

    path = Path(load(runs["llama"]).paths.pretrain) / "hf"
    p1, p2 = _no_unpickling()
    with p1, p2:
        generator = pipeline("text-generation", model=str(path))
    out = generator("The json module", max_new_tokens=12, do_sample=False)
    text = out[0]["generated_text"]
    assert text.startswith("The json module") and len(text) > len("The json module")
    # AutoModelForCausalLM(...).generate, greedy, gives the tokens our own decoder gives
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.model.sampling import generate_ids

    tok = AutoTokenizer.from_pretrained(path)
    inputs = tok("The json module", return_tensors="pt")
    theirs = AutoModelForCausalLM.from_pretrained(path).generate(**inputs, max_new_tokens=20, do_sample=False)
    theirs = theirs[0, inputs["input_ids"].shape[1]:].tolist()
    ours, _ = load_trained(path.parent)
    stops = {tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|end|>")}
    mine = generate_ids(ours, inputs["input_ids"][0].tolist(), 20, stop_ids=stops)
    assert theirs[: len(mine)] == mine and (len(mine) == 20 or theirs[len(mine)] in stops)


def test_gpt2_architecture_works_with_gpt2_classes_verbatim(runs):
    from transformers import AutoModelForCausalLM, GPT2LMHeadModel, GPT2Tokenizer

    cfg = load(runs["gpt2"])
    path = str(Path(cfg.paths.pretrain) / "hf")
    _assert_safe_dir(Path(path))
    assert (Path(path) / "vocab.json").is_file() and (Path(path) / "merges.txt").is_file()
    assert json.loads((Path(path) / "config.json").read_text())["architectures"] == ["GPT2LMHeadModel"]

    # ---- what the posts do, verbatim
    tokenizer = GPT2Tokenizer.from_pretrained(path)
    model = GPT2LMHeadModel.from_pretrained(path)
    input_ids = tokenizer.encode("The json module", return_tensors="pt")
    output = model.generate(input_ids, max_length=50, no_repeat_ngram_size=2)
    text = tokenizer.decode(output[0], skip_special_tokens=True)
    # ----
    assert text.startswith("The json module") and input_ids.shape[1] < output.shape[1] <= 50
    grams = [tuple(output[0, i : i + 2].tolist()) for i in range(output.shape[1] - 1)]
    assert len(grams) == len(set(grams))  # no_repeat_ngram_size=2 took effect
    ours, meta = load_trained(cfg.paths.pretrain)
    assert meta["model"]["arch"] == "gpt2"
    idx = torch.randint(0, ours.cfg.vocab_size, (2, ours.cfg.block_size))
    with torch.no_grad():
        torch.testing.assert_close(model(idx).logits, ours(idx), rtol=0, atol=1e-4)
        assert type(AutoModelForCausalLM.from_pretrained(path)).__name__ == "GPT2LMHeadModel"
    # vocab.json + merges.txt alone (GPT-2's own files) give exactly our token ids
    bare = Path(cfg.paths.root) / "bare-gpt2-tok"
    bare.mkdir(exist_ok=True)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(Path(path) / name, bare / name)
    ours_tok = load_tokenizer(cfg.paths.tokenizer)
    sample = "def dumps(obj, *, skipkeys=False):\n    'Serialize ``obj``' -> str  # é, 漢字"
    assert GPT2Tokenizer.from_pretrained(str(bare)).encode(sample) == ours_tok.encode(sample).ids
    assert tokenizer.encode(sample) == ours_tok.encode(sample).ids


def test_export_errors(tmp_path, capsys):
    assert cli.main(["export", f"paths.root={tmp_path}"]) == 2
    assert "python -m pipeline pretrain" in capsys.readouterr().err


def test_gpt2_export_with_a_non_gpt2_split_pattern_keeps_our_ids(tmp_path):
    """A `tokenizer.pattern=gpt4` tokenizer splits digits and newlines unlike GPT2Tokenizer: the
    export then ships the exact tokenizer.json (AutoTokenizer) instead of silently differing."""
    from omegaconf import OmegaConf
    from transformers import AutoTokenizer, GPT2LMHeadModel

    from fixtures import SPECIALS, pydoc_text
    from pipeline.model.hf import export_hf, splits_like_gpt2
    from pipeline.model.gpt import GPT, GPTConfig
    from pipeline.tokenize.bpe import build

    tok, trainer = build(OmegaConf.create({"vocab_size": 300, "min_frequency": 2, "special_tokens": SPECIALS,
                                           "pattern": "gpt4"}))
    tok.train_from_iterator([pydoc_text("json"), "12345 67890\n\n  x = 1234567"], trainer=trainer)
    assert not splits_like_gpt2(tok)
    model = GPT(GPTConfig(vocab_size=tok.get_vocab_size(), block_size=32, n_layer=1, n_head=2, d_model=16,
                          mlp_hidden=32, arch="gpt2"))
    out = export_hf(model, tok, tmp_path / "hf")
    text = "x = 1234567\n\n  json.dumps(obj)"
    assert AutoTokenizer.from_pretrained(out)(text)["input_ids"] == [0] + tok.encode(text).ids
    assert type(GPT2LMHeadModel.from_pretrained(out)).__name__ == "GPT2LMHeadModel"
