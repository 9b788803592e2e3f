"""LoRA on chosen linear layers, for fine-tuning on one GPU.

``apply_lora(model, LoRAConfig(rank=16, targets=["_moe_gen"]))`` wraps every ``nn.Linear`` of the
language model whose qualified name matches one of ``targets`` (regular expressions, searched)
in a :class:`LoRALinear`: ``y = W x + b + (alpha / rank) B A x`` with ``B = 0`` at the start, so
the model is unchanged until it trains; only ``A`` and ``B`` train.  :func:`merge_lora` folds
the adapters back into plain ``nn.Linear`` layers, restoring the official parameter names for
export.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass(frozen=True)
class LoRAConfig:
    rank: int = 16
    alpha: float = 32.0
    targets: tuple[str, ...] = field(default=(r"self_attn\.(q|k|v|o)_proj_moe_gen$",))  # the generation expert's attention

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")
        for t in self.targets:
            re.compile(t)


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base
        self.base.requires_grad_(False)
        self.scale = alpha / rank
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, dtype=base.weight.dtype, device=base.weight.device))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, dtype=base.weight.dtype, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))

    @property
    def weight(self) -> torch.Tensor:  # code that reads a layer's dtype/device keeps working
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_a.t() @ self.lora_b.t()) * self.scale

    def merged(self) -> nn.Linear:
        with torch.no_grad():
            out = nn.Linear(self.base.in_features, self.base.out_features, bias=self.base.bias is not None,
                            device=self.base.weight.device, dtype=self.base.weight.dtype)
            out.weight.copy_(self.base.weight + self.scale * (self.lora_b @ self.lora_a))
            if self.base.bias is not None:
                out.bias.copy_(self.base.bias)
        return out


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def apply_lora(model: nn.Module, config: LoRAConfig, root: str = "language_model") -> list[str]:
    """Wrap the matching linear layers under ``root``; returns their names.  Freezes everything else."""
    patterns = [re.compile(t) for t in config.targets]
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith(root) and any(p.search(n) for p in patterns)]
    if not names:
        raise ValueError(f"no linear layer under {root!r} matches the LoRA targets {list(config.targets)}")
    for p in model.parameters():
        p.requires_grad_(False)
    for n in names:
        _replace(model, n, LoRALinear(model.get_submodule(n), config.rank, config.alpha))
    return names


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for m in model.modules() if isinstance(m, LoRALinear) for p in (m.lora_a, m.lora_b)]


def merge_lora(model: nn.Module) -> int:
    """Fold every adapter into its base layer; returns how many were merged."""
    names = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    for n in names:
        _replace(model, n, model.get_submodule(n).merged())
    return len(names)
