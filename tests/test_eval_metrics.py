"""Generation, pixel, classification and text metrics against closed forms and reference implementations."""

import json
import math

import numpy as np
import pytest

from unimedvl.evaluation.classification import auroc, f1
from unimedvl.evaluation.fid import feature_statistics, fid_from_features, frechet_distance, kernel_inception_distance
from unimedvl.evaluation.image_metrics import pixel_scores, prepare_pair, psnr, ssim
from unimedvl.evaluation.text_metrics import register_report_metric, report_metrics


def test_frechet_distance_equals_the_closed_form_for_known_gaussians():
    # diagonal covariances: |mu1 - mu2|^2 + sum (sqrt(s1) - sqrt(s2))^2
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.0])
    s1, s2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 9.0])
    expected = 1 + 0 + 4 + (1 - 2) ** 2 + (2 - 1) ** 2 + 0
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, abs=1e-9)
    # a full covariance against itself, shifted: only the mean term remains
    a = np.random.default_rng(0).normal(size=(4, 4))
    cov = a @ a.T + np.eye(4)
    assert frechet_distance(np.zeros(4), cov, np.full(4, 0.5), cov) == pytest.approx(1.0, abs=1e-6)
    # sampled features converge to the closed form
    rng = np.random.default_rng(1)
    x = rng.normal(0.0, 1.0, size=(20000, 2))
    y = rng.normal(1.0, 2.0, size=(20000, 2))
    assert fid_from_features(x, y) == pytest.approx(2 * 1 + 2 * 1, rel=0.03)
    mu, sigma = feature_statistics(x)
    assert mu.shape == (2,) and sigma.shape == (2, 2)
    with pytest.raises(ValueError, match="differ in shape"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


def test_kid_is_near_zero_for_one_distribution_and_positive_for_two():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(400, 8)), rng.normal(size=(400, 8))
    same, same_std = kernel_inception_distance(a, b, subsets=20, subset_size=200)
    shifted, _ = kernel_inception_distance(a, b + 1.0, subsets=20, subset_size=200)
    assert abs(same) < 2 * same_std  # unbiased: zero within its spread
    assert shifted > 100 * abs(same)


def test_psnr_and_ssim_match_scikit_image():
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    rng = np.random.default_rng(0)
    ref = rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)
    out = np.clip(ref.astype(int) + rng.integers(-30, 31, ref.shape), 0, 255).astype(np.uint8)
    assert psnr(out, ref) == pytest.approx(peak_signal_noise_ratio(ref, out, data_range=255), abs=1e-9)
    assert ssim(out, ref) == pytest.approx(structural_similarity(ref, out, data_range=255, channel_axis=2), abs=1e-9)
    g_ref, g_out = ref[..., 0], out[..., 0]
    assert ssim(g_out, g_ref) == pytest.approx(structural_similarity(g_ref, g_out, data_range=255), abs=1e-9)
    assert psnr(ref, ref) == math.inf and ssim(ref, ref) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="shapes differ"):
        psnr(out[:10], ref)


def test_task_conventions_resize_to_the_reference_and_pick_channels():
    rng = np.random.default_rng(1)
    ref = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    small = ref[::2, ::2]  # a generated image at half the reference size
    out, r = prepare_pair(small, ref, "gray")
    assert out.shape == r.shape == (64, 64)
    out, r = prepare_pair(small, ref, "rgb")
    assert out.shape == r.shape == (64, 64, 3)
    scores = pixel_scores(ref, ref, "staining")
    assert scores["psnr"] == math.inf and scores["ssim"] == pytest.approx(1.0)
    assert pixel_scores(small, ref, "sr4x")["psnr"] < 40
    with pytest.raises(ValueError, match="unknown task"):
        pixel_scores(ref, ref, "denoise")


def test_auroc_and_f1_by_hand():
    scores, labels = [0.9, 0.8, 0.4, 0.3, 0.8], [1, 0, 1, 0, 1]
    # positives 0.9, 0.4, 0.8 vs negatives 0.8, 0.3: pairs won 2 + 1 + (0.5 + 1) = 4.5 of 6
    assert auroc(scores, labels) == pytest.approx(4.5 / 6)
    # threshold 0.5: predicted positive {0.9, 0.8, 0.8} -> tp 2, fp 1, fn 1
    assert f1(scores, labels) == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    with pytest.raises(ValueError, match="both positive and negative"):
        auroc([0.1, 0.2], [1, 1])


def test_report_metrics_by_hand_and_a_registered_clinical_metric():
    same = report_metrics(["no acute cardiopulmonary process."], ["No acute cardiopulmonary process"])
    assert same["bleu1"] == pytest.approx(1.0) and same["bleu4"] == pytest.approx(1.0)
    assert same["rouge1"] == pytest.approx(1.0) and same["rougeL"] == pytest.approx(1.0) and same["meteor_nltk"] > 0.9
    short = report_metrics(["the heart is normal"], ["the heart size is normal and the lungs are clear"])
    # BLEU-1: all 4 words match (precision 1), brevity penalty exp(1 - 10/4); no 3-gram in common: BLEU-3 = 0
    assert short["bleu1"] == pytest.approx(math.exp(1 - 10 / 4)) and short["bleu3"] < 1e-50  # NLTK returns a tiny positive number for 0
    # ROUGE-1: P = 4/4, R = 4/10
    assert short["rouge1"] == pytest.approx(2 * 1 * (4 / 10) / (1 + 4 / 10))
    register_report_metric("length_ratio", lambda p, r: {"length_ratio": sum(map(len, p)) / sum(map(len, r))})
    assert "length_ratio" in report_metrics(["a b"], ["a b"])
    with pytest.raises(ValueError, match="1 predictions for 2 references"):
        report_metrics(["a"], ["a", "b"])


def test_pixel_and_report_commands_write_results_beside_the_paper(tmp_path):
    import json

    from PIL import Image
    from typer.testing import CliRunner

    from unimedvl.cli import app

    rng = np.random.default_rng(3)
    (tmp_path / "gen").mkdir()
    (tmp_path / "ref").mkdir()
    refs = {}
    for name in ("a.png", "b.png", "c.png"):
        refs[name] = rng.integers(0, 256, (32, 32), dtype=np.uint8)
        Image.fromarray(refs[name]).save(tmp_path / "ref" / name)
    noisy = np.clip(refs["a.png"].astype(int) + 20, 0, 255).astype(np.uint8)
    Image.fromarray(noisy).save(tmp_path / "gen" / "a.png")
    Image.fromarray(refs["b.png"]).resize((16, 16)).save(tmp_path / "gen" / "b.png")  # generated smaller: resized up
    result = CliRunner().invoke(app, ["eval", "pixels", "--generated", str(tmp_path / "gen"), "--reference", str(tmp_path / "ref"),
                                      "--task", "sr4x", "--out", str(tmp_path / "px")])
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "px" / "results.json").read_text())
    expected_a = pixel_scores(noisy, refs["a.png"], "sr4x")["psnr"]
    resized_b = np.asarray(Image.fromarray(refs["b.png"]).resize((16, 16)).resize((32, 32), Image.BICUBIC))
    expected_b = psnr(resized_b, refs["b.png"])
    assert saved["n"] == 2 and saved["missing"] == 1 and saved["missing_names"] == ["c.png"]
    assert saved["psnr"] == pytest.approx((expected_a + expected_b) / 2)
    assert "| UniMedVL (paper) | 27.29 | 0.890 |" in (tmp_path / "px" / "results.md").read_text()

    preds = tmp_path / "reports.jsonl"
    preds.write_text(json.dumps({"id": 1, "prediction": "no acute process", "reference": "No acute process."}) + "\n")
    result = CliRunner().invoke(app, ["eval", "reports", "--predictions", str(preds), "--out", str(tmp_path / "rep")])
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "rep" / "results.json").read_text())
    assert saved["n"] == 1 and saved["rougeL"] == pytest.approx(1.0)
    assert "UniMedVL (paper Table 20) | 0.2193" in (tmp_path / "rep" / "results.md").read_text()
    preds.write_text('{"id": 1, "prediction": "x"}\n')
    bad = CliRunner().invoke(app, ["eval", "reports", "--predictions", str(preds), "--out", str(tmp_path / "rep2")])
    assert bad.exit_code == 2 and "reports.jsonl, line 1: expected an object with string 'prediction' and 'reference'" in bad.output


def test_counterfactual_check_and_explanations_beside_table_7(tmp_path):
    from unimedvl.evaluation.classification import auroc, f1
    from unimedvl.evaluation.counterfactual import evaluate_counterfactual
    from unimedvl.formats.tables import TableError

    rows = [("a", "effusion", 0.9, 1), ("b", "effusion", 0.4, 1), ("c", "effusion", 0.3, 0), ("d", "effusion", 0.6, 0),
            ("a", "edema", 0.8, 1), ("b", "edema", 0.2, 0), ("c", "edema", 0.7, 1),
            ("a", "pneumothorax", 0.1, 0), ("b", "pneumothorax", 0.3, 0)]  # one class only: left out of the means
    scores = tmp_path / "scores.csv"
    scores.write_text("id,finding,score,label\n" + "".join(f"{i},{f},{s},{lab}\n" for i, f, s, lab in rows))
    expl = tmp_path / "expl.jsonl"
    expl.write_text(json.dumps({"id": "a", "prediction": "new right pleural effusion", "reference": "new right pleural effusion"}) + "\n")
    res = evaluate_counterfactual(tmp_path / "out", scores=scores, explanations=expl)
    check = res["check"]
    eff = check["per_finding"]["effusion"]
    assert eff["auroc"] == pytest.approx(0.75) and eff["f1"] == pytest.approx(0.5)  # pairs: 3 of 4 ranked right; tp 1, fp 1, fn 1
    assert check["per_finding"]["edema"]["auroc"] == 1.0 and check["per_finding"]["pneumothorax"]["auroc"] is None
    assert check["auroc"] == pytest.approx((0.75 + 1.0) / 2) and check["f1"] == pytest.approx((0.5 + 1.0) / 2)
    assert check["findings_without_both_classes"] == ["pneumothorax"]
    assert check["auroc_micro"] == pytest.approx(auroc([r[2] for r in rows], [r[3] for r in rows]))
    assert check["f1_micro"] == pytest.approx(f1([r[2] for r in rows], [r[3] for r in rows]))
    assert res["text"]["bleu3"] == pytest.approx(1.0) and res["text"]["rougeL"] == pytest.approx(1.0)
    md = (tmp_path / "out" / "results.md").read_text()
    assert "0.8750" in md and "UniMedVL† (paper Table 7)" in md and "27.17" in md and "pneumothorax" in md
    scores.write_text("id,finding,score,label\na,edema,high,1\n")
    with pytest.raises(TableError, match=r"scores.csv, line 2: score 'high' is not a number"):
        evaluate_counterfactual(tmp_path / "out", scores=scores)
    scores.write_text("id,finding,score,label\na,edema,0.2,yes\n")
    with pytest.raises(TableError, match=r"scores.csv, line 2: label 'yes' is not 0/1"):
        evaluate_counterfactual(tmp_path / "out", scores=scores)
