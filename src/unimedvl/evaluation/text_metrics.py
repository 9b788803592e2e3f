"""Text metrics for reports and counterfactual explanations (EVALUATION.md 4.4, 4.6).

BLEU-1..4 (NLTK ``corpus_bleu``, uniform n-gram weights, no smoothing), METEOR (NLTK
``meteor_score``, averaged over pairs) and ROUGE-1 / ROUGE-L F1 (Google's ``rouge-score``, with
stemming), computed on lower-cased whitespace/punctuation tokens.  METEOR runs without WordNet
synonym matching (exact and Porter-stem matches only): WordNet is a separate corpus download,
which this harness never makes; scores are therefore slightly below WordNet-enabled METEOR.
Clinical-efficacy metrics (CheXbert labels, RaTEScore) plug in through
:func:`register_report_metric` with a local model.
"""

from __future__ import annotations

import re
import warnings
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


def meteor(predictions: list[str], references: list[str]) -> float:
    from nltk.translate.meteor_score import meteor_score

    scores = [meteor_score([tokenize(r)], tokenize(p), wordnet=_NoSynonyms()) for p, r in zip(predictions, references)]
    return float(sum(scores) / len(scores)) if scores else 0.0


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
    """BLEU-1..4, METEOR, ROUGE-1, ROUGE-L and every registered metric."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not predictions:
        raise ValueError("no texts to score")
    out = {**bleu(predictions, references), "meteor": meteor(predictions, references), **rouge(predictions, references)}
    for fn in _REPORT_METRICS.values():
        out.update(fn(predictions, references))
    return out
