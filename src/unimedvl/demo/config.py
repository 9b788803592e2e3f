"""Settings of ``unimedvl demo``, as a typed dataclass with named presets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .checks import SamplerChoice


@dataclass(frozen=True)
class DemoConfig:
    per_label: int = 12  # procedural images per label and modality
    max_side: int = 64  # stored image size: the scale the demo model works at
    plan: str = "demo"  # a shipped plan name or a plan file
    steps_scale: float = 1.0  # multiplies the steps of the autoencoder step and of every stage
    sampler: SamplerChoice = field(default_factory=SamplerChoice)
    t2i_per_modality: int = 4  # held-out prompts drawn per modality
    max_sr_pairs: int | None = None  # None: every held-out pair
    max_questions: int | None = None  # None: every held-out modality question
    workers: int = 2  # dataset-build processes
    seed: int = 0
    register_default: bool = True  # make the trained model the default of ask/generate/serve

    def validate(self) -> "DemoConfig":
        if self.per_label < 2 or self.max_side < 32 or self.steps_scale <= 0 or self.t2i_per_modality < 1:
            raise ValueError("demo: per_label >= 2, max_side >= 32, steps_scale > 0 and t2i_per_modality >= 1 are required")
        return self


PRESETS: dict[str, DemoConfig] = {
    # README command 1: about ten minutes on a 2-core CPU.
    "default": DemoConfig(),
    # The whole path at a reduced scale (the CI test): a minute or two, numbers not meaningful.
    "smoke": DemoConfig(per_label=3, steps_scale=0.04, sampler=SamplerChoice(steps=3), t2i_per_modality=1, max_sr_pairs=2,
                        max_questions=6, workers=1, register_default=False),
}


def demo_preset(name: str, **overrides) -> DemoConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown demo preset {name!r}; known: {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides).validate()
