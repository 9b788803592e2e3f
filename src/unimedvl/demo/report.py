"""``OUT/report.html``: the demo's results as a page people can look at - the data card figures,
the autoencoder step and the loss curves per stage, the metrics with their baselines, generated
images per modality, super-resolution input / output / target, and VQA exchanges.  Pictures are
PNG files under ``OUT/report_files/`` referenced by relative paths."""

from __future__ import annotations

import html
import json
from pathlib import Path

from ..data.demo import demo_layout
from ..formats.atomic import write_text
from ..formats.charts import image_grid, line_chart, save_chart

FILES = "report_files"


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return html.escape(str(value))


def _img(path: str, alt: str, width: int | None = None) -> str:
    size = f' width="{width}"' if width else ""
    return f'<figure><img src="{html.escape(path)}" alt="{html.escape(alt)}"{size}><figcaption>{html.escape(alt)}</figcaption></figure>'


def _thumb(path: str, modality: str) -> str:
    return f'<img src="{html.escape(path)}" alt="{html.escape(modality)} image">'


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _figures(out: Path, scores: dict, bicubic: dict, held) -> dict[str, str]:
    """Write the report's image grids; returns name -> relative path."""
    files = out / FILES
    files.mkdir(exist_ok=True)
    written = {}
    tr, un = scores["trained"], scores["untrained"]
    modalities = sorted(tr["t2i"]["images"])
    if modalities:
        width = max(len(v) for v in tr["t2i"]["images"].values())
        rows, labels = [], []
        for m in modalities:
            trained = tr["t2i"]["images"][m]
            untrained = un["t2i"]["images"].get(m, [])
            real = held.test_images.get(m, [])[:width]
            rows.append(trained + [None] * (width - len(trained)) + [None] + untrained[:width] + [None] * (width - len(untrained[:width]))
                        + [None] + real)
            labels.append(m)
        columns = ["trained"] + [""] * (width - 1) + [""] + ["untrained"] + [""] * (width - 1) + [""] + ["held-out real"]
        save_chart(image_grid(rows, cell=80, row_labels=labels, column_labels=columns), files / "t2i_grid.png")
        written["t2i"] = f"{FILES}/t2i_grid.png"
    pairs = held.sr_pairs
    if pairs:
        picks = list(range(len(pairs)))[:10]
        rows = [[pairs[i].low, bicubic["outputs"][i], un["sr"]["outputs"][i], tr["sr"]["outputs"][i], pairs[i].target] for i in picks]
        labels = [f"{pairs[i].modality} {tr['sr']['pairs'][i]['psnr']:.1f} dB" for i in picks]
        save_chart(image_grid(rows, cell=96, row_labels=labels, label_width=120,
                              column_labels=["input (1/4)", "bicubic", "untrained", "trained", "target"]), files / "sr_grid.png")
        written["sr"] = f"{FILES}/sr_grid.png"
    answers = tr["vqa"]["answers"]
    if answers:
        for k, q in enumerate(_exchange_picks(answers)):
            question = next(h for h in held.questions if h.id == q["id"])
            path = files / f"vqa_{k}.png"
            save_chart(image_grid([[question.image]], cell=96), path)
            written[f"vqa_{q['id']}"] = f"{FILES}/{path.name}"
    return written


def _exchange_picks(answers: list[dict], count: int = 8) -> list[dict]:
    """Up to ``count`` exchanges, spread over the modalities (first of each, then the rest)."""
    picks, seen = [], set()
    for a in answers:
        if a["modality"] not in seen:
            picks.append(a)
            seen.add(a["modality"])
    picks += [a for a in answers if a not in picks]
    return picks[:count]


def _autoencoder_curve(out: Path) -> str | None:
    metrics = out / "train" / "autoencoder" / "metrics.jsonl"
    if not metrics.is_file():
        return None
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    path = out / FILES / "autoencoder_loss.png"
    save_chart(line_chart({"loss": [(r["step"], r["loss"]) for r in rows]}, f"autoencoder step ({len(rows)} steps)"), path)
    return f"{FILES}/{path.name}"


def write_report(out: Path, metrics: dict, scores: dict, bicubic: dict, held, plan) -> Path:
    out = Path(out)
    figures = _figures(out, scores, bicubic, held)
    m = metrics
    ae = m.get("autoencoder") or {}
    table = _table(
        ["check (held-out data)", "trained", "untrained", "baseline", "n"],
        [
            ["modality question accuracy", _fmt(m["modality_accuracy"]), _fmt(m["untrained_modality_accuracy"]),
             f"chance {_fmt(m['chance_modality_accuracy'])} (1 of {len(m['modality_options'])}); "
             f"majority class {_fmt(m['majority_modality_accuracy'])}", str(m["modality_questions"])],
            ["4x super-resolution PSNR (dB)", _fmt(m["sr_psnr"], 2), _fmt(m["untrained_sr_psnr"], 2),
             f"bicubic {_fmt(m['bicubic_sr_psnr'], 2)} (the bar to aim for)", str(m["sr_pairs"])],
            ["4x super-resolution SSIM", _fmt(m["sr_ssim"]), _fmt(m["untrained_sr_ssim"]), f"bicubic {_fmt(m['bicubic_sr_ssim'])}",
             str(m["sr_pairs"])],
            ["text-to-image: modality classifier agrees with the prompt", _fmt(m["t2i_agreement"]), _fmt(m["untrained_t2i_agreement"]),
             f"chance {_fmt(m['chance_t2i_agreement'])}; the classifier on real held-out images {_fmt(m['t2i_classifier_real_accuracy'])}",
             str(m["t2i_images"])],
        ],
    )
    per_modality = _table(
        ["modality", "questions: trained", "questions: untrained", "t2i agreement: trained", "t2i agreement: untrained",
         "classifier on real images"],
        [[html.escape(mod), _fmt(m["modality_accuracy_per_modality"].get(mod)), _fmt(m["untrained_modality_accuracy_per_modality"].get(mod)),
          _fmt(m["t2i_agreement_per_modality"].get(mod)), _fmt(m["untrained_t2i_agreement_per_modality"].get(mod)),
          _fmt(m["t2i_classifier_real_accuracy_per_modality"].get(mod))]
         for mod in sorted(set(m["modality_accuracy_per_modality"]) | set(m["t2i_agreement_per_modality"]))],
    )
    untrained_by_id = {a["id"]: a for a in scores["untrained"]["vqa"]["answers"]}
    exchanges = _table(
        ["image", "question", "trained model", "untrained model", "reference"],
        [[_thumb(figures["vqa_" + a["id"]], a["modality"]), html.escape(a["question"]),
          html.escape(a["answer"]) + (" &#10003;" if a["correct"] else " &#10007;"),
          html.escape(untrained_by_id.get(a["id"], {}).get("answer", "")), html.escape(a["reference"])]
         for a in _exchange_picks(scores["trained"]["vqa"]["answers"]) if f"vqa_{a['id']}" in figures],
    )
    dataset = demo_layout(out)
    card = sorted(dataset.card_dir.glob("*.png"))
    card_html = "".join(_img(p.relative_to(out).as_posix(), p.stem.replace("_", " ")) for p in card)
    readme = html.escape(dataset.card_readme.relative_to(out).as_posix())
    stage_plots = [f"train/plots/loss_{s.name}.png" for s in plan.stages if (out / "train" / "plots" / f"loss_{s.name}.png").is_file()]
    ae_curve = _autoencoder_curve(out)
    timings = m.get("timings", {})
    body = f"""
<h1>UniMedVL demo: Observation &rarr; Knowledge &rarr; Analysis</h1>
<p class="note"><b>What this is.</b> A <b>tiny</b> UniMedVL (the <code>tiny</code> preset: a 2-layer, 64-wide decoder with
understanding and generation experts, a 2-layer ViT and a small autoencoder) trained for <b>minutes on a CPU</b> on the
embedded demo corpus: real sample files shipped by pydicom, nilearn, nibabel and scikit-image, plus procedural stand-ins
for modalities no package ships. Every number below was measured in this run on data held out from training at the
patient/volume level; they show that the whole pipeline works, not what UniMedVL can do. Load the official weights
with <code>--model DIR</code> for that.</p>
<p>Wall time {_fmt(m.get('wall_time_s'), 0)} s (dataset {_fmt(timings.get('dataset_s'), 0)} s, training
{_fmt(timings.get('training_s'), 0)} s, evaluation {_fmt(timings.get('evaluation_s'), 0)} s).
Machine-readable numbers: <a href="metrics.json">metrics.json</a>. Model (official layout): <code>model/</code>.</p>

<h2>Results on held-out data</h2>
{table}
<p>Untrained = the weights the curriculum started from, with the same trained autoencoder. Super-resolution and
text-to-image use {m['sampler']['steps']} timesteps, text guidance {m['sampler']['cfg_text_scale']}, image guidance
{m['sampler']['cfg_img_scale']} (settings fixed before the run). Modality answers are scored by the modality they name.
The text-to-image check is a k-nearest-neighbour classifier of image statistics fitted on train-split images.</p>
{per_modality}

<h2>Analysis: generated images per modality (held-out prompts)</h2>
{_img(figures['t2i'], 'text-to-image: trained | untrained | real held-out images') if 't2i' in figures else '<p>no prompts</p>'}
<h2>Analysis: 4x super-resolution (held-out volumes and images)</h2>
{_img(figures['sr'], 'input | bicubic | untrained | trained | target (PSNR of the trained output)') if 'sr' in figures else '<p>no pairs</p>'}
<h2>Analysis: closed modality questions</h2>
{exchanges}

<h2>Observation: the demo corpus</h2>
<p>{m['dataset']['records']} records; splits by patient group: {html.escape(json.dumps(m['dataset'].get('splits')))}.
Full card: <a href="{readme}">{readme}</a>.</p>
{card_html}

<h2>Knowledge: autoencoder step and curriculum</h2>
<p>The official recipe keeps a pretrained FLUX autoencoder frozen; none can be downloaded here, so the demo plan first
trains its own ({_fmt(ae.get('steps'))} steps, reconstruction PSNR {_fmt(ae.get('recon_psnr'), 1)} dB on train images,
latent shift {_fmt(ae.get('shift_factor'))}, scale {_fmt(ae.get('scale_factor'))}) and keeps it frozen through the
{len(plan.stages)} stages ({', '.join(f'{s.name}: {s.steps} steps' for s in plan.stages)}).</p>
{_img('train/autoencoder/reconstructions.png', 'autoencoder: images (top) and reconstructions (bottom)')}
{_img(ae_curve, 'autoencoder loss') if ae_curve else ''}
{_img('train/plots/loss.png', 'loss over the whole curriculum (stage boundaries marked)') if (out / 'train/plots/loss.png').is_file() else ''}
{''.join(_img(p, p.split('/')[-1][:-4].replace('_', ' ')) for p in stage_plots)}
"""
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>UniMedVL demo report</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; }} td, th {{ border: 1px solid #ccc; padding: 4px 8px; text-align: left; vertical-align: top; }}
th {{ background: #f0f0f0; }} figure {{ display: inline-block; margin: 0.5em; }} figcaption {{ font-size: 0.85em; color: #555; }}
.note {{ background: #fff6dd; border-left: 4px solid #e0b000; padding: 0.6em 1em; }} img {{ image-rendering: pixelated; }} figure img {{ max-width: 100%; height: auto; }}
</style></head><body>{body}</body></html>
"""
    path = out / "report.html"
    write_text(path, page)
    return path
