"""UniMedVL: one model that understands and generates medical images.

Quick start::

    from unimedvl import UniMedVL
    model = UniMedVL.from_pretrained("/path/to/UniMedVL", dtype=torch.bfloat16)
"""

from .config import AutoencoderConfig, LLMConfig, PRESETS, UniMedVLConfig, ViTConfig
from .model import KVCache, PackedBatch, UniMedVL

__version__ = "0.1.0"

__all__ = [
    "AutoencoderConfig",
    "KVCache",
    "LLMConfig",
    "PRESETS",
    "PackedBatch",
    "UniMedVL",
    "UniMedVLConfig",
    "ViTConfig",
    "__version__",
]
