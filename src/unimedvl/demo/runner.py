"""``unimedvl demo``: Observation -> Knowledge -> Analysis on the embedded default.

1. Observation - build the demo corpus and its dataset card (:func:`~unimedvl.data.demo.build_demo_dataset`).
2. Knowledge - the ``demo`` plan: its autoencoder step, then the three curriculum stages at the
   ``tiny`` preset; export the EMA weights in the official layout to ``OUT/model``.
3. Analysis - the held-out checks (:mod:`.checks`) on the trained model and on the untrained one
   (the same initial weights the curriculum started from, with the same trained autoencoder), plus
   chance, majority-class and bicubic baselines; ``OUT/metrics.json`` and ``OUT/report.html``.

Every step resumes: complete dataset shards are reused, training continues from its latest
checkpoint, and a finished run only re-evaluates.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)


def scaled_plan(plan, factor: float):
    """``plan`` with the autoencoder's and every stage's steps multiplied by ``factor`` (at least 2 each)."""
    if factor == 1.0:
        return plan

    def scale(n: int) -> int:
        return max(2, round(n * factor))

    stages = tuple(dataclasses.replace(s, steps=scale(s.steps), warmup_steps=min(s.warmup_steps, scale(s.steps) // 2),
                                       checkpoint_every=scale(s.checkpoint_every)) for s in plan.stages)
    ae = plan.autoencoder and dataclasses.replace(plan.autoencoder, steps=scale(plan.autoencoder.steps),
                                                  warmup_steps=min(plan.autoencoder.warmup_steps, scale(plan.autoencoder.steps) // 2))
    return dataclasses.replace(plan, stages=stages, autoencoder=ae)


class _Progress:
    """One tqdm bar per evaluation phase."""

    def __init__(self, enabled: bool = True):
        self.enabled, self.bar = enabled, None

    def start(self, total: int, desc: str):
        from tqdm import tqdm

        self.close()
        self.bar = tqdm(total=total, desc=desc, unit="item", disable=not self.enabled)

    def tick(self):
        if self.bar is not None:
            self.bar.update(1)

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def train_demo_model(dataset: Path, run_dir: Path, plan, show_progress: bool = True):
    """Run (or resume) ``plan`` on ``dataset`` into ``run_dir``; returns the trainer's result."""
    from ..training.start import TrainingProgress, initial_model
    from ..training.trainer import Trainer

    if plan.preset != "tiny":
        raise ValueError(f"the demo trains the tiny preset (bundled tokenizer); plan {plan.name!r} asks for {plan.preset!r}")
    model, tokenizer = initial_model(plan)
    progress = TrainingProgress(plan, enabled=show_progress)
    trainer = Trainer(plan, dataset, run_dir, model=model, tokenizer=tokenizer, on_log=progress.on_log,
                      on_autoencoder_log=progress.on_autoencoder_log, tensorboard=False)
    result = trainer.run(resume=True)
    progress.close(result.global_step)
    return result


def untrained_pipeline(run_dir: Path, plan):
    """The curriculum's starting point: the preset initialised with the plan's seed, with the trained
    autoencoder and the plan's inference transforms - what every trained weight is compared to."""
    from ..inference import UniMedVLPipeline
    from ..training.autoencoder import load_trained_autoencoder
    from ..training.start import initial_model

    model, tokenizer = initial_model(plan)
    if plan.autoencoder is not None and load_trained_autoencoder(model.vae_model, run_dir / "autoencoder") is None:
        raise RuntimeError(f"{run_dir / 'autoencoder'}: no finished autoencoder step")
    if plan.inference is not None:
        model.config.transforms = plan.inference
    return UniMedVLPipeline(model.eval(), tokenizer, name="untrained")


def evaluate_pipeline(pipe, held, classifier, config, progress: _Progress, label: str, size: int) -> dict:
    from . import checks

    vqa = checks.modality_questions(pipe, held.questions)
    progress.start(len(held.sr_pairs), f"{label}: 4x super-resolution")
    sr = checks.super_resolution(pipe, held.sr_pairs, config.sampler, seed=config.seed, on_item=progress.tick)
    progress.start(sum(len(p) for p in held.prompts.values()), f"{label}: text-to-image")
    t2i = checks.text_to_image(pipe, held.prompts, classifier, config.sampler, size=size, seed=config.seed, on_item=progress.tick)
    progress.close()
    return {"vqa": vqa, "sr": sr, "t2i": t2i}


def run_demo(out: str | Path, config=None, *, show_progress: bool = True, echo: Callable[[str], None] = print) -> dict:
    """The whole demo into ``out``; returns the metrics written to ``out/metrics.json``."""
    from ..formats.atomic import write_json
    from ..data.demo import build_demo_dataset, demo_layout
    from ..inference.default_model import set_default_model
    from ..inference import UniMedVLPipeline
    from ..training.export import export_checkpoint
    from ..training.plan import load_plan
    from . import checks
    from .config import demo_preset
    from .heldout import load_heldout
    from .modality_classifier import ModalityClassifier
    from .report import write_report

    config = (config or demo_preset("default")).validate()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    progress = _Progress(show_progress)
    timings: dict[str, float] = {}
    start = time.perf_counter()

    echo("== Observation: the demo corpus ==")
    t = time.perf_counter()
    summary = build_demo_dataset(out, per_label=config.per_label, max_side=config.max_side, workers=config.workers)
    timings["dataset_s"] = time.perf_counter() - t
    manifest = summary["manifest"]
    dataset = demo_layout(out)
    echo(f"{manifest['num_kept']} records in {dataset.root}; card: {dataset.card_readme}"
         + (f" (skipped, package not installed: {', '.join(summary['missing'])})" if summary["missing"] else ""))

    echo("== Knowledge: autoencoder step, then the three curriculum stages (tiny preset) ==")
    plan = scaled_plan(load_plan(config.plan), config.steps_scale)
    t = time.perf_counter()
    result = train_demo_model(dataset.root, out / "train", plan, show_progress)
    timings["training_s"] = time.perf_counter() - t
    model_dir = export_checkpoint(result.checkpoint, out / "model")
    echo(f"trained {result.global_step} steps; model exported to {model_dir}")

    echo("== Analysis: held-out checks, trained vs untrained ==")
    t = time.perf_counter()
    held = load_heldout(dataset.root).limited(config.max_questions, config.max_sr_pairs, config.t2i_per_modality)
    classifier = ModalityClassifier(held.train_images)
    size = plan.inference.image_size if plan.inference is not None else config.max_side
    trained = UniMedVLPipeline.from_pretrained(model_dir, dtype="fp32")
    scores = {"trained": evaluate_pipeline(trained, held, classifier, config, progress, "trained", size),
              "untrained": evaluate_pipeline(untrained_pipeline(out / "train", plan), held, classifier, config, progress, "untrained", size)}
    bicubic = checks.bicubic_baseline(held.sr_pairs)
    timings["evaluation_s"] = time.perf_counter() - t

    metrics = summarize(held, classifier, scores, bicubic, config, plan, manifest, out)
    metrics["timings"] = {k: round(v, 1) for k, v in timings.items()}
    metrics["wall_time_s"] = round(time.perf_counter() - start, 1)
    write_json(out / "metrics.json", metrics, indent=2)
    write_details(out / "evaluation", scores, bicubic)
    write_report(out, metrics, scores, bicubic, held, plan)
    if config.register_default:
        pointer = set_default_model(model_dir, "unimedvl demo")
        metrics["default_model_pointer"] = str(pointer)
    return metrics


def write_details(folder: Path, scores: dict, bicubic: dict) -> None:
    """Per-item results behind the metrics: ``{trained,untrained}_{vqa,sr,t2i}.jsonl`` and ``bicubic_sr.jsonl``."""
    from ..formats.atomic import write_jsonl

    folder.mkdir(parents=True, exist_ok=True)
    for label, s in scores.items():
        write_jsonl(folder / f"{label}_vqa.jsonl", s["vqa"]["answers"])
        write_jsonl(folder / f"{label}_sr.jsonl", s["sr"]["pairs"])
        write_jsonl(folder / f"{label}_t2i.jsonl", s["t2i"]["rows"])
    write_jsonl(folder / "bicubic_sr.jsonl", bicubic["pairs"])


def summarize(held, classifier, scores: dict, bicubic: dict, config, plan, manifest: dict, out: Path) -> dict:
    """The numbers of ``metrics.json`` (figures of every baseline beside the trained model's)."""
    questions = scores["trained"]["vqa"]["answers"]
    options = sorted(held.train_modalities)
    majority = max(held.train_modalities, key=held.train_modalities.get) if held.train_modalities else None
    real_accuracy, real_per = classifier.agreement(held.test_images)
    tr, un = scores["trained"], scores["untrained"]
    t2i_modalities = sorted(tr["t2i"]["images"])
    return {
        "scale_note": "a tiny model (tiny preset) trained for minutes on a CPU on the embedded demo corpus: these numbers show the "
                      "pipeline works end to end, not what UniMedVL can do",
        "modality_accuracy": tr["vqa"]["accuracy"],
        "untrained_modality_accuracy": un["vqa"]["accuracy"],
        "chance_modality_accuracy": 1 / len(options) if options else None,
        "majority_modality_accuracy": (sum(q["modality"] == majority for q in questions) / len(questions)) if questions else None,
        "modality_options": options,
        "modality_questions": len(questions),
        "modality_accuracy_per_modality": tr["vqa"]["per_modality"],
        "untrained_modality_accuracy_per_modality": un["vqa"]["per_modality"],
        "sr_psnr": tr["sr"]["psnr"], "sr_ssim": tr["sr"]["ssim"],
        "untrained_sr_psnr": un["sr"]["psnr"], "untrained_sr_ssim": un["sr"]["ssim"],
        "bicubic_sr_psnr": bicubic["psnr"], "bicubic_sr_ssim": bicubic["ssim"],
        "sr_pairs": len(bicubic["pairs"]),
        "sr_sources": sorted({p["source"] for p in bicubic["pairs"]}),
        "t2i_agreement": tr["t2i"]["agreement"],
        "untrained_t2i_agreement": un["t2i"]["agreement"],
        "chance_t2i_agreement": 1 / len(classifier.modalities),
        "t2i_classifier_real_accuracy": real_accuracy,
        "t2i_agreement_per_modality": tr["t2i"]["per_modality"],
        "untrained_t2i_agreement_per_modality": un["t2i"]["per_modality"],
        "t2i_classifier_real_accuracy_per_modality": real_per,
        "t2i_images": sum(len(v) for v in tr["t2i"]["images"].values()),
        "t2i_modalities": t2i_modalities,
        "sampler": dataclasses.asdict(config.sampler),
        "plan": {"name": plan.name, "preset": plan.preset, "steps": plan.total_steps,
                 "stages": {s.name: s.steps for s in plan.stages},
                 "autoencoder_steps": plan.autoencoder.steps if plan.autoencoder else 0},
        "autoencoder": json.loads((out / "train" / "autoencoder" / "done.json").read_text()) if plan.autoencoder else None,
        "dataset": {"records": manifest["num_kept"], "splits": manifest.get("splits")},
        "config": {k: v for k, v in dataclasses.asdict(config).items() if k != "sampler"},
    }
