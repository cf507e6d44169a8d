"""The chunked training loss: same loss and gradients as full logits, without keeping them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.model.gpt import GPT, GPTConfig
from pipeline.model.lstm import LSTMConfig, LSTMLM
from pipeline.training.lightning import IGNORE, LitGPT, chunked_cross_entropy, output_layer

TINY = {"n_layer": 2, "n_head": 2, "d_model": 16, "mlp_hidden": 32, "block_size": 16}


def _targets(B: int, T: int, V: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, V, (B, T), generator=g)
    y[0, :3] = IGNORE  # a prompt-like run of positions without loss
    y[1, -1] = IGNORE
    y[2, 4] = IGNORE
    return y


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _full_loss(model, x, y, reduction="mean"):
    logits = model(x)
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1), ignore_index=IGNORE,
                           reduction=reduction)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("chunk", [1, 4, 5, 7, 20, 21, 22, 1000])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_chunked_loss_and_gradients_equal_full_logits(arch, chunk, reduction):
    torch.manual_seed(0)
    V, B, T = 97, 3, 7  # 21 positions: chunks of 4, 5, 20 do not divide them
    model = GPT(GPTConfig(vocab_size=V, arch=arch, **TINY))
    x = torch.randint(0, V, (B, T))
    y = _targets(B, T, V)

    ref = _full_loss(model, x, y, reduction)
    ref.backward()
    want = _grads(model)
    model.zero_grad(set_to_none=True)

    loss = chunked_cross_entropy(model(x, return_hidden=True), model.lm_head.weight, y, chunk, reduction=reduction)
    loss.backward()
    got = _grads(model)
    assert torch.allclose(loss, ref, rtol=1e-6, atol=1e-6), (float(loss), float(ref))
    assert set(got) == set(want) and len(want) == len(list(model.parameters()))
    for name in want:
        assert torch.allclose(got[name], want[name], rtol=1e-5, atol=1e-7), name


def test_per_token_nats_and_no_grad_path_match():
    torch.manual_seed(1)
    V, B, T = 50, 3, 9
    model = GPT(GPTConfig(vocab_size=V, **TINY))
    x, y = torch.randint(0, V, (B, T)), _targets(B, T, V, seed=1)
    with torch.no_grad():
        ref = _full_loss(model, x, y, "none")
        h = model(x, return_hidden=True)
        nats = chunked_cross_entropy(h, model.lm_head.weight, y, 4, reduction="none")
        mean = chunked_cross_entropy(h, model.lm_head.weight, y, 4)
    assert nats.shape == ref.shape == (B * T,)
    assert torch.allclose(nats, ref, atol=1e-6)
    assert float(nats[y.view(-1) == IGNORE].abs().sum()) == 0.0
    assert torch.allclose(mean, ref.sum() / (y != IGNORE).sum(), atol=1e-6)


def test_all_targets_ignored_gives_nan_like_cross_entropy():
    h, w = torch.randn(6, 4), torch.randn(10, 4)
    y = torch.full((6,), IGNORE)
    ref = F.cross_entropy(h @ w.T, y, ignore_index=IGNORE)
    assert torch.isnan(ref) and torch.isnan(chunked_cross_entropy(h, w, y, 4))


def test_lstm_head_with_bias_goes_through_the_same_function():
    torch.manual_seed(2)
    V, B, T = 40, 3, 7
    model = LSTMLM(LSTMConfig(vocab_size=V, embed_dim=8, hidden=12))
    x, y = torch.randint(0, V, (B, T)), _targets(B, T, V, seed=2)
    ref = _full_loss(model, x, y)
    ref.backward()
    want = _grads(model)
    model.zero_grad(set_to_none=True)
    head = output_layer(model)
    assert head is model.head and head.bias is not None
    loss = chunked_cross_entropy(model(x, return_hidden=True), head.weight, y, 5, head.bias)
    loss.backward()
    assert torch.allclose(loss, ref, atol=1e-6)
    for name, g in _grads(model).items():
        assert torch.allclose(g, want[name], rtol=1e-5, atol=1e-7), name


def _lit(chunk: int, objective: str = "clm", kind: str = "gpt", vocab: int = 61) -> LitGPT:
    torch.manual_seed(3)
    model = {"kind": kind, **TINY} if kind == "gpt" else {"kind": "lstm", "embed_dim": 8, "hidden": 12}
    return LitGPT(model=model, vocab_size=vocab, objective=objective, loss_chunk_tokens=chunk)


@pytest.mark.parametrize("objective,kind,packed", [("clm", "gpt", False), ("clm", "gpt", True), ("mlm", "gpt", False),
                                                   ("clm", "lstm", False)])
def test_lightning_loss_chunked_equals_unchunked(objective, kind, packed):
    """Pretraining (CLM, MLM, the LSTM) and packed fine-tuning rows: one `_loss` for all."""
    V, B, T = 61, 4, 9
    g = torch.Generator().manual_seed(4)
    x = torch.randint(0, V - 1, (B, T), generator=g)
    batch = [x, _targets(B, T, V - 1, seed=4)]
    if packed:
        batch.append(torch.tensor([[0] * 4 + [1] * 5, [0] * 9, [0] * 2 + [1] * 6 + [-1], [0] * 5 + [1] * 4]))
    results = []
    for chunk in (0, 5):
        lit = _lit(chunk, objective, kind, V)
        loss, _ = lit._loss(tuple(batch), step=7, salt=1)
        loss.backward()
        with torch.no_grad():
            nats, _ = lit._loss(tuple(batch), step=-1, salt=0, reduction="none")
        results.append((loss.detach(), nats, _grads(lit.model)))
    (l0, n0, g0), (l1, n1, g1) = results
    assert torch.allclose(l0, l1, atol=1e-6) and torch.allclose(n0, n1, atol=1e-6)
    assert set(g0) == set(g1)
    for name in g0:
        assert torch.allclose(g0[name], g1[name], rtol=1e-5, atol=1e-7), name


def _saved_bytes(fn, params) -> tuple[torch.Tensor, int]:
    """(fn(), bytes of the distinct non-parameter storages autograd keeps for backward while it
    runs): deterministic, unlike a peak-memory reading."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    skip = {p.untyped_storage().data_ptr() for p in params}
    return out, sum(n for ptr, n in seen.items() if ptr not in skip)


def test_full_vocabulary_logits_are_not_kept_for_backward():
    torch.manual_seed(5)
    V, B, T, chunk = 32_000, 2, 64, 16
    model = GPT(GPTConfig(vocab_size=V, n_layer=1, n_head=2, d_model=16, mlp_hidden=32, block_size=T))
    x, y = torch.randint(0, V, (B, T)), torch.randint(0, V, (B, T))
    logits_bytes = B * T * V * 4

    params = list(model.parameters())
    full, full_saved = _saved_bytes(lambda: _full_loss(model, x, y), params)
    chunked, chunked_saved = _saved_bytes(
        lambda: chunked_cross_entropy(model(x, return_hidden=True), model.lm_head.weight, y, chunk), params)
    print(f"saved for backward: full logits {full_saved} B, chunked {chunked_saved} B, "
          f"B*T*V*4 = {logits_bytes} B")
    assert full_saved >= logits_bytes  # the old path: the float32 logits (log-softmax) are kept
    assert chunked_saved < logits_bytes / 20  # the chunked path: activations only, no chunk of logits either
    chunked.backward()
    g = model.lm_head.weight.grad.clone()
    model.zero_grad(set_to_none=True)
    full.backward()
    assert torch.allclose(g, model.lm_head.weight.grad, rtol=1e-5, atol=1e-7)
