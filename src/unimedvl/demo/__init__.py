"""``unimedvl demo``: the whole Observation -> Knowledge -> Analysis pipeline on the embedded default
(the demo corpus, the ``demo`` plan at the ``tiny`` preset, held-out checks and an HTML report)."""

from .config import PRESETS, DemoConfig, demo_preset
from .runner import run_demo

__all__ = ["PRESETS", "DemoConfig", "demo_preset", "run_demo"]
