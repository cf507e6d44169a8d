"""Generation: sampling controls (temperature, top-k, top-p, seed), the KV cache against full
recomputation for both architectures, streaming, the chat mode, and the `generate` command."""

from __future__ import annotations

import io

import pytest
import torch

from fixtures import make_project, pydoc_text, write_tokenizer
from pipeline.apps import cli
from pipeline.stages import finetune, pretrain
from pipeline.core.config import load
from pipeline.apps.generate import chat, generate_from_run
from pipeline.model.runs import load_run
from pipeline.model.sampling import generate, generate_ids, sample_next, stream_text
from pipeline.model.gpt import GPT, GPTConfig
from pipeline.tokenize.special import render_chat


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return write_tokenizer(tmp_path_factory.mktemp("gtok"), [pydoc_text("json"), "é ü 漢字 — ≥"], vocab_size=300)


def micro(tok, arch: str, seed: int = 0, block_size: int = 48) -> GPT:
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=tok.get_vocab_size(), block_size=block_size, n_layer=2, n_head=2, d_model=32,
                          mlp_hidden=64, arch=arch)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # away from the init, so logits are not flat
    return model


def test_sampling_controls():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    g = torch.Generator().manual_seed(0)
    draws = lambda **kw: {sample_next(logits, generator=g, **kw) for _ in range(300)}  # noqa: E731
    assert draws(temperature=0.0) == {0}
    assert draws(temperature=1.0) == {0, 1, 2, 3}
    assert draws(temperature=1.0, top_k=2) == {0, 1}
    assert draws(temperature=1.0, top_p=0.7) == {0, 1}  # 0.5 < 0.7, 0.5 + 0.3 >= 0.7
    assert draws(temperature=1.0, top_p=0.5) == {0}
    assert draws(temperature=1.0, top_p=0.9, top_k=3) == {0, 1, 2}
    assert draws(temperature=0.05) == {0}  # a low temperature sharpens towards the argmax
    a = [sample_next(logits, 1.0, generator=torch.Generator().manual_seed(7)) for _ in range(5)]
    b = [sample_next(logits, 1.0, generator=torch.Generator().manual_seed(7)) for _ in range(5)]
    assert a == b


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_kv_cache_gives_the_same_tokens_as_recomputing(tok, arch):
    model = micro(tok, arch)
    ids = [0] + tok.encode("def dumps(obj):", add_special_tokens=False).ids
    with torch.no_grad():  # the cache itself: step-by-step logits equal one full forward
        idx = torch.tensor([ids + [5, 6, 7, 8]])
        full = model(idx)
        caches = [{} for _ in model.blocks]
        steps = [model(idx[:, :4], caches=caches)] + [
            model(idx[:, t : t + 1], caches=caches, offset=t) for t in range(4, idx.shape[1])]
        torch.testing.assert_close(torch.cat(steps, 1), full, rtol=0, atol=1e-5)
    # 70 new tokens run past the 48-token window: both paths crop the context the same way
    cached = generate_ids(model, ids, 70)
    assert cached == generate_ids(model, ids, 70, use_cache=False) and len(cached) == 70
    s1 = generate_ids(model, ids, 30, temperature=1.0, top_p=0.9, seed=3)
    assert s1 == generate_ids(model, ids, 30, temperature=1.0, top_p=0.9, seed=3)
    assert s1 != generate_ids(model, ids, 30, temperature=1.0, top_p=0.9, seed=4)


def test_streaming_pieces_join_to_the_full_text(tok):
    ids = tok.encode("é ü 漢字 — ≥ json", add_special_tokens=False).ids
    assert len(ids) > 8  # multi-byte characters span several byte-level tokens
    pieces = list(stream_text(tok, ids))
    assert "".join(pieces) == tok.decode(ids) == "é ü 漢字 — ≥ json"
    assert len(pieces) > 3 and not any("\ufffd" in p for p in pieces)
    model = micro(tok, "llama", 1)
    seen: list[str] = []
    text = generate(model, tok, "The json", 25, temperature=1.0, top_k=50, seed=2, on_text=seen.append)
    assert "".join(seen) == text == generate(model, tok, "The json", 25, temperature=1.0, top_k=50, seed=2)


def test_chat_keeps_the_conversation_and_resets(tok):
    model = micro(tok, "llama", 2, block_size=160)
    out = io.StringIO()
    msgs = chat(model, tok, ["What does json.dumps do?\n", "And loads?\n"], write=out.write, max_new_tokens=6)
    assert [m["role"] for m in msgs] == ["user", "assistant", "user", "assistant"]
    first = generate(model, tok, render_chat(msgs[:1], add_generation_prompt=True), 6)
    second = generate(model, tok, render_chat(msgs[:3], add_generation_prompt=True), 6, seed=1)
    assert msgs[1]["content"] == first.strip() and msgs[3]["content"] == second.strip()
    assert out.getvalue() == f"{first}\n{second}\n"
    out = io.StringIO()
    msgs = chat(model, tok, ["Hi", "/reset", "And loads?", "/exit", "never read"], write=out.write,
                max_new_tokens=6, system="Be brief.")
    assert [m["role"] for m in msgs] == ["system", "user", "assistant"] and msgs[1]["content"] == "And loads?"
    assert "(conversation reset)" in out.getvalue()
    # a conversation longer than the context keeps its latest exchanges only
    small = micro(tok, "llama", 2, block_size=64)
    msgs = chat(small, tok, ["What does json.dumps do?", "And loads?", "And load?"], write=io.StringIO().write,
                max_new_tokens=6)
    assert msgs[-2] == {"role": "user", "content": "And load?"} and len(msgs) < 6


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    root = tmp_path_factory.mktemp("genproj")
    overrides = [*make_project(root), "pretrain.max_steps=6", "pretrain.val_every=3", "finetune.max_steps=3",
                 "finetune.val_every=3"]
    pretrain.run(load(overrides))
    finetune.run(load(overrides))
    return overrides


def test_generate_command_streams_with_sampling_options(tuned, capsys):
    args = ["--max-new-tokens", "12", "--temperature", "0.9", "--top-k", "0", "--top-p", "0.95", "--seed", "5"]
    assert cli.main(["generate", "--prompt", "The json module", "--model", "pretrain", *args, *tuned]) == 0
    printed = capsys.readouterr().out
    cfg = load(tuned)
    want = generate_from_run(cfg, "The json module", which="pretrain", max_new_tokens=12, temperature=0.9,
                             top_k=None, top_p=0.95, seed=5)
    assert printed == want + "\n" and want
    assert cli.main(["generate", "--prompt", "x", "--model", "pretrain", "--no-cache", *args, *tuned]) == 0
    assert capsys.readouterr().out == generate_from_run(
        cfg, "x", which="pretrain", max_new_tokens=12, temperature=0.9, top_k=None, top_p=0.95, seed=5) + "\n"
    with pytest.raises(SystemExit):
        cli.main(["generate", *tuned])  # neither --prompt nor --chat


def test_generate_chat_mode_on_the_fine_tuned_model(tuned, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("What does json.dumps do?\n/exit\n"))
    assert cli.main(["generate", "--chat", "--temperature", "0", "--max-new-tokens", "8", *tuned]) == 0
    printed = capsys.readouterr().out
    model, tok, meta = load_run(load(tuned), "latest")
    assert meta["stage"] == "finetune"
    want = generate(model, tok, render_chat([{"role": "user", "content": "What does json.dumps do?"}], True), 8,
                    seed=int(load(tuned).seed))
    assert printed == want + "\n"
