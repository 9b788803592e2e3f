"""Inference on top of the model: KV-cached contexts, text decoding, guided image sampling."""

from .engine import Engine, ImageSample, TextGeneration

__all__ = ["Engine", "ImageSample", "TextGeneration"]
