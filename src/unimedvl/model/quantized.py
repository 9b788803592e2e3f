"""Weight-only quantised linear layers, swapped into a model from outside (like LoRA or FSDP).

Schemes (:data:`SCHEMES`):

* ``int8`` - symmetric per-output-channel int8 weights, ``w ~ q * scale`` with ``q`` in [-127, 127]
  and ``scale = max|w_row| / 127``; activations stay in the compute dtype.  On CPUs the product is
  torch's own fused kernel ``aten._weight_int8pack_mm`` (the int8 matrix is read once, never
  dequantised in memory); elsewhere the weight is dequantised per call (correct, not fast).

What is quantised (:func:`quantizable`): every linear layer of both decoder experts (attention and
MLP), of the ViT encoder layers and of the connector - about 99% of the 14B model's linear weights.
Kept in the compute dtype: embeddings and the LM head (the logits' resolution), norms, the ViT patch
embedding and position tables (small), the generation adapters (``vae2llm``/``llm2vae``/time
embedder: they map the latents the flow integrates) and the autoencoder (convolutions).

State-dict layout of a quantised layer: ``<name>.weight`` int8 ``[out, in]``, ``<name>.scale``
``[out]`` (compute dtype) and ``<name>.bias`` when the layer has one.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

SCHEMES = ("int8",)

# Linear layers that are quantised, by module name (state-dict prefix).
QUANTIZED_LINEARS = re.compile(
    r"^(language_model\.model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp)(_moe_gen)?(\.\w+_proj)?"
    r"|vit_model\.vision_model\.encoder\.layers\.\d+\.(self_attn\.\w+_proj|mlp\.fc[12])"
    r"|connector\.fc[12])$"
)


def check_scheme(scheme: str) -> str:
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantisation scheme {scheme!r}; available: {', '.join(SCHEMES)}")
    return scheme


def quantizable(name: str, module: nn.Module) -> bool:
    """Whether the linear layer ``name`` is quantised (see the module docstring)."""
    return isinstance(module, nn.Linear) and QUANTIZED_LINEARS.match(name) is not None


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight [out, in]`` (any float dtype) -> (int8 ``[out, in]``, float32 scale ``[out]``)."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0  # [out]; an all-zero row keeps scale > 0
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


class Int8Linear(nn.Module):
    """``y = x @ (q * scale).T + bias`` with int8 ``q`` (weight-only: ``x`` stays in the compute dtype)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        # buffers, not parameters: quantised weights are not trained
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.empty(out_features, dtype=dtype, device=device))
        if bias:
            self.register_buffer("bias", torch.empty(out_features, dtype=dtype, device=device))
        else:
            self.bias = None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        dtype = linear.weight.dtype
        out = cls(linear.in_features, linear.out_features, linear.bias is not None, dtype, linear.weight.device)
        if linear.weight.device.type != "meta":
            q, scale = quantize_int8(linear.weight)
            out.weight.copy_(q)
            out.scale.copy_(scale.to(dtype))
            if linear.bias is not None:
                out.bias.copy_(linear.bias.detach())
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)  # [n, in]
        if x2.device.type == "cpu":
            # fused: reads the int8 matrix once; scale must be in x's dtype
            y = torch.ops.aten._weight_int8pack_mm(x2.contiguous(), self.weight, self.scale.to(x2.dtype))  # [n, out]
        else:
            y = F.linear(x2, self.weight.to(x2.dtype)) * self.scale.to(x2.dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, scheme=int8"


def quantize_model(model: nn.Module, scheme: str = "int8") -> list[str]:
    """Replace every :func:`quantizable` linear layer of ``model`` by its quantised form, in place
    (on the meta device the new layers are empty, to be filled by a state-dict load).  Returns the
    names of the replaced layers."""
    check_scheme(scheme)
    names = [name for name, module in model.named_modules() if quantizable(name, module)]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, Int8Linear.from_linear(getattr(parent, child)))
    return names
