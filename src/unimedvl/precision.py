"""The precision policy: dtype names and the default dtype, decided here and nowhere else.

* Names: ``bf16`` / ``bfloat16`` and ``fp32`` / ``float32`` (:data:`DTYPES`); ``auto`` picks the
  default below.
* Inference weights (``load_pretrained``, ``UniMedVL.from_config``, the pipeline, CLI, server):
  ``auto`` = bfloat16 on CUDA devices, as the official scripts run, and float32 elsewhere: fp32 is
  exact enough for parity, and most CPUs have no bfloat16 units.  Pass ``bf16`` on a CPU to halve
  the memory of the weights.
* bf16 arithmetic on CPUs without bfloat16 units (no AVX-512 BF16 or AMX, :data:`CPU_HAS_BF16_UNITS`):
  PyTorch's own bf16 kernels there are emulated, and measured on a 2-core AVX2 CPU a 3x3
  convolution ran 400x slower than in fp32 (3.58 s vs 8 ms, 128 channels at 64x64) and a 768-row
  product 6x slower.  Convolutions and products of many rows therefore compute in fp32 from the
  bf16 values and round the result to bf16 (:func:`emulates_bf16`), which is what bf16 units do
  too: exact products, a float32 sum, one rounding.  Products of up to 32 rows keep the bf16
  kernel, which is about as fast as converting the weights for them (``layers.BF16_EMULATION_ROWS``).
* Training: float32 master weights, optimiser state and EMA always; ``auto`` computes in bf16
  autocast on CUDA devices and in fp32 elsewhere (:func:`training_compute`).
"""

from __future__ import annotations

import torch

DTYPES: dict[str, torch.dtype] = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp32": torch.float32,
    "float32": torch.float32,
}
PRECISIONS = ("auto", "fp32", "bf16")  # training compute precisions (plan key ``precision``)


def _cpu_has_bf16_units() -> bool:
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN or without the probe
        return False


# decided once at import: a plain bool, so compiled code sees a constant
CPU_HAS_BF16_UNITS: bool = _cpu_has_bf16_units()


def emulates_bf16(x: torch.Tensor) -> bool:
    """Whether ``x`` is a bf16 CPU tensor on a CPU without bf16 units (see the module notes)."""
    return x.dtype == torch.bfloat16 and x.device.type == "cpu" and not CPU_HAS_BF16_UNITS


def default_dtype(device: str | torch.device) -> torch.dtype:
    """The dtype ``auto`` means on ``device``: bfloat16 on CUDA, float32 elsewhere."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def resolve_dtype(dtype: str | torch.dtype | None, device: str | torch.device = "cpu") -> torch.dtype | None:
    """A dtype name, ``auto``, a ``torch.dtype`` or ``None`` (keep what is stored) -> ``torch.dtype | None``."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return default_dtype(device)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be auto or one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bf16"``; ``torch.float32`` -> ``"fp32"``."""
    for name in ("bf16", "fp32"):
        if DTYPES[name] == dtype:
            return name
    return str(dtype).removeprefix("torch.")


def training_compute(precision: str, device: str | torch.device) -> str:
    """A plan's ``precision`` resolved on ``device``: ``auto`` -> ``bf16`` on CUDA, ``fp32`` elsewhere."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        return dtype_name(default_dtype(device))
    return precision
