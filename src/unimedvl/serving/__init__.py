"""Serving: an OpenAI-compatible HTTP API and a web UI over one loaded pipeline (``unimedvl serve``)."""

from .app import create_app
from .config import ServeConfig

__all__ = ["ServeConfig", "create_app"]
