"""Optimizers: AdamW, or Muon for the hidden weight matrices with AdamW for the rest.

Muon (Keller Jordan, 2024) orthogonalises each matrix's momentum with a few Newton-Schulz
iterations before the update; on small transformers it reaches a given loss in fewer
steps than AdamW. One `torch.optim.Optimizer` holds both kinds of parameter group, so
Lightning's automatic optimisation, gradient clipping, LR schedulers and checkpoints
treat it like any other optimizer. Muon updates are scaled to AdamW's RMS
(0.2 * sqrt(max(rows, cols)), as in Moonshot's "Muon is Scalable"), so one learning rate
and schedule serve both groups.
"""

from __future__ import annotations

import math

import torch


def newton_schulz(G: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """Approximately orthogonalise G (the quintic iteration from modded-nanogpt).

    G may be one matrix or a stack of equally shaped matrices ([n, rows, cols]): a stack
    runs as batched matmuls, so a model's many small matrices cost a few large calls."""
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.float()
    tall = X.size(-2) > X.size(-1)
    if tall:
        X = X.mT
    X = X / (torch.linalg.matrix_norm(X, keepdim=True) + eps)
    for _ in range(steps):
        A = X @ X.mT
        X = a * X + (b * A + c * A @ A) @ X
    return (X.mT if tall else X).to(G.dtype)


class MuonAdamW(torch.optim.Optimizer):
    """Groups with `use_muon=True` (2-D hidden matrices) get Muon, the others AdamW."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0, momentum=0.95,
                 nesterov=True, ns_steps=5):
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, momentum=momentum,
                        nesterov=nesterov, ns_steps=ns_steps, use_muon=False)
        super().__init__(params, defaults)
        for g in self.param_groups:
            if g["use_muon"] and any(p.ndim != 2 for p in g["params"]):
                raise ValueError("Muon groups may only hold 2-D parameters")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["use_muon"]:
                self._muon_step(group)
            else:
                self._adamw_step(group)
        return loss

    def _adamw_step(self, group: dict) -> None:
        lr, wd = group["lr"], group["weight_decay"]
        b1, b2 = group["betas"]
        for p in group["params"]:
            if p.grad is None:
                continue
            g, state = p.grad, self.state[p]
            if "step" not in state:
                state["step"] = torch.zeros((), dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            state["step"] += 1
            t = float(state["step"])
            state["exp_avg"].lerp_(g, 1 - b1)
            state["exp_avg_sq"].mul_(b2).addcmul_(g, g, value=1 - b2)
            denom = (state["exp_avg_sq"] / (1 - b2**t)).sqrt_().add_(group["eps"])
            p.mul_(1 - lr * wd)
            p.addcdiv_(state["exp_avg"], denom, value=-lr / (1 - b1**t))

    def _muon_step(self, group: dict) -> None:
        """Momentum, then one batched Newton-Schulz per distinct matrix shape, then the update."""
        lr, wd = group["lr"], group["weight_decay"]
        by_shape: dict[tuple, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for p in group["params"]:
            if p.grad is None:
                continue
            g, state = p.grad, self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(g)
            buf = state["momentum_buffer"]
            buf.mul_(group["momentum"]).add_(g)
            u = g.add(buf, alpha=group["momentum"]) if group["nesterov"] else buf
            by_shape.setdefault((tuple(p.shape), p.device, p.dtype), []).append((p, u))
        for (shape, _, _), items in by_shape.items():
            ortho = newton_schulz(torch.stack([u for _, u in items]), group["ns_steps"])
            scale = -lr * 0.2 * math.sqrt(max(shape))
            for (p, _), o in zip(items, ortho):
                p.mul_(1 - lr * wd)
                p.add_(o, alpha=scale)


def build_optimizer(model: torch.nn.Module, kind: str, lr: float, betas, weight_decay: float) -> torch.optim.Optimizer:
    """`adamw`: AdamW, weight decay on matrices only. `muon`: Muon on the blocks' matrices,
    AdamW on the (tied) embedding and the norm weights."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if kind == "adamw":
        decay = [p for _, p in params if p.dim() >= 2]
        no_decay = [p for _, p in params if p.dim() < 2]
        return torch.optim.AdamW(
            [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=lr, betas=tuple(betas),
        )
    if kind == "muon":
        hidden = [p for n, p in params if p.dim() == 2 and n.startswith("blocks.")]
        embed = [p for n, p in params if p.dim() == 2 and not n.startswith("blocks.")]
        other = [p for _, p in params if p.dim() < 2]
        return MuonAdamW(
            [
                {"params": hidden, "use_muon": True, "weight_decay": weight_decay},
                {"params": embed, "weight_decay": weight_decay},
                {"params": other, "weight_decay": 0.0},
            ],
            lr=lr, betas=betas,
        )
    raise ValueError(f"unknown optimizer {kind!r}; expected adamw or muon")
