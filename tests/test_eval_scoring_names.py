"""Scores carry the name of what they compute.

* METEOR: ``meteor`` is METEOR 1.5 (the literature's, pycocoevalcap's jar) and exists only where
  that can run locally; NLTK's METEOR is ``meteor_nltk`` and never sits beside a paper's METEOR.
* BLEU and ROUGE are pinned to independent implementations on fixed reports.
* Open VQA answers get a normalised score beside the strict one, without over-matching.
"""

import json
import math

import pytest

from unimedvl.evaluation import text_metrics
from unimedvl.evaluation.answers import exact_match, normalized_match
from unimedvl.evaluation.benchmarks import Question
from unimedvl.evaluation.text_metrics import report_metrics, tokenize
from unimedvl.evaluation.vqa import markdown_table, score

# (reference, hypothesis): five fixed chest X-ray report pairs
PAIRS = [
    ("The heart size is normal. The lungs are clear. No pleural effusion or pneumothorax.",
     "Heart size is normal and the lungs are clear without effusion."),
    ("There is a small left pleural effusion with adjacent atelectasis. No pneumothorax.",
     "Small left pleural effusion and left basilar atelectasis are noted. There is no pneumothorax."),
    ("Mild cardiomegaly. Pulmonary vascular congestion with mild interstitial edema.",
     "The heart is mildly enlarged with pulmonary vascular congestion and mild edema."),
    ("Right lower lobe opacity concerning for pneumonia. No acute osseous abnormality.",
     "Opacity in the right lower lobe may represent pneumonia in the appropriate clinical setting."),
    ("Endotracheal tube terminates 4 cm above the carina. Stable bilateral opacities.",
     "The endotracheal tube tip is 4 cm above the carina and bilateral opacities are unchanged."),
]
REFS = [r for r, _ in PAIRS]
HYPS = [h for _, h in PAIRS]

# Numbers of independent implementations on PAIRS (inputs: our lower-cased tokens joined by spaces):
# pycocoevalcap 1.2 Bleu(4).compute_score and sacrebleu 2.6.0 corpus_bleu(tokenize="none") / 100.
COCO_BLEU = [0.5757575757488521, 0.4452096409949812, 0.33893097398016664, 0.24856123711996794]
SACREBLEU_BLEU4 = 0.24856123712425628
# rouge-score 0.1.2 RougeScorer(["rouge1", "rougeL"], use_stemmer=True) on the raw texts, F1 averaged over pairs
ROUGE_SCORE = {"rouge1": 0.6152087912087912, "rougeL": 0.5493919413919414}
# METEOR 1.5 (pycocoevalcap 1.2 jar, OpenJDK 17) and NLTK METEOR without WordNet, on PAIRS
METEOR_15, METEOR_NLTK = 0.33534625365938103, 0.5984620127109748


@pytest.fixture
def no_meteor15(monkeypatch):
    monkeypatch.setattr(text_metrics, "meteor15_unavailable", lambda: "no java executable on the PATH")


def test_bleu_is_pinned_to_pycocoevalcap_and_sacrebleu(no_meteor15):
    ours = report_metrics(HYPS, REFS)
    # pycocoevalcap adds 1e-9/1e-15 guards to its counts: agreement to 1e-9 absolute
    for n, coco in enumerate(COCO_BLEU, start=1):
        assert ours[f"bleu{n}"] == pytest.approx(coco, abs=1e-9), n
    assert ours["bleu4"] == pytest.approx(SACREBLEU_BLEU4, abs=1e-12)  # same formula, no guards: float rounding only


def test_rouge_is_pinned_to_rouge_score_on_raw_text(no_meteor15):
    from rouge_score import rouge_scorer

    ours = report_metrics(HYPS, REFS)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)
    for key, pinned in ROUGE_SCORE.items():
        live = sum(scorer.score(r, h)[key].fmeasure for r, h in PAIRS) / len(PAIRS)
        assert ours[key] == pytest.approx(live, abs=1e-12) and ours[key] == pytest.approx(pinned, abs=1e-12)


def test_live_independent_implementations_when_installed():
    bleu_mod = pytest.importorskip("pycocoevalcap.bleu.bleu")
    sacrebleu = pytest.importorskip("sacrebleu")
    refs = {i: [" ".join(tokenize(r))] for i, r in enumerate(REFS)}
    hyps = {i: [" ".join(tokenize(h))] for i, h in enumerate(HYPS)}
    coco, _ = bleu_mod.Bleu(4).compute_score(refs, hyps, verbose=0)
    assert coco == pytest.approx(COCO_BLEU, abs=1e-12)
    sacre = sacrebleu.corpus_bleu([hyps[i][0] for i in range(len(PAIRS))], [[refs[i][0] for i in range(len(PAIRS))]], tokenize="none")
    assert sacre.score / 100 == pytest.approx(SACREBLEU_BLEU4, abs=1e-12)


def test_without_meteor15_only_meteor_nltk_is_reported_and_kept_off_the_paper_table(no_meteor15, tmp_path):
    from unimedvl.evaluation.counterfactual import evaluate_counterfactual
    from unimedvl.evaluation.tasks import evaluate_reports

    ours = report_metrics(HYPS, REFS)
    assert "meteor" not in ours and ours["meteor_nltk"] == pytest.approx(METEOR_NLTK, abs=1e-9)
    pairs = tmp_path / "reports.jsonl"
    pairs.write_text("".join(json.dumps({"id": i, "prediction": h, "reference": r}) + "\n" for i, (r, h) in enumerate(PAIRS)))
    results = evaluate_reports(pairs, tmp_path / "rep")
    assert "meteor" not in results and results["meteor_implementation"] is None
    md = (tmp_path / "rep" / "results.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("|")]
    assert table[0] == "| | METEOR 1.5 | bleu4 | rouge1 | rougeL |"
    assert table[2].startswith("| **this run** | – | 0.2486 |") and "| UniMedVL (paper Table 20) | 0.2193 |" in md
    nltk_value = f"{METEOR_NLTK:.4f}"
    assert not any(nltk_value in line for line in table) and f"meteor_nltk = {nltk_value}" in md and "not comparable" in md
    res = evaluate_counterfactual(tmp_path / "cf", explanations=pairs)
    assert "meteor" not in res["text"]
    cf = (tmp_path / "cf" / "results.md").read_text()
    assert "METEOR 1.5 ↑" in cf and not any(nltk_value in line for line in cf.splitlines() if line.startswith("|"))


def test_meteor15_is_never_fetched_and_says_why_it_is_missing(monkeypatch):
    import shutil

    monkeypatch.setattr(shutil, "which", lambda name: None)
    why = text_metrics.meteor15_unavailable()
    assert why in ("pycocoevalcap is not installed", "no java executable on the PATH") or why.startswith("pycocoevalcap has no")
    with pytest.raises(RuntimeError, match="METEOR 1.5 is not available"):
        text_metrics.meteor15(HYPS, REFS)


@pytest.mark.skipif(text_metrics.meteor15_unavailable() is not None, reason="METEOR 1.5 (pycocoevalcap jar + java) not available here")
def test_meteor15_is_the_literature_number_and_far_below_nltk(tmp_path):
    ours = report_metrics(HYPS, REFS)
    assert ours["meteor"] == pytest.approx(METEOR_15, abs=1e-4)
    assert ours["meteor_nltk"] > ours["meteor"] * 1.5
    from unimedvl.evaluation.tasks import evaluate_reports

    pairs = tmp_path / "reports.jsonl"
    pairs.write_text("".join(json.dumps({"id": i, "prediction": h, "reference": r}) + "\n" for i, (r, h) in enumerate(PAIRS)))
    evaluate_reports(pairs, tmp_path / "rep")
    assert f"| **this run** | {METEOR_15:.4f} |" in (tmp_path / "rep" / "results.md").read_text()


# ---- open answers ----------------------------------------------------------------------------------
MATCHES = [("The brain.", "Brain"), ("Two", "2"), ("Right lung, left lung", "Left Lung, Right Lung"),
           ("CT", "computed tomography"), ("MR", "Magnetic resonance imaging"), ("chest x-ray", "Chest radiograph"),
           ("DX", "X-ray"), ("US", "sonography"), ("ultrasound", "Ultrasonography"), ("PET", "positron emission tomography"),
           ("lt lung", "left lung"), ("rt kidney", "Right kidney"), ("both lungs", "bilateral lungs"),
           ("liver and spleen", "spleen, liver"), ("twenty", "20"), ("Answer: zero", "0")]
MISMATCHES = [("left lung", "right lung"), ("2", "20"), ("one", "11"), ("liver", "liver, spleen"), ("liver, liver", "liver"),
              ("CT", "MRI"), ("left", "bilateral"), ("x-ray", "ultrasound"), ("", "brain"), ("brain", "")]


@pytest.mark.parametrize("prediction,answer", MATCHES)
def test_normalised_match_accepts_equivalent_answers(prediction, answer):
    assert not exact_match(prediction, answer) and normalized_match(prediction, answer)


@pytest.mark.parametrize("prediction,answer", MISMATCHES)
def test_normalised_match_does_not_over_match(prediction, answer):
    assert not normalized_match(prediction, answer)


def test_results_report_strict_and_normalised_open_accuracy_side_by_side(tmp_path):
    from unimedvl.evaluation.vqa import write_report

    qs = [Question(str(i), "q?", a, "open") for i, (_, a) in enumerate(MATCHES[:3] + MISMATCHES[:2])]
    qs += [Question("c1", "Is it normal?", "No", "closed"), Question("c2", "Is there effusion?", "Yes", "closed")]
    preds = {str(i): p for i, (p, _) in enumerate(MATCHES[:3] + MISMATCHES[:2])}
    preds.update({"c1": "It looks normal.", "c2": "Yes."})  # the whole-word yes/no rule stays: "normal" holds no "no"
    results, rows = score("vqa-rad", qs, preds)
    assert results["open_accuracy"] == 0.0 and results["open_accuracy_normalized"] == 60.0
    assert results["closed_accuracy"] == 50.0
    assert results["accuracy"] == pytest.approx(100 / 7, abs=1e-3) and results["accuracy_normalized"] == pytest.approx(400 / 7, abs=1e-3)
    write_report(tmp_path, results, rows)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["open_accuracy"] == 0.0 and saved["open_accuracy_normalized"] == 60.0
    md = markdown_table(results)
    assert "| open (strict) | open (normalised) |" in md and "| 0.00 | 60.00 |" in md
    assert math.isclose(sum(r["normalized_correct"] for r in rows), 4)
