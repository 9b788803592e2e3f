"""Inference on top of the model: KV-cached contexts, text decoding, guided image sampling, and the
user-facing pipeline (ask, report, generate_image, edit)."""

from .engine import Engine, ImageSample, Sampler, TextGeneration, TextStream
from .inputs import ImageReadOptions, load_image
from .pipeline import Answer, AnswerStream, Conversation, GeneratedImage, PromptTooLongError, Report, UniMedVLPipeline

__all__ = [
    "Answer",
    "AnswerStream",
    "Conversation",
    "Engine",
    "GeneratedImage",
    "ImageReadOptions",
    "ImageSample",
    "PromptTooLongError",
    "Report",
    "Sampler",
    "TextGeneration",
    "TextStream",
    "UniMedVLPipeline",
    "load_image",
]
