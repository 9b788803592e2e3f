"""``unimedvl eval ...``: reproduce the paper's benchmarks and metrics, offline."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import DeviceOpt, DtypeOpt, QuantizeOpt, MaxNewTokensOpt, SeedOpt, StepsOpt, echo_results, fail, load_pipeline, read_options, user_errors
from .common import DeviceMapOpt, MaxMemoryOpt

app = typer.Typer(no_args_is_help=True, help="Reproduce the paper's benchmarks and metrics, offline.")


@app.command("vqa")
def vqa(
    benchmark: str = typer.Option(..., "--benchmark", "-b", help="vqa-rad, slake, pathvqa, omnimedvqa or gmai-mmbench."),
    data: Path = typer.Option(..., "--data", help="The benchmark's local directory, as distributed."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder: predictions.jsonl, results.json, scored.jsonl, results.md."),
    model: Optional[Path] = typer.Option(None, "--model", help="Run this checkpoint (resumable: answered ids are skipped)."),
    predictions: Optional[Path] = typer.Option(None, "--predictions", help='Score this JSONL of {"id": ..., "prediction": ...} lines instead.'),
    batch_size: int = typer.Option(8, "--batch-size", help="Questions decoded together."),
    max_new_tokens: int = MaxNewTokensOpt,
    limit: Optional[int] = typer.Option(None, "--limit", help="Only the first N questions (smoke runs)."),
    legacy_closed_quirk: bool = typer.Option(False, "--legacy-closed-quirk",
                                             help="LLaVA-Med closed accuracy with the original script's denominator quirk."),
    judge_url: Optional[str] = typer.Option(None, "--judge-url", help="OpenAI-compatible endpoint of a local judge, e.g. http://127.0.0.1:8001/v1."),
    judge_model: Optional[str] = typer.Option(None, "--judge-model", help="The judge model's name (required with --judge-url)."),
    judge_api_key: Optional[str] = typer.Option(None, "--judge-api-key", envvar="UNIMEDVL_JUDGE_API_KEY", help="Bearer key of the judge endpoint."),
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    quantize: Optional[str] = QuantizeOpt,
    device_map: Optional[str] = DeviceMapOpt,
    max_memory: Optional[str] = MaxMemoryOpt,
) -> None:
    """Score or run one understanding benchmark; prints the results table."""
    from ..evaluation import BENCHMARKS, evaluate_vqa
    from ..evaluation.predictions import PredictionFileError

    if benchmark not in BENCHMARKS:
        fail(f"--benchmark must be one of {list(BENCHMARKS)}, got {benchmark!r}")
    if (model is None) == (predictions is None):
        fail("give exactly one of --model DIR or --predictions FILE")
    if (judge_url is None) != (judge_model is None):
        fail("a judge needs both --judge-url and --judge-model (the report names the judge)")
    judge = None
    if judge_url is not None:
        from ..evaluation.judge import ChatJudge

        judge = ChatJudge(judge_url, judge_model, api_key=judge_api_key)
    from ..inference.inputs import ImageReadOptions

    pipe = load_pipeline(model, device, dtype, ImageReadOptions(), visual_gen=False, quantize=quantize,
                         device_map=device_map, max_memory=max_memory) if model is not None else None
    try:
        results = evaluate_vqa(benchmark, data, out, pipeline=pipe, predictions=predictions, batch_size=batch_size,
                               max_new_tokens=max_new_tokens, limit=limit, legacy_closed=legacy_closed_quirk, judge=judge)
    except (PredictionFileError, *user_errors()) as e:
        fail(str(e))
    echo_results(out)
    if results["missing"]:
        typer.secho(f"{results['missing']} question(s) had no prediction and count as wrong (see results.json missing_ids)",
                    fg=typer.colors.YELLOW, err=True)


@app.command("pixels")
def pixels(
    generated: Path = typer.Option(..., "--generated", help="Folder of generated images."),
    reference: Path = typer.Option(..., "--reference", help="Folder of ground-truth images with the same file names."),
    task: str = typer.Option(..., "--task", help="staining (RGB), sr4x, t2_to_flair or flair_to_t2 (grayscale)."),
    out: Path = typer.Option(..., "--out", "-o"),
) -> None:
    """PSNR and SSIM of generated images against their references (interleaved tasks)."""
    from ..evaluation.tasks import evaluate_pixels
    from ..formats.medical_io import MedicalImageError

    try:
        evaluate_pixels(generated, reference, task, out)
    except (MedicalImageError, ValueError, FileNotFoundError) as e:
        fail(str(e))
    echo_results(out)


@app.command("t2i")
def t2i(
    prompts: Path = typer.Option(..., "--prompts", help="Prompt set: .parquet/.jsonl/.json/.csv with prompt, modality, image (the real one), id."),
    generated: Path = typer.Option(..., "--generated", help="Folder of generated images, <id>.png (filled first when --model is given)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder: results.json, scored.jsonl, results.md, fid.png, biomedclip.png."),
    model: Optional[Path] = typer.Option(None, "--model", help="Generate the missing images with this checkpoint first (resumable)."),
    feature_weights: Optional[Path] = typer.Option(None, "--feature-weights", "--inception",
                                                   help="Local weights of the FID feature extractor, e.g. pt_inception-2015-12-05-6726825d.pth."),
    extractor: str = typer.Option("inception-v3-fid", "--extractor", help="Registered feature extractor for FID/KID."),
    biomedclip: Optional[Path] = typer.Option(None, "--biomedclip", help="Local BiomedCLIP folder (open_clip_pytorch_model.bin + open_clip_config.json)."),
    biomedclip_tokenizer: Optional[Path] = typer.Option(None, "--biomedclip-tokenizer", help="Folder with BiomedBERT's vocab.txt, if not in --biomedclip."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Only the first N prompts (smoke runs)."),
    batch_size: int = typer.Option(32, "--batch-size", help="Images per feature-extraction batch."),
    height: Optional[int] = typer.Option(None, "--height", help="Default: the model's image size (1024 for the official weights)."),
    width: Optional[int] = typer.Option(None, "--width", help="Default: the model's image size."),
    preset: str = typer.Option("evaluation", "--preset", help="Sampler preset of the generated images (default: evaluation, "
                               "the protocol of EVALUATION.md 5)."),
    steps: Optional[int] = StepsOpt,
    seed: int = SeedOpt,
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    quantize: Optional[str] = QuantizeOpt,
    device_map: Optional[str] = DeviceMapOpt,
    max_memory: Optional[str] = MaxMemoryOpt,
) -> None:
    """Per-modality gFID/KID and BioMedCLIP score of text-to-image outputs, beside the paper's Table 2."""
    from ..evaluation.features import FeatureWeightsError, load_feature_extractor
    from ..evaluation.t2i import evaluate_t2i, generate_missing, load_prompts

    if feature_weights is None and biomedclip is None:
        fail("give --feature-weights (FID/KID) and/or --biomedclip (BioMedCLIP score); nothing is downloaded")
    try:
        prompt_set = load_prompts(prompts)[:limit]  # limit None keeps all
        feats = load_feature_extractor(extractor, feature_weights, device) if feature_weights is not None else None
        clip = None
        if biomedclip is not None:
            from ..evaluation.biomedclip import load_biomedclip

            clip = load_biomedclip(biomedclip, biomedclip_tokenizer, device)
    except (FeatureWeightsError, ValueError, FileNotFoundError) as e:
        fail(str(e))
    if model is not None:
        pipe = load_pipeline(model, device, dtype, read_options(), quantize=quantize,
                             device_map=device_map, max_memory=max_memory)
        try:
            report = generate_missing(pipe, prompt_set, generated, height=height, width=width, preset=preset, steps=steps, seed=seed)
        except user_errors() as e:
            fail(str(e))
        typer.echo(f"generated {report['generated_now']} image(s), {report['already_present']} already present")
        if report["failed"]:
            typer.secho(f"{len(report['failed'])} prompt(s) could not be generated; they count as missing", fg=typer.colors.YELLOW, err=True)
    try:
        results = evaluate_t2i(prompt_set, generated, out, feature_extractor=feats, biomedclip=clip, batch_size=batch_size)
    except (ValueError, FileNotFoundError) as e:
        fail(str(e))
    echo_results(out)
    if results["missing"]:
        typer.secho(f"{results['missing']} prompt(s) have no generated image (see results.json missing_ids)", fg=typer.colors.YELLOW, err=True)


@app.command("counterfactual")
def counterfactual(
    out: Path = typer.Option(..., "--out", "-o"),
    scores: Optional[Path] = typer.Option(None, "--scores", help="Classifier scores on generated images: rows of id, finding, score, label (0/1)."),
    explanations: Optional[Path] = typer.Option(None, "--explanations", help='JSONL of {"id", "prediction", "reference"} explanation texts.'),
    generated: Optional[Path] = typer.Option(None, "--generated", help="Folder of generated counterfactual images (for gFID)."),
    reference: Optional[Path] = typer.Option(None, "--reference", help="Folder of real follow-up images (for gFID)."),
    feature_weights: Optional[Path] = typer.Option(None, "--feature-weights", "--inception", help="Local weights of the FID feature extractor."),
    extractor: str = typer.Option("inception-v3-fid", "--extractor"),
    threshold: float = typer.Option(0.5, "--threshold", help="Score at or above which a finding counts as present (F1)."),
    device: str = DeviceOpt,
) -> None:
    """Counterfactual check (AUROC/F1 of a classifier's scores), explanation text metrics and gFID, beside Table 7."""
    from ..evaluation.counterfactual import evaluate_counterfactual
    from ..evaluation.features import FeatureWeightsError, load_feature_extractor

    try:
        feats = load_feature_extractor(extractor, feature_weights, device) if feature_weights is not None else None
        evaluate_counterfactual(out, scores=scores, explanations=explanations, generated=generated, reference=reference,
                                feature_extractor=feats, threshold=threshold)
    except (FeatureWeightsError, ValueError, FileNotFoundError) as e:
        fail(str(e))
    echo_results(out)


@app.command("reports")
def reports(
    predictions: Path = typer.Option(..., "--predictions", help='JSONL of {"id", "prediction", "reference"} lines.'),
    out: Path = typer.Option(..., "--out", "-o"),
) -> None:
    """BLEU-1..4, METEOR, ROUGE-1 and ROUGE-L of generated reports or explanations.

    METEOR is METEOR 1.5 (``meteor``, the papers') only where pycocoevalcap's jar and java are
    installed; NLTK's METEOR is always reported as ``meteor_nltk`` and kept out of the paper table."""
    from ..evaluation.tasks import evaluate_reports

    try:
        evaluate_reports(predictions, out)
    except (ValueError, FileNotFoundError) as e:
        fail(str(e))
    echo_results(out)
