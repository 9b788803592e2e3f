"""What a training run starts from and how it shows progress - shared by ``unimedvl train`` and
``unimedvl demo``.

* :func:`initial_model`: the plan's preset initialised with the plan's seed (or a checkpoint given
  as ``init_from``) and its tokenizer: ``tokenizer_dir``, else the checkpoint's, else the bundled
  one of the ``tiny`` preset.
* :class:`TrainingProgress`: a tqdm bar for the plan's autoencoder step, then one for its curriculum
  steps, fed by the trainer's ``on_autoencoder_log`` / ``on_log`` callbacks.
"""

from __future__ import annotations

from pathlib import Path


def initial_model(plan, *, init_from: str | Path | None = None, tokenizer_dir: str | Path | None = None, device: str = "cpu"):
    """``(model, tokenizer)`` a run of ``plan`` starts from; ``ValueError`` when no tokenizer fits."""
    from ..config import UniMedVLConfig
    from ..formats.checkpoint import load_pretrained
    from ..model import UniMedVL
    from ..tokenizer import BUNDLED_TINY_TOKENIZER, Tokenizer

    if init_from is not None:
        model, tokenizer = load_pretrained(init_from, dtype=None, device=device)
    else:  # float32 master weights (unimedvl.precision)
        model = UniMedVL.from_config(UniMedVLConfig.from_preset(plan.preset), seed=plan.seed, dtype="fp32")
        tokenizer = None
    if tokenizer_dir is not None:
        tokenizer = Tokenizer(tokenizer_dir)
    elif tokenizer is None and plan.preset == "tiny":
        tokenizer = Tokenizer(BUNDLED_TINY_TOKENIZER)
    if tokenizer is None:
        raise ValueError(f"preset {plan.preset!r} has no bundled tokenizer: pass --tokenizer DIR (or --init-from a checkpoint with one)")
    if len(tokenizer) > model.config.llm.vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the model's vocabulary has {model.config.llm.vocab_size} rows")
    return model, tokenizer


class TrainingProgress:
    """Progress bars of one run: each opens at its phase's first report (the autoencoder step's
    reports step 0 before training), so the two never overlap."""

    def __init__(self, plan, max_steps: int | None = None, enabled: bool = True):
        self.plan, self.enabled = plan, enabled
        self.total = plan.total_steps if max_steps is None else min(max_steps, plan.total_steps)
        self._bar = None
        self._phase = None

    def _open(self, phase: str, total: int):
        from tqdm import tqdm

        if self._phase != phase:
            self.close()
            self._bar, self._phase = tqdm(total=total, desc=phase, unit="step", disable=not self.enabled), phase
        return self._bar

    def on_autoencoder_log(self, row: dict) -> None:
        bar = self._open("autoencoder", self.plan.autoencoder.steps)
        bar.n = row["step"]
        bar.set_postfix(loss=f"{row['loss']:.3f}")
        bar.refresh()

    def on_log(self, row: dict) -> None:
        bar = self._open("training", self.total)
        bar.n = row["step"]
        bar.set_postfix(stage=row["stage"], loss=f"{row['loss']:.3f}")
        bar.refresh()

    def close(self, global_step: int | None = None) -> None:
        if self._bar is not None:
            if global_step is not None and self._phase == "training":
                self._bar.n = global_step
            self._bar.close()
            self._bar, self._phase = None, None
