"""Small building blocks shared by the decoder, the vision encoder and the generation adapters.

Shapes use ``N`` for packed tokens, ``H`` for the LLM width, ``h``/``d`` for heads/head size.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..precision import emulates_bf16


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear``, except for products of one or a few rows on CPUs at inference.

    One row in bf16/fp16 uses the matrix-vector kernel: decoding feeds one row per token, and there
    oneDNN's GEMM reads the weights at about half the memory bandwidth that ``torch.mv`` reaches
    (measured on a 2-core AVX-512/AMX CPU over the 14B decoder's matrices: 14 vs 24-26 GB/s), and
    decoding is nothing but reading the weights.  A few rows in float32 are multiplied weights-first
    (below).  More rows in bf16 on a CPU without bf16 units compute in float32 and round once
    (``precision.emulates_bf16``).  All forms are differentiable.
    """
    if x.device.type == "cpu" and x.dtype == weight.dtype:
        rows = x.numel() // weight.shape[1]
        if rows == 1 and x.dtype in (torch.bfloat16, torch.float16):
            y = torch.mv(weight, x.reshape(-1))  # [out]
            if bias is not None:
                y = y + bias
            return y.reshape(*x.shape[:-1], weight.shape[0])
        if 2 <= rows <= FEW_ROWS and x.dtype == torch.float32:
            # a few rows (the image markers of a denoising step, a small decoding batch): as
            # ``W @ x^T``, which reads the weights at up to twice the speed of the ``x @ W^T`` form
            # here (measured on 2-core AVX2 CPUs: 4 rows through the `small` decoder's products,
            # 7.9 vs 16.5 ms); the [rows, out] result is copied back to rows-first
            xt = x.reshape(rows, -1).t()  # [in, rows]
            y = torch.mm(weight, xt) if bias is None else torch.addmm(bias[:, None], weight, xt)  # [out, rows]
            return y.t().contiguous().reshape(*x.shape[:-1], weight.shape[0])
        if product_in_float32(x, rows):
            return F.linear(x.float(), weight.float(), None if bias is None else bias.float()).to(x.dtype)
    return F.linear(x, weight, bias)


FEW_ROWS = 64  # up to here the weights-first float32 product wins on CPUs (4 rows: 0.42x the time, 64: 0.67x)
# Above this many rows, bf16 products on a CPU without bf16 units run in float32 (``precision``):
# converting the weights costs a few dozen rows' worth of the emulated bf16 kernel.  Measured on a
# 2-core AVX2 CPU, bf16 kernel vs converted: 4096x3584 at 16 / 32 / 48 / 64 rows 23 / 46 / 68 / 91 ms
# vs 48 / 49 / 60 / 60 ms; 1536x512 at 16 / 32 rows 1.6 / 3.1 ms vs 1.1 / 1.4 ms.
BF16_EMULATION_ROWS = 32


def product_in_float32(x: torch.Tensor, rows: int) -> bool:
    """Whether a product of ``rows`` rows of ``x`` computes in float32 and rounds back to bf16:
    bf16 on a CPU without bf16 units, more than :data:`BF16_EMULATION_ROWS` rows."""
    return rows > BF16_EMULATION_ROWS and emulates_bf16(x)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and state dict) whose products go through :func:`linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` (same parameters and state dict) that convolves bf16 in float32 where bf16 is emulated.

    On CPUs without bf16 units PyTorch's bf16 convolution is hundreds of times slower than the
    float32 one (``precision`` module notes); the float32 result rounded to bf16 is what bf16 units
    give.  Elsewhere this is ``nn.Conv2d``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if emulates_bf16(x) and self.weight.dtype == torch.bfloat16:
            bias = None if self.bias is None else self.bias.float()
            return self._conv_forward(x.float(), self.weight.float(), bias).to(x.dtype)
        return super().forward(x)


class FusedLinear:
    """Several :class:`Linear` layers of one module reading the same input, as one product prepared at load.

    The fused ``[sum(out), in]`` weight is the only copy: each layer's ``weight``/``bias`` becomes a
    row-slice view of it, so the state dict, the parameter names and the memory stay as they were,
    and in-place updates (``load_state_dict``, an optimiser step) reach both.  Anything that gives a
    layer a tensor of its own (``model.to(dtype)``) or replaces the layer (LoRA, quantisation) breaks
    the link; :meth:`__call__` checks it and answers ``None`` then, and the caller runs the layers
    one by one.  Not a module: it owns no parameters and is never saved.

    Why: the q/k/v projections (and gate/up) of a layer read the same ``[N, H]`` rows; one product
    of ``sum(out)`` columns reads the input once instead of three times and runs one larger GEMM.
    """

    def __init__(self, owner: nn.Module, names: list[str]):
        self.owner, self.names = owner, list(names)
        self.layers = [getattr(owner, n) for n in names]
        with torch.no_grad():
            self.weight = torch.cat([m.weight.detach() for m in self.layers])  # [sum(out), in]
            self.bias = torch.cat([m.bias.detach() for m in self.layers]) if self.layers[0].bias is not None else None
        start = 0
        for m in self.layers:
            n = m.out_features
            m.weight = nn.Parameter(self.weight[start : start + n], requires_grad=m.weight.requires_grad)
            if self.bias is not None:
                m.bias = nn.Parameter(self.bias[start : start + n], requires_grad=m.bias.requires_grad)
            start += n
        self._pointers = self._current_pointers()

    @classmethod
    def of(cls, owner: nn.Module, names: list[str]) -> "FusedLinear | None":
        """Fuse ``owner``'s layers ``names`` when they are plain :class:`Linear` layers with ordinary
        tensors of one dtype and device, all with a bias or none (not LoRA, quantised or sharded
        layers), whose memory is their own; else ``None``.

        Weights loaded zero-copy from a checkpoint borrow their memory from the file mapping
        (storage not resizable): fusing would copy them into private memory - for the 14B model in
        bf16 on a CPU, about 17 GB of q/k/v and gate/up weights that the page cache can otherwise
        drop and re-read, which is what lets it run on a machine with less RAM than the model.
        Those layers stay separate."""
        layers = [getattr(owner, n) for n in names]
        if not all(type(m) is Linear for m in layers) or len({m.bias is None for m in layers}) != 1:
            return None
        tensors = [t for m in layers for t in (m.weight, m.bias) if t is not None]
        if any(type(t) is not nn.Parameter or t.device.type == "meta" for t in tensors):
            return None
        if not all(t.untyped_storage().resizable() for t in tensors):
            return None  # file-backed (zero-copy) weights
        if len({(t.dtype, t.device) for t in tensors}) != 1 or len({m.in_features for m in layers}) != 1:
            return None
        return cls(owner, names)

    def _current_pointers(self) -> list[int]:
        return [t.data_ptr() for m in self.layers for t in (m.weight, m.bias) if t is not None]

    def __call__(self, x: torch.Tensor) -> torch.Tensor | None:
        """``[..., in] -> [..., sum(out)]``: the layers' outputs side by side, or ``None`` when the
        fused product cannot stand for them (a layer replaced or given its own tensor, or gradients
        wanted: the fused weight is not a parameter)."""
        return linear(x, self.weight, self.bias) if self.usable() else None

    def usable(self) -> bool:
        """Whether the fused product still stands for the layers: none replaced or given a tensor of
        its own, and no gradient wanted (the fused weight is not a parameter)."""
        if torch.is_grad_enabled() and any(m.weight.requires_grad for m in self.layers):
            return False
        if any(getattr(self.owner, n) is not m for n, m in zip(self.names, self.layers)):
            return False
        return self._current_pointers() == self._pointers


class RMSNorm(nn.Module):
    """Qwen2 RMSNorm: normalise in float32, cast back, then scale in the input dtype (ARCHITECTURE 10.2)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Qwen2's RMSNorm of ``x [..., D]`` over its last dim with ``weight [D]`` (:class:`RMSNorm`)."""
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        if _one_pass_norm(x, weight):
            return torch.mul(x, _inverse_rms(x, eps)).mul_(weight)
        # one call; in float32 it computes exactly the same as the steps below (bit for bit)
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    xf = x.float()  # squares and their mean in fp32: bf16 would lose precision summing D of them
    normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    # round to the input dtype *before* the weight, like Qwen2: weight * normed.to(dtype)
    # (torch's rms_norm scales first and rounds once, one bf16 step away)
    if _wants_grad(x, weight) or weight.dtype != normed.dtype:
        return weight * normed
    return normed.mul_(weight)  # inference: scaled in place, no second [N, D] tensor


# below this many elements (decoding's few rows) torch's one rms_norm call costs less than the
# separate calls of the one-pass form: 4 rows x 512, 20 vs 24 us on a 2-core CPU
_ONE_PASS_NORM_MIN = 1 << 15


def _wants_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _one_pass_norm(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """Whether a norm of ``x`` with ``weights`` takes :func:`_inverse_rms`: eager float32 CPU
    inference on at least :data:`_ONE_PASS_NORM_MIN` elements (a compiler fuses torch's form itself)."""
    return (x.dtype == torch.float32 and all(w.dtype == torch.float32 for w in weights) and x.numel() >= _ONE_PASS_NORM_MIN
            and x.device.type == "cpu" and not torch.compiler.is_compiling() and not _wants_grad(x, *weights))


def _inverse_rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    """``1 / sqrt(mean(x², -1) + eps)`` of float32 ``x [..., D]`` as ``[..., 1]``, for eager CPU inference.

    One reading pass (``vector_norm``) and arithmetic on the small result: torch's CPU rms_norm
    writes x² out, averages it and scales in two more passes, three new ``[..., D]`` tensors (at
    [516, 512], a guided 256² step's rows, on a 2-core CPU: 100 us, against 67 us for this and the
    scaling).  Equal to its mean of squares to about two float32 roundings.
    """
    return torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().div_(x.shape[-1]).add_(eps).rsqrt_()


def rms_norm_heads_(x: torch.Tensor, weights: tuple[torch.Tensor, ...], heads: tuple[int, ...], eps: float) -> torch.Tensor:
    """:func:`rms_norm` in place, per head, on ``x [N, sum(heads), d]`` (a view into the fused
    q/k/v product): the first ``heads[0]`` heads scaled by ``weights[0] [d]``, the next
    ``heads[1]`` by ``weights[1]``, ...  One reduction over all of them and no copy back, which is
    what separate norms written into the product cost (eager float32 CPU inference; elsewhere the
    same arithmetic as :func:`rms_norm`, written back)."""
    one_pass = _one_pass_norm(x, *weights)
    if one_pass:
        x.mul_(_inverse_rms(x, eps))  # every head's rows at once
    start = 0
    for w, h in zip(weights, heads):
        part = x[:, start : start + h]  # [N, h, d]
        if one_pass:
            part.mul_(w)
        else:
            part.copy_(rms_norm(part, w, eps))
        start += h
    return x


def uninitialized_embedding(num_embeddings: int, dim: int) -> nn.Embedding:
    """An ``nn.Embedding`` whose weight is left uninitialised (the model initialises or loads it).

    Skipping ``reset_parameters`` also keeps torch from importing its compiler stack (~75 MB of
    resident memory) when the model is built on the meta device for loading.
    """
    return nn.Embedding(num_embeddings, dim, _weight=torch.empty(num_embeddings, dim))


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


# ---- rotary position embedding -------------------------------------------------------------


def rotary_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables ``[N, head_dim]`` for integer positions ``[N]``.

    Angles are computed in float32 and the tables cast to the hidden-state dtype, as the
    reference does (ARCHITECTURE 10.3); the 64 angles of a 128-wide head are duplicated ``[a, a]``.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    angles = positions.to(torch.float32)[:, None] * inv_freq[None, :]  # [N] x [d/2] -> [N, d/2]
    angles = torch.cat([angles, angles], dim=-1)  # [N, d]: rotate-half pairs dim i with i + d/2
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on ``x [N, heads, d]`` (any strides) with ``cos/sin [N, d]``; a new tensor."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]  # rotate-half pairs dim i with i + d/2
    if _wants_grad(x):
        rotated = torch.cat([-x2, x1], dim=-1)  # [x1, x2] -> [-x2, x1]
        return x * cos[:, None, :] + rotated * sin[:, None, :]  # cos/sin broadcast over heads
    # inference: each half of the output written once, no rotated copy:
    # out1 = x1 cos - x2 sin, out2 = x2 cos + x1 sin (the tables repeat their d/2 angles, so either half serves)
    c, s = cos[:, None, :half], sin[:, None, :half]  # [N, 1, d/2]
    if torch.compiler.is_compiling():  # the same formula as one expression, which the compiler fuses into one pass
        return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    o1, o2 = out[..., :half], out[..., half:]
    torch.mul(x1, c, out=o1).addcmul_(x2, s, value=-1)
    torch.mul(x2, c, out=o2).addcmul_(x1, s)
    return out


# ---- fixed 2D sin-cos position tables ----------------------------------------------------------


def sincos_2d_table(grid: int, dim: int) -> torch.Tensor:
    """Fixed 2D sin-cos table ``[grid*grid, dim]`` (float32, computed in float64).

    Row ``r*grid + c`` = ``[emb1d(c), emb1d(r)]`` with
    ``emb1d(x) = [sin(x*w_k)]_k ++ [cos(x*w_k)]_k``, ``w_k = 10000^(-k/(dim/4))`` (ARCHITECTURE 6.4):
    the first half encodes the column, the second half the row.
    """
    if dim % 4:
        raise ValueError(f"sin-cos table width {dim} must be a multiple of 4")
    # float64 like the reference's numpy code, then float32: recomputed tables then round to the
    # same bf16 values as the checkpoint's (ARCHITECTURE 6.4)
    quarter = dim // 4
    omega = 1.0 / 10000 ** (np.arange(quarter, dtype=np.float64) / quarter)
    coords = np.arange(grid, dtype=np.float64)
    emb = np.outer(coords, omega)  # [grid, quarter]
    emb1d = np.concatenate([np.sin(emb), np.cos(emb)], axis=1)  # [grid, dim/2]
    rows = np.repeat(np.arange(grid), grid)
    cols = np.tile(np.arange(grid), grid)
    table = np.concatenate([emb1d[cols], emb1d[rows]], axis=1)
    return torch.from_numpy(table.astype(np.float32))


class PositionTable(nn.Module):
    """A frozen parameter ``pos_embed [grid*grid, dim]`` holding a fixed 2D sin-cos table.

    It is a parameter (not a buffer) because the official checkpoint stores it
    (``vit_pos_embed.pos_embed``, ``latent_pos_embed.pos_embed``).
    """

    def __init__(self, grid: int, dim: int):
        super().__init__()
        self.grid = grid
        self.pos_embed = nn.Parameter(torch.zeros(grid * grid, dim), requires_grad=False)

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.pos_embed.copy_(sincos_2d_table(self.grid, self.pos_embed.shape[1]))

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        return self.pos_embed[position_ids]


def grid_position_ids(rows: int, cols: int, grid: int, device: torch.device | None = None) -> torch.Tensor:
    """Position ids ``row*grid + col`` of a ``rows x cols`` patch grid in row-major order.

    The ids index the top-left part of the ``grid x grid`` table: no interpolation
    (``interpolate_pos=False``).
    """
    if rows > grid or cols > grid:
        raise ValueError(f"a {rows}x{cols} patch grid exceeds the {grid}x{grid} position table")
    r = torch.arange(rows, device=device)
    c = torch.arange(cols, device=device)
    return (r[:, None] * grid + c[None, :]).flatten()


# ---- timestep embedding ------------------------------------------------------------------------


def timestep_frequencies(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """``[cos(t*f_j), sin(t*f_j)]`` with ``f_j = exp(-ln(max_period)*j/(dim/2))``; cosines first.

    ``t`` is the flow time in [0, 1], used as is (not multiplied by 1000).  float32.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.to(torch.float32)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    """``Linear(F -> H) -> SiLU -> Linear(H -> H)`` over the sinusoidal features (keys ``mlp.0``, ``mlp.2``)."""

    def __init__(self, hidden_size: int, frequency_size: int = 256):
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        feats = timestep_frequencies(t, self.frequency_size)
        return self.mlp(feats.to(self.mlp[0].weight.dtype))
