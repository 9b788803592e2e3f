"""UniMedVL: one model that understands and generates medical images.

Quick start::

    from unimedvl import UniMedVLPipeline
    pipe = UniMedVLPipeline.from_pretrained("/path/to/UniMedVL", dtype="bf16")
    print(pipe.ask(["chest.dcm"], "Is there a pleural effusion?").text)
    pipe.generate_image("Chest X-ray of a healthy adult.").save("cxr.png")
"""

from .version import __version__

from .config import AutoencoderConfig, LLMConfig, PRESETS, UniMedVLConfig, ViTConfig  # noqa: E402
from .model import KVCache, PackedBatch, UniMedVL  # noqa: E402
from .formats.checkpoint import load_pretrained, save_pretrained  # noqa: E402
from .inference import Answer, Conversation, GeneratedImage, ImageReadOptions, Report, UniMedVLPipeline  # noqa: E402

__all__ = [
    "Answer",
    "AutoencoderConfig",
    "Conversation",
    "GeneratedImage",
    "ImageReadOptions",
    "KVCache",
    "LLMConfig",
    "PRESETS",
    "PackedBatch",
    "Report",
    "UniMedVL",
    "UniMedVLConfig",
    "UniMedVLPipeline",
    "ViTConfig",
    "__version__",
    "load_pretrained",
    "save_pretrained",
]
