"""Text metrics for reports and counterfactual explanations (EVALUATION.md 4.4, 4.6).

BLEU-1..4 (NLTK ``corpus_bleu``, uniform n-gram weights, no smoothing) and ROUGE-1 / ROUGE-L F1
(Google's ``rouge-score``, with stemming), computed on lower-cased whitespace/punctuation tokens.
A test pins both to independent implementations (pycocoevalcap's ``Bleu``, sacrebleu, rouge-score
on raw text) on fixed reports.

METEOR comes in two flavours that are **not comparable** and never share a name:

* ``meteor`` - METEOR 1.5 (exact, stem, synonym and paraphrase modules, the parameters of the
  literature), run by pycocoevalcap's ``Meteor`` wrapper around its bundled ``meteor-1.5.jar``.  It
  is computed only when that package, its jar and paraphrase table, and a ``java`` executable
  are all present locally: nothing is ever downloaded.  This is the number the papers report
  (e.g. the 0.2193 of the paper's Table 20);
* ``meteor_nltk`` - NLTK's ``meteor_score`` without WordNet (exact and Porter-stem matches only,
  averaged over pairs), always computed.  It scores far higher than METEOR 1.5 on the same texts
  (0.49 against 0.29 on 20 MIMIC-style reports), so report tables never print it beside a
  paper's METEOR.

Clinical-efficacy metrics (CheXbert labels, RaTEScore) plug in through
:func:`register_report_metric` with a local model.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import warnings
from pathlib import Path
from typing import Callable

_REPORT_METRICS: dict[str, Callable[[list[str], list[str]], dict[str, float]]] = {}


def register_report_metric(name: str, fn: Callable[[list[str], list[str]], dict[str, float]]) -> None:
    """Add a metric ``fn(predictions, references) -> {name: value}`` to :func:`report_metrics`."""
    _REPORT_METRICS[name] = fn


def tokenize(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+(?:'[a-z]+)?", (text or "").lower())


class _NoSynonyms:
    """Stands in for WordNet: no synonym sets, so METEOR matches exact words and stems only."""

    def synsets(self, *args, **kwargs):
        return []


def bleu(predictions: list[str], references: list[str]) -> dict[str, float]:
    from nltk.translate.bleu_score import corpus_bleu

    hyps = [tokenize(p) for p in predictions]
    refs = [[tokenize(r)] for r in references]
    out = {}
    with warnings.catch_warnings():  # NLTK warns whenever an n-gram order has no overlap; that is a 0, not an error
        warnings.simplefilter("ignore", UserWarning)
        for n in range(1, 5):
            out[f"bleu{n}"] = float(corpus_bleu(refs, hyps, weights=tuple([1.0 / n] * n)))
    return out


def meteor_nltk(predictions: list[str], references: list[str]) -> float:
    """NLTK METEOR (exact + stem matches, no WordNet), mean over pairs.  Not METEOR 1.5."""
    from nltk.translate.meteor_score import meteor_score

    scores = [meteor_score([tokenize(r)], tokenize(p), wordnet=_NoSynonyms()) for p, r in zip(predictions, references)]
    return float(sum(scores) / len(scores)) if scores else 0.0


def meteor15_unavailable() -> str | None:
    """Why METEOR 1.5 cannot run here (``None`` when it can): pycocoevalcap with its bundled
    ``meteor-1.5.jar`` and paraphrase table, and ``java`` on the PATH, all local."""
    spec = importlib.util.find_spec("pycocoevalcap")
    if spec is None or not spec.submodule_search_locations:
        return "pycocoevalcap is not installed"
    folder = Path(list(spec.submodule_search_locations)[0]) / "meteor"
    for needed in ("meteor-1.5.jar", "data/paraphrase-en.gz"):
        if not (folder / needed).is_file():
            return f"pycocoevalcap has no {needed} (it is never downloaded)"
    if shutil.which("java") is None:
        return "no java executable on the PATH"
    return None


def meteor15(predictions: list[str], references: list[str]) -> float:
    """METEOR 1.5 (the literature's METEOR) through pycocoevalcap's jar: its corpus-level score over
    the pairs, on our lower-cased tokens.  Raises ``RuntimeError`` when it cannot run here."""
    why = meteor15_unavailable()
    if why:
        raise RuntimeError(f"METEOR 1.5 is not available: {why}")
    from pycocoevalcap.meteor.meteor import Meteor

    # the jar reads one line per segment: no newlines or '|||' may survive, and an empty side breaks its protocol
    refs = {i: [" ".join(tokenize(r)) or "."] for i, r in enumerate(references)}
    hyps = {i: [" ".join(tokenize(p)) or "."] for i, p in enumerate(predictions)}
    scorer = Meteor()
    try:
        score, _ = scorer.compute_score(refs, hyps)
    finally:
        del scorer  # stops the java process
    return float(score)


def rouge(predictions: list[str], references: list[str]) -> dict[str, float]:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)
    totals = {"rouge1": 0.0, "rougeL": 0.0}
    for p, r in zip(predictions, references):
        s = scorer.score(r, p)
        for key in totals:
            totals[key] += s[key].fmeasure
    n = max(len(predictions), 1)
    return {k: v / n for k, v in totals.items()}


def report_metrics(predictions: list[str], references: list[str]) -> dict[str, float]:
    """BLEU-1..4, ``meteor`` (METEOR 1.5, only where it can run locally), ``meteor_nltk``, ROUGE-1,
    ROUGE-L and every registered metric."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not predictions:
        raise ValueError("no texts to score")
    out = {**bleu(predictions, references), "meteor_nltk": meteor_nltk(predictions, references), **rouge(predictions, references)}
    if meteor15_unavailable() is None:
        out["meteor"] = meteor15(predictions, references)
    for fn in _REPORT_METRICS.values():
        out.update(fn(predictions, references))
    return out
