"""Weight-only quantised linear layers, swapped into a model from outside (like LoRA or FSDP).

One table, :data:`SCHEMES`, says everything about a scheme: which tensors store a quantised
``[out, in]`` weight (:meth:`QuantScheme.layout`: names, dtypes, shapes), how a float weight becomes
those tensors and back (:meth:`QuantScheme.quantize` / :meth:`QuantScheme.dequantize`), which
devices run it (:meth:`QuantScheme.check_device`) and its layer class.  The loader
(:mod:`unimedvl.formats.checkpoint`), the pre-quantised checkpoint writer
(:mod:`unimedvl.formats.quantized_checkpoint`), the layers and :func:`simulate_quantization` all ask
the table; none of them knows a scheme's tensors.

Schemes (activations always stay in the compute dtype, except fp8 on the GPU, see there):

``int8``
    symmetric per-output-row int8, ``w ~ q * scale``, ``q`` in [-127, 127], ``scale = max|w_row| / 127``.
    CPU: torch's fused ``aten._weight_int8pack_mm`` (the int8 matrix is read once, never
    dequantised in memory).  Elsewhere (CUDA included) the weight is dequantised per call - correct,
    not fast; torchao's int8 kernels are not wired in.
``int4``
    asymmetric 4-bit in groups of ``g`` consecutive input features of one output row,
    ``w ~ (q - 8) * scale + zero`` with ``q`` in [0, 15], ``scale = (max - min) / 15`` and
    ``zero = min + 8 * scale`` of the group.  ``g`` is 128, or the largest of 64, 32, 16 dividing
    ``in_features`` when 128 does not (:func:`int4_group_size`); a layer whose ``in_features`` is not
    a multiple of 16 stays in the compute dtype.  CPU: torch's ``aten._weight_int4pack_mm_for_cpu``
    when ``g >= 32`` and ``out_features % 16 == 0`` (what that kernel takes); the weight is
    converted to the kernel's own packed layout once, when the model is loaded (it is a layout of
    that CPU build, so it is never written to files).  Other layers - in the 14B model only the ViT
    ``fc2`` (``in_features`` 4304 = 16 * 269, group 16), which runs once per image - and other
    devices (CUDA included; torchao's kernels are not wired in) dequantise per call.  Run it in bf16:
    for one token through an 18944 x 3584 layer on a 2-core CPU it took 8 ms against 21 ms for the
    dense bf16 product, but 124 ms in fp32 against 33 ms dense.
``nf4``
    4-bit NormalFloat (QLoRA: Dettmers, Pagnoni, Holtzman, Zettlemoyer, "QLoRA: Efficient
    Finetuning of Quantized LLMs", NeurIPS 2023, arXiv:2305.14314, section 3): each block of 64
    consecutive weights of the row-major flattened matrix is divided by its absolute maximum and
    every value is replaced by the index of the nearest of 16 code values (:data:`NF4_CODE`), the
    normalised quantiles of a standard normal.  CUDA with bitsandbytes: its ``matmul_4bit``, given
    the stored tensors as they are (the layout is meant to be bitsandbytes' own: row-major blocks of
    64, the first value of a pair in the high nibble; this path has not been run on a GPU yet).
    Nothing else runs it: CPUs get int4, the same 4 bits per weight with a fused kernel.
``fp8``
    ``float8_e4m3fn`` weights with one float32 scale per output row, ``w ~ q * scale``,
    ``scale = max|w_row| / 448``.  CUDA of compute capability 8.9 or newer (Ada, Hopper):
    ``torch._scaled_mm``, which multiplies two fp8 matrices, so the activations are rounded to e4m3
    too, per token with their own scale (an error the weight-only :func:`simulate_quantization`
    does not include); layers whose sizes are not multiples of 16, or activations not in bf16, are
    dequantised per call.  Elsewhere: refused (int8 is the same 8 bits per weight).

What is quantised (:func:`quantizable`): every linear layer of both decoder experts (attention and
MLP), of the ViT encoder layers and of the connector - about 99% of the 14B model's linear weights.
Kept in the compute dtype: embeddings and the LM head (the logits' resolution), norms, the ViT patch
embedding and position tables (small), the generation adapters (``vae2llm``/``llm2vae``/time
embedder: they map the latents the flow integrates) and the autoencoder (convolutions).

State-dict (and file) layout of a quantised layer ``<name>`` with weight ``[out, in]``, beside
``<name>.bias`` when the layer has one.  "compute" means the model's compute dtype in memory and
float32 in files; 4-bit values are packed two per byte, the first of each pair in the high nibble
(``byte = q[2j] << 4 | q[2j + 1]``, along each row):

=======  ====================================================================================
int8     ``weight`` int8 ``[out, in]``; ``scale`` compute ``[out]``
int4     ``weight`` uint8 ``[out, in/2]``; ``scale``, ``zero`` compute ``[out, in/g]``
nf4      ``weight`` uint8 ``[out, in/2]`` (code indices); ``absmax`` float32 ``[ceil(out*in/64)]``
fp8      ``weight`` float8_e4m3fn ``[out, in]``; ``scale`` float32 ``[out]``
=======  ====================================================================================

The state dict is always this portable layout, also for int4 layers that hold the CPU kernel's
packed form in memory: their state dict, and a move to another device, unpack it (about 1 s per
68M weights); casts and no-op moves keep it.  :func:`quantize_model` replaces layers without
checking the device (every layer can dequantise per call); :func:`~unimedvl.formats.checkpoint.load_pretrained`
calls :func:`check_scheme` with its device before reading any tensor.
"""

from __future__ import annotations

import importlib.util
import re
import threading
from dataclasses import dataclass
from statistics import NormalDist
from typing import Callable, ClassVar, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .layers import linear, product_in_float32

# Linear layers that are quantised, by module name (state-dict prefix).
QUANTIZED_LINEARS = re.compile(
    r"^(language_model\.model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp)(_moe_gen)?(\.\w+_proj)?"
    r"|vit_model\.vision_model\.encoder\.layers\.\d+\.(self_attn\.\w+_proj|mlp\.fc[12])"
    r"|connector\.fc[12])$"
)

# suffix -> (dtype, shape); dtype None: a float tensor in the compute dtype (float32 in files)
Layout = dict[str, tuple["torch.dtype | None", tuple[int, ...]]]


class QuantizationUnavailable(ValueError):
    """A scheme that the device cannot run; the message names the scheme, the device and what to use."""


def quantizable(name: str, module: nn.Module) -> bool:
    """Whether the linear layer ``name`` is quantised (see the module docstring)."""
    return isinstance(module, nn.Linear) and QUANTIZED_LINEARS.match(name) is not None


# ---- 4-bit packing ---------------------------------------------------------------------------


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """uint8 ``[rows, 2m]`` of values 0..15 -> ``[rows, m]``, the first of each pair in the high nibble."""
    return (q[:, 0::2] << 4) | q[:, 1::2]


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_nibbles`: uint8 ``[rows, m]`` -> ``[rows, 2m]``."""
    return torch.stack((packed >> 4, packed & 15), dim=-1).reshape(packed.shape[0], -1)


# ---- int8 ------------------------------------------------------------------------------------


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight [out, in]`` (any float dtype) -> (int8 ``[out, in]``, float32 scale ``[out]``)."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0  # [out]; an all-zero row keeps scale > 0
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def _int8_layout(out_features: int, in_features: int) -> Layout:
    return {"weight": (torch.int8, (out_features, in_features)), "scale": (None, (out_features,))}


def _int8_quantize(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    q, scale = quantize_int8(weight)
    return {"weight": q, "scale": scale}


def _int8_dequantize(t: Mapping[str, torch.Tensor], out_features: int, in_features: int) -> torch.Tensor:
    return t["weight"].float() * t["scale"].float()[:, None]


# ---- int4 ------------------------------------------------------------------------------------

INT4_GROUP_SIZES = (128, 64, 32, 16)  # preferred first
INT4_KERNEL_GROUP_SIZES = (32, 64, 128, 256)  # what aten._weight_int4pack_mm_for_cpu accepts


def int4_group_size(in_features: int) -> int | None:
    """The int4 group of a layer: 128, else the largest of 64, 32, 16 dividing ``in_features``;
    ``None`` (the layer stays in the compute dtype) when none does."""
    return next((g for g in INT4_GROUP_SIZES if in_features % g == 0), None)


def _int4_layout(out_features: int, in_features: int) -> Layout | None:
    g = int4_group_size(in_features)
    if g is None:
        return None
    groups = (out_features, in_features // g)
    return {"weight": (torch.uint8, (out_features, in_features // 2)), "scale": (None, groups), "zero": (None, groups)}


def quantize_int4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``weight [out, in]`` -> (packed uint8 ``[out, in/2]``, float32 scale and zero ``[out, in/g]``),
    ``w ~ (q - 8) * scale + zero`` per group of ``g = int4_group_size(in)`` input features."""
    n, k = weight.shape
    g = int4_group_size(k)
    if g is None:
        raise ValueError(f"int4 needs in_features to be a multiple of 16, got {k}")
    w = weight.detach().float().reshape(n, k // g, g)
    lo, hi = w.amin(dim=-1), w.amax(dim=-1)  # [out, in/g]
    scale = (hi - lo) / 15.0  # 0 for a constant group: every q then decodes to zero = lo
    q = torch.round((w - lo[..., None]) / scale.clamp(min=1e-12)[..., None]).clamp_(0, 15).to(torch.uint8)
    return pack_nibbles(q.reshape(n, k)), scale, lo + 8.0 * scale


def _int4_quantize(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    packed, scale, zero = quantize_int4(weight)
    return {"weight": packed, "scale": scale, "zero": zero}


def _int4_dequantize(t: Mapping[str, torch.Tensor], out_features: int, in_features: int) -> torch.Tensor:
    g = in_features // t["scale"].shape[1]
    q = unpack_nibbles(t["weight"]).float().reshape(out_features, in_features // g, g)
    w = (q - 8.0) * t["scale"].float()[..., None] + t["zero"].float()[..., None]
    return w.reshape(out_features, in_features)


def _cpu_int4_pack(q: torch.Tensor) -> torch.Tensor:
    """Values 0..15 ``[out, in]`` -> the packed form of torch's CPU int4 kernel (``inner_k_tiles=1``)."""
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 1)


def _nibble_stream(packed: torch.Tensor) -> torch.Tensor:
    # any fixed reading order of the nibbles of a packed tensor (the same for every call)
    return torch.stack((packed & 15, packed >> 4), dim=-1).reshape(-1)


def _nibble_sources(out_features: int, in_features: int) -> torch.Tensor:
    """For each nibble of :func:`_cpu_int4_pack`'s output (in :func:`_nibble_stream` order), the flat
    index of the element it holds.  The kernel's layout is an implementation detail of the CPU build,
    so it is not reproduced here: packing is a permutation of nibbles, and packing the base-16 digits
    of every element's flat index tells where each element went."""
    numel = out_features * in_features
    index = torch.arange(numel, dtype=torch.int64)
    source = torch.zeros(numel, dtype=torch.int64)
    shift = 0
    while (1 << shift) < numel:
        digit = ((index >> shift) & 15).reshape(out_features, in_features)
        source |= _nibble_stream(_cpu_int4_pack(digit)).to(torch.int64) << shift
        shift += 4
    return source


CPU_INT4_ROWS = 64  # the kernel packs blocks of up to 64 output rows independently (checked on every unpack)


def _cpu_int4_unpack(packed: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """Inverse of :func:`_cpu_int4_pack` -> uint8 values ``[out, in]``.

    Rows are unpacked in blocks of :data:`CPU_INT4_ROWS` (and the remaining rows as one block) with
    the permutation of one block (:func:`_nibble_sources`), then checked by packing the result
    again; should a build pack across those blocks, the whole matrix's permutation is used instead
    (slower, about 10 s for 68M weights).
    """
    packed = packed.contiguous()
    parts, main = [], out_features - out_features % CPU_INT4_ROWS
    for start, rows, height in ((0, main, CPU_INT4_ROWS), (main, out_features - main, out_features - main)):
        if rows == 0:
            continue
        blocks = _nibble_stream(packed[start:start + rows]).reshape(rows // height, height * in_features)
        q = torch.empty_like(blocks)
        q[:, _nibble_sources(height, in_features)] = blocks
        parts.append(q.reshape(rows, in_features))
    q = torch.cat(parts)
    if not torch.equal(_cpu_int4_pack(q), packed):
        q = torch.empty(out_features * in_features, dtype=torch.uint8)
        q[_nibble_sources(out_features, in_features)] = _nibble_stream(packed)
        q = q.reshape(out_features, in_features)
        if not torch.equal(_cpu_int4_pack(q), packed):
            raise RuntimeError("torch's CPU int4 packing is not a permutation of nibbles in this build; cannot unpack it")
    return q


# ---- nf4 -------------------------------------------------------------------------------------

NF4_BLOCK = 64


def _nf4_code() -> torch.Tensor:
    """The 16 NormalFloat-4 values (QLoRA, section 3): quantiles of a standard normal at evenly
    spaced probabilities from ``d`` towards 1/2 - 8 on the positive side, 7 on the negative side, so
    that zero is a value exactly - plus zero, divided by the largest.  The outermost probability
    ``d = ((1 - 1/30) + (1 - 1/32)) / 2`` (about 0.9677) keeps the end quantiles finite; the values
    agree with the table printed in the paper (a test checks them)."""
    normal, d = NormalDist(), ((1 - 1 / 30) + (1 - 1 / 32)) / 2

    def probabilities(count: int) -> list[float]:  # count evenly spaced from d towards 1/2, 1/2 excluded
        return [d + (0.5 - d) * i / count for i in range(count)]

    values = [normal.inv_cdf(p) for p in probabilities(8)] + [-normal.inv_cdf(p) for p in probabilities(7)] + [0.0]
    top = max(values)
    return torch.tensor(sorted(v / top for v in values), dtype=torch.float32)


NF4_CODE = _nf4_code()  # ascending, NF4_CODE[7] == 0
_NF4_EDGES = (NF4_CODE[1:] + NF4_CODE[:-1]) / 2  # nearest code value by bucketing at the midpoints


def _nf4_layout(out_features: int, in_features: int) -> Layout | None:
    if in_features % 2:
        return None
    blocks = -(-out_features * in_features // NF4_BLOCK)
    return {"weight": (torch.uint8, (out_features, in_features // 2)), "absmax": (torch.float32, (blocks,))}


def _blocks(flat: torch.Tensor) -> torch.Tensor:
    pad = -flat.numel() % NF4_BLOCK
    return F.pad(flat, (0, pad)).reshape(-1, NF4_BLOCK)


def quantize_nf4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight [out, in]`` -> (packed code indices uint8 ``[out, in/2]``, float32 absmax per block of 64)."""
    n, k = weight.shape
    blocks = _blocks(weight.detach().float().reshape(-1))
    absmax = blocks.abs().amax(dim=1)
    idx = torch.bucketize(blocks / absmax.clamp(min=1e-12)[:, None], _NF4_EDGES.to(blocks.device)).to(torch.uint8)
    return pack_nibbles(idx.reshape(-1)[: n * k].reshape(n, k)), absmax


def _nf4_quantize(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    packed, absmax = quantize_nf4(weight)
    return {"weight": packed, "absmax": absmax}


def _nf4_dequantize(t: Mapping[str, torch.Tensor], out_features: int, in_features: int) -> torch.Tensor:
    code = NF4_CODE.to(t["weight"].device)
    values = _blocks(code[unpack_nibbles(t["weight"]).long()].reshape(-1)) * t["absmax"].float()[:, None]
    return values.reshape(-1)[: out_features * in_features].reshape(out_features, in_features)


# ---- fp8 -------------------------------------------------------------------------------------

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448


def _fp8_layout(out_features: int, in_features: int) -> Layout:
    return {"weight": (FP8, (out_features, in_features)), "scale": (torch.float32, (out_features,))}


def quantize_fp8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight [out, in]`` -> (float8_e4m3fn ``[out, in]``, float32 scale ``[out]``)."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / FP8_MAX
    return (w / scale[:, None]).clamp_(-FP8_MAX, FP8_MAX).to(FP8), scale


def _fp8_quantize(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    q, scale = quantize_fp8(weight)
    return {"weight": q, "scale": scale}


def _fp8_dequantize(t: Mapping[str, torch.Tensor], out_features: int, in_features: int) -> torch.Tensor:
    return t["weight"].float() * t["scale"].float()[:, None]


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x [n, in] @ (weight * scale).T`` through ``torch._scaled_mm``: ``x`` is rounded to e4m3 per
    row with its own scale (both operands of the product are fp8); the output is in ``x``'s dtype."""
    x_scale = x.detach().abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / FP8_MAX  # [n, 1]
    xq = (x.float() / x_scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8)
    return torch._scaled_mm(xq, weight.t(), scale_a=x_scale, scale_b=scale.float()[None, :], out_dtype=x.dtype)


# ---- devices ---------------------------------------------------------------------------------


def _anywhere(device: torch.device) -> str | None:
    return None


def _bitsandbytes_available() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None


def _nf4_unavailable(device: torch.device) -> str | None:
    if device.type != "cuda":
        return f"nf4 needs a CUDA GPU with bitsandbytes installed; on {device} use int4 (the same 4 bits per weight) or int8"
    if not torch.cuda.is_available():
        return "nf4 needs a CUDA GPU with bitsandbytes installed, and no CUDA device is available; use int4 or int8"
    if not _bitsandbytes_available():
        return (f"nf4 on {device} needs bitsandbytes, which is not installed (pip install bitsandbytes); "
                "or use int4 (the same 4 bits per weight) or int8")
    return None


FP8_CAPABILITY = (8, 9)


def _fp8_unavailable(device: torch.device) -> str | None:
    need = f"fp8 needs a CUDA GPU of compute capability {FP8_CAPABILITY[0]}.{FP8_CAPABILITY[1]} or newer (Ada, Hopper)"
    if device.type != "cuda":
        return f"{need}; on {device} use int8 (the same 8 bits per weight) or int4"
    if not torch.cuda.is_available():
        return f"{need}, and no CUDA device is available; use int8 or int4"
    capability = tuple(torch.cuda.get_device_capability(device))
    if capability < FP8_CAPABILITY:
        return f"{need}; {device} has compute capability {capability[0]}.{capability[1]}: use int8 (the same 8 bits per weight) instead"
    return None


# ---- the scheme table ------------------------------------------------------------------------


@dataclass(frozen=True)
class QuantScheme:
    """One weight-only quantisation scheme (see the module docstring)."""

    name: str
    summary: str  # one line, for help texts
    group_size: str  # the nominal group, recorded in pre-quantised files
    layout_fn: Callable[[int, int], Layout | None]
    quantize_fn: Callable[[torch.Tensor], dict[str, torch.Tensor]]
    dequantize_fn: Callable[[Mapping[str, torch.Tensor], int, int], torch.Tensor]
    unavailable_fn: Callable[[torch.device], str | None]  # why the device cannot run it (None: it can)
    group_of: Callable[[int, int], str]  # the group of one [out, in] layer

    def layout(self, out_features: int, in_features: int) -> Layout | None:
        """The tensors that store a quantised ``[out, in]`` weight, by suffix: ``(dtype, shape)`` with
        dtype ``None`` for the compute dtype.  ``None``: the scheme keeps this layer in the compute dtype."""
        return self.layout_fn(out_features, in_features)

    def quantize(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        """A float ``[out, in]`` weight -> its stored tensors (:meth:`layout`; compute-dtype ones in float32)."""
        return self.quantize_fn(weight)

    def dequantize(self, tensors: Mapping[str, torch.Tensor], out_features: int, in_features: int) -> torch.Tensor:
        """Stored tensors -> the float32 ``[out, in]`` weight they stand for."""
        return self.dequantize_fn(tensors, out_features, in_features)

    def check_device(self, device: str | torch.device) -> None:
        """Raise :class:`QuantizationUnavailable` when ``device`` cannot run the scheme."""
        reason = self.unavailable_fn(torch.device(device))
        if reason is not None:
            raise QuantizationUnavailable(reason)

    @property
    def layer(self) -> type["QuantizedLinear"]:
        return LAYERS[self.name]


def _fixed(group: str) -> Callable[[int, int], str]:
    return lambda out_features, in_features: group


SCHEMES: dict[str, QuantScheme] = {
    s.name: s
    for s in (
        QuantScheme("int8", "8-bit, one scale per output row; CPU kernel", "row", _int8_layout, _int8_quantize,
                    _int8_dequantize, _anywhere, _fixed("row")),
        QuantScheme("int4", "4-bit in groups of 128 inputs with scale and zero; CPU kernel", "128", _int4_layout,
                    _int4_quantize, _int4_dequantize, _anywhere, lambda n, k: str(int4_group_size(k))),
        QuantScheme("nf4", "4-bit NormalFloat, blocks of 64; CUDA with bitsandbytes", str(NF4_BLOCK), _nf4_layout,
                    _nf4_quantize, _nf4_dequantize, _nf4_unavailable, _fixed(str(NF4_BLOCK))),
        QuantScheme("fp8", "e4m3 weights, one scale per output row; CUDA compute capability 8.9+", "row", _fp8_layout,
                    _fp8_quantize, _fp8_dequantize, _fp8_unavailable, _fixed("row")),
    )
}


def schemes_help() -> str:
    """The schemes of :data:`SCHEMES`, for option help texts."""
    return "; ".join(f"{s.name} ({s.summary})" for s in SCHEMES.values())


def check_scheme(scheme: str, device: str | torch.device | None = None) -> QuantScheme:
    """The scheme called ``scheme``; with ``device``, also check that the device runs it.  An unknown
    name is a ``ValueError`` listing the available ones; a device that cannot run it is a
    :class:`QuantizationUnavailable` naming the scheme, the device and what to use instead."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantisation scheme {scheme!r}; available: {', '.join(SCHEMES)}")
    if device is not None:
        SCHEMES[scheme].check_device(device)
    return SCHEMES[scheme]


# ---- layers ----------------------------------------------------------------------------------


# Rows below which torch's fused CPU kernel ``_weight_int8pack_mm`` is used; from there on the
# weight is converted per call and multiplied by the dense GEMM.  The fused kernel streams the int8
# matrix once (right for decoding one token) but does not block over rows: measured on a 2-core
# AVX-512/AMX CPU with an 18944 x 3584 layer, at 512 rows it takes 1.05 s where conversion + bf16
# GEMM takes 0.17 s; the curves cross near 32 rows in bf16 and below 8 rows in float32.
INT8_FUSED_MAX_ROWS = {torch.bfloat16: 32, torch.float16: 32, torch.float32: 8}
# Output rows of an int8 matrix converted per block in that GEMM path: 1024 x 3584 bf16 is 7 MB.
# Measured at 512 rows x an 18944 x 3584 layer: whole-matrix conversion + GEMM 100 ms, blocks of
# 1024 rows 51 ms, the bf16 GEMM alone 47 ms.
CONVERT_ROWS = 1024
_buffers = threading.local()  # per thread: concurrent forwards never share a conversion buffer


def _conversion_buffer(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A flat CPU buffer of at least ``numel`` elements of ``dtype``, reused across calls (at most
    CONVERT_ROWS x the widest input: 39 MB in bf16 for the 14B model)."""
    cache = _buffers.__dict__.setdefault("by_dtype", {})
    buffer = cache.get(dtype)
    if buffer is None or buffer.numel() < numel:
        buffer = cache[dtype] = torch.empty(numel, dtype=dtype)
    return buffer


class QuantizedLinear(nn.Module):
    """``y = x @ W.T + bias`` with ``W`` stored by :attr:`scheme` (buffers, not parameters: quantised
    weights are not trained).  Subclasses give the fast product of their devices; the default
    dequantises the weight per call."""

    scheme: ClassVar[str]

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        layout = SCHEMES[self.scheme].layout(out_features, in_features)
        if layout is None:
            raise ValueError(f"{self.scheme} cannot store a linear layer of {in_features} -> {out_features} features")
        for suffix, (stored, shape) in layout.items():
            self.register_buffer(suffix, torch.empty(shape, dtype=stored or dtype, device=device))
        if bias:
            self.register_buffer("bias", torch.empty(out_features, dtype=dtype, device=device))
        else:
            self.bias = None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "QuantizedLinear":
        dtype = linear.weight.dtype
        out = cls(linear.in_features, linear.out_features, linear.bias is not None, dtype, linear.weight.device)
        if linear.weight.device.type != "meta":
            for suffix, tensor in SCHEMES[cls.scheme].quantize(linear.weight).items():
                getattr(out, suffix).copy_(tensor)  # compute-dtype tensors are cast by the copy
            if linear.bias is not None:
                out.bias.copy_(linear.bias.detach())
            out.prepare()
        return out

    def stored(self) -> dict[str, torch.Tensor]:
        """The tensors of :meth:`QuantScheme.layout`, as the state dict holds them."""
        layout = SCHEMES[self.scheme].layout(self.out_features, self.in_features)
        return {suffix: getattr(self, suffix) for suffix in layout}

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return SCHEMES[self.scheme].dequantize(self.stored(), self.out_features, self.in_features).to(dtype)

    def prepare(self) -> None:
        """Convert the loaded tensors to what the device's kernel reads (once, after loading)."""

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.dequantized_weight(x.dtype))  # bf16 emulated where the CPU has no bf16 units

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = self._matmul(x.reshape(-1, self.in_features))  # [n, out]
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        group = SCHEMES[self.scheme].group_of(self.out_features, self.in_features)
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"scheme={self.scheme}, group={group}")


class Int8Linear(QuantizedLinear):
    """``y = x @ (q * scale).T + bias`` with int8 ``q`` (weight-only: ``x`` stays in the compute dtype)."""

    scheme = "int8"

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:  # x [n, in] -> [n, out]
        if x.device.type == "cpu" and x.shape[0] < INT8_FUSED_MAX_ROWS.get(x.dtype, 1):
            # fused: reads the int8 matrix once; scale must be in x's dtype
            return torch.ops.aten._weight_int8pack_mm(x.contiguous(), self.weight, self.scale.to(x.dtype))
        if x.device.type != "cpu":
            return F.linear(x, self.weight.to(x.dtype)) * self.scale.to(x.dtype)
        # a block of rows (prefill, a denoising step): the dense GEMM over the weight converted
        # CONVERT_ROWS output rows at a time into a reused buffer, each block still in cache when
        # the GEMM reads it, and each output block scaled while it is in cache.  Converting the
        # whole matrix into fresh memory costs as much as the GEMM itself (page faults).
        # bf16 on a CPU without bf16 units: the products in float32 (exact for int8 values), each
        # output block rounded to bf16 before its scale, as the bf16 GEMM would (precision module)
        emulated = product_in_float32(x, x.shape[0])
        a = x.float() if emulated else x
        out = x.new_empty(x.shape[0], self.out_features)  # [n, out]
        scale = self.scale.to(x.dtype)
        buffer = _conversion_buffer(min(CONVERT_ROWS, self.out_features) * self.in_features, a.dtype)
        for start in range(0, self.out_features, CONVERT_ROWS):
            rows = min(CONVERT_ROWS, self.out_features - start)
            block = buffer[: rows * self.in_features].view(rows, self.in_features)
            block.copy_(self.weight[start:start + rows])  # int8 -> compute dtype, [rows, in]
            part = out[:, start:start + rows]
            if emulated:
                part.copy_(torch.mm(a, block.t()))  # [n, rows] float32 -> bf16
            else:
                torch.mm(a, block.t(), out=part)
            part.mul_(scale[start:start + rows])
        return out


class Int4Linear(QuantizedLinear):
    """Group-wise asymmetric int4.  On CPUs, layers the fused kernel takes hold the weight in its
    packed layout (:meth:`prepare`; ``scale``/``zero`` then view the kernel's ``[in/g, out, 2]``
    table), and their state dict unpacks it to the portable layout."""

    scheme = "int4"
    _kernel_scales: torch.Tensor | None = None  # [in/g, out, 2] while ``weight`` is in the CPU kernel's layout

    @property
    def group_size(self) -> int:
        return self.in_features // self.scale.shape[1]

    @property
    def packed_for_cpu(self) -> bool:
        return self._kernel_scales is not None

    def cpu_kernel_fits(self) -> bool:
        return self.group_size in INT4_KERNEL_GROUP_SIZES and self.out_features % 16 == 0

    def prepare(self) -> None:
        if self.packed_for_cpu or self.weight.device.type != "cpu" or not self.cpu_kernel_fits():
            return
        self.weight = _cpu_int4_pack(unpack_nibbles(self.weight))
        self._link_table()

    def _link_table(self) -> None:
        # the kernel's [in/g, out, 2] table, with ``scale`` and ``zero`` as views of it (no second copy)
        table = torch.stack((self.scale.t(), self.zero.t()), dim=-1).contiguous()
        self.scale, self.zero = table[..., 0].t(), table[..., 1].t()
        self._kernel_scales = table

    def unpack(self) -> None:
        """Back to the portable layout (from the CPU kernel's)."""
        if not self.packed_for_cpu:
            return
        q = _cpu_int4_unpack(self.weight.cpu(), self.out_features, self.in_features)
        self.weight = pack_nibbles(q).to(self.weight.device)
        self.scale, self.zero = self.scale.contiguous(), self.zero.contiguous()
        self._kernel_scales = None

    def stored(self) -> dict[str, torch.Tensor]:
        if not self.packed_for_cpu:
            return super().stored()
        q = _cpu_int4_unpack(self.weight, self.out_features, self.in_features)
        return {"weight": pack_nibbles(q), "scale": self.scale.contiguous(), "zero": self.zero.contiguous()}

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.packed_for_cpu:
            for suffix, tensor in self.stored().items():
                destination[prefix + suffix] = tensor

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self.unpack()  # the buffers take the portable layout again; prepare() packs it
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _apply(self, fn, recurse=True):
        if self.packed_for_cpu and fn(self.weight) is not self.weight:
            self.unpack()  # a move: the kernel's layout belongs to this CPU, the portable one travels
        super()._apply(fn, recurse)
        if self.packed_for_cpu:  # still here (a cast of scale/zero, or nothing): rebuild the table from them
            self._link_table()
        return self

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16, torch.float16) and self.cpu_kernel_fits():
            self.prepare()
            table = self._kernel_scales if self._kernel_scales.dtype == x.dtype else self._kernel_scales.to(x.dtype)
            return torch.ops.aten._weight_int4pack_mm_for_cpu(x.contiguous(), self.weight, self.group_size, table)
        self.unpack()
        return super()._matmul(x)


class NF4Linear(QuantizedLinear):
    """NormalFloat-4 (QLoRA).  CUDA with bitsandbytes: ``bitsandbytes.matmul_4bit``; otherwise the
    weight is dequantised per call (:func:`check_scheme` refuses such devices when loading)."""

    scheme = "nf4"

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cuda" and _bitsandbytes_available():
            import bitsandbytes
            from bitsandbytes.functional import QuantState

            # our layout is bitsandbytes': row-major flattened blocks of 64, first value in the high nibble
            state = QuantState(absmax=self.absmax, shape=torch.Size((self.out_features, self.in_features)),
                               code=NF4_CODE.to(x.device), blocksize=NF4_BLOCK, quant_type="nf4", dtype=x.dtype)
            return bitsandbytes.matmul_4bit(x, self.weight.reshape(-1, 1).t(), quant_state=state)
        return super()._matmul(x)


class FP8Linear(QuantizedLinear):
    """e4m3 weights with per-row scales.  CUDA of compute capability 8.9+, bf16 activations and sizes
    that are multiples of 16: :func:`fp8_linear` (``torch._scaled_mm``); otherwise dequantised per call."""

    scheme = "fp8"

    def _scaled_mm_fits(self, x: torch.Tensor) -> bool:
        return (x.device.type == "cuda" and x.dtype == torch.bfloat16 and self.in_features % 16 == 0
                and self.out_features % 16 == 0 and tuple(torch.cuda.get_device_capability(x.device)) >= FP8_CAPABILITY)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self._scaled_mm_fits(x):
            return fp8_linear(x.contiguous(), self.weight, self.scale)
        return super()._matmul(x)


LAYERS: dict[str, type[QuantizedLinear]] = {cls.scheme: cls for cls in (Int8Linear, Int4Linear, NF4Linear, FP8Linear)}


# ---- whole models ----------------------------------------------------------------------------


def _targets(model: nn.Module, scheme: QuantScheme) -> list[str]:
    return [name for name, module in model.named_modules()
            if quantizable(name, module) and scheme.layout(module.out_features, module.in_features) is not None]


def quantize_model(model: nn.Module, scheme: str = "int8") -> list[str]:
    """Replace every :func:`quantizable` linear layer of ``model`` that ``scheme`` can store by its
    quantised form, in place (on the meta device the new layers are empty, to be filled by a
    state-dict load and then :func:`prepare_quantized`).  Returns the names of the replaced layers.
    The device is not checked (see the module docstring)."""
    spec = check_scheme(scheme)
    names = _targets(model, spec)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, spec.layer.from_linear(getattr(parent, child)))
    return names


def prepare_quantized(model: nn.Module) -> None:
    """Let every quantised layer convert its loaded tensors for its device's kernel (int4 on CPUs)."""
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            module.prepare()


@torch.no_grad()
def simulate_quantization(model: nn.Module, scheme: str) -> list[str]:
    """Measure a scheme's weight error on any device: replace, in place, the weight of every layer
    :func:`quantize_model` would quantise by ``dequantize(quantize(weight))`` - the same functions the
    real layers use - leaving the layers float.  Activation rounding (fp8 on the GPU) is not included.
    Returns the names of the changed layers."""
    spec = check_scheme(scheme)
    names = _targets(model, spec)
    for name in names:
        linear = model.get_submodule(name)
        w = linear.weight
        w.copy_(spec.dequantize(spec.quantize(w), w.shape[0], w.shape[1]).to(w.dtype))
    return names
