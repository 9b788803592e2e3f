"""The UniMedVL network: our own PyTorch modules, named after the official checkpoint keys."""

from .attention import AttentionLayout, KVCache, Split
from .unimedvl import ModelOutput, PackedBatch, UniMedVL

__all__ = ["AttentionLayout", "KVCache", "ModelOutput", "PackedBatch", "Split", "UniMedVL"]
