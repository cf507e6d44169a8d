"""LoRA for fine-tuning: a low-rank update on the blocks' weight matrices, merged on export.

Built on `torch.nn.utils.parametrize`, so the model code stays unchanged: a targeted
`nn.Linear`'s weight becomes `W + (B @ A) * alpha / r` with W frozen and only A, B
trained. The scaling is a buffer, so a checkpoint's state dict is enough to merge the
update back into plain weights (`merge_state_dict`), which is how `load_trained` and the
Hugging Face export see a LoRA run: as an ordinary model with the same architecture.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

ORIGINAL = ".parametrizations.weight.original"


class LoRA(nn.Module):
    """The parametrization: W -> W + B @ A * scaling (B starts at zero, so training starts at W)."""

    def __init__(self, out_features: int, in_features: int, r: int, alpha: float) -> None:
        super().__init__()
        self.lora_A = nn.Parameter(torch.empty(r, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.register_buffer("scaling", torch.tensor(float(alpha) / r))

    def forward(self, W: torch.Tensor) -> torch.Tensor:
        return W + (self.lora_B @ self.lora_A).to(W.dtype) * self.scaling.to(W.dtype)


def apply_lora(model: nn.Module, r: int, alpha: float, targets) -> list[str]:
    """Freeze `model` and put a LoRA update on every block Linear whose name ends with a target
    (e.g. `attn.qkv`, `mlp.down`); returns the names of the adapted modules."""
    if int(r) <= 0:
        raise ValueError(f"LoRA rank must be positive, got r={r}")
    for p in model.parameters():
        p.requires_grad_(False)
    done = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and name.startswith("blocks.") and name.endswith(tuple(targets)):
            parametrize.register_parametrization(m, "weight", LoRA(m.out_features, m.in_features, int(r), alpha))
            done.append(name)
    if not done:
        raise ValueError(f"LoRA targets {list(targets)} match no Linear layer in the model's blocks")
    return done


def merged(model: nn.Module) -> nn.Module:
    """A new model (same class and config) with every LoRA update folded into its weights.

    Built from the merged state dict rather than by removing the parametrizations from a
    deep copy: a copy shares the parametrized class, and removing it would break the original.
    """
    out = type(model)(model.cfg)
    out.load_state_dict(merge_state_dict(model.state_dict()))
    return out.to(next(model.parameters()).device).train(model.training)


def merge_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict with LoRA parametrizations -> the plain model's (`x.weight` = W + B A s)."""
    if not any(k.endswith(ORIGINAL) for k in sd):
        return sd
    out = {}
    for k, v in sd.items():
        if k.endswith(ORIGINAL):
            base = k[: -len(ORIGINAL)]
            lora = f"{base}.parametrizations.weight.0."
            delta = (sd[lora + "lora_B"].float() @ sd[lora + "lora_A"].float()) * sd[lora + "scaling"].float()
            out[f"{base}.weight"] = (v.float() + delta).to(v.dtype)
        elif ".parametrizations.weight.0." not in k:
            out[k] = v
    return out


def trainable_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
