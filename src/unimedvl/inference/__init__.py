"""Inference on top of the model.

``pipeline`` (the Python API: ask, report, generate_image, edit) builds on ``conversation``
(multi-turn contexts and answers), ``engine`` (KV contexts, context-window checks, text decoding),
``sampling`` (the guided denoising loop), ``presets`` (the named sampler settings), ``inputs``
(images from paths, arrays, DICOM and NIfTI) and ``prompts`` (the official prompt texts).
"""

from .conversation import Answer, AnswerStream, Conversation
from .engine import Engine, PromptTooLongError, Sampler, TextGeneration, TextStream
from .inputs import ImageReadOptions, load_image
from .pipeline import GeneratedImage, Report, UniMedVLPipeline
from .presets import DEFAULT_PRESET, SAMPLER_PRESETS, SamplerSettings, sampler_settings
from .sampling import ImageSample

__all__ = [
    "Answer",
    "AnswerStream",
    "Conversation",
    "DEFAULT_PRESET",
    "Engine",
    "GeneratedImage",
    "ImageReadOptions",
    "ImageSample",
    "PromptTooLongError",
    "Report",
    "SAMPLER_PRESETS",
    "Sampler",
    "SamplerSettings",
    "TextGeneration",
    "TextStream",
    "UniMedVLPipeline",
    "load_image",
    "sampler_settings",
]
