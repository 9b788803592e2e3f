"""AUROC and F1 of a classifier's scores (the counterfactual check, EVALUATION.md 4.4): the user
supplies a local chest-X-ray classifier's per-image finding scores; these turn them into numbers."""

from __future__ import annotations

import numpy as np


def auroc(scores, labels) -> float:
    """Area under the ROC curve: the probability that a positive outranks a negative (ties count
    half), from the Mann-Whitney rank sum."""
    from scipy.stats import rankdata

    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels).astype(bool)
    if scores.shape != labels.shape:
        raise ValueError(f"{scores.shape} scores for {labels.shape} labels")
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if not n_pos or not n_neg:
        raise ValueError("AUROC needs both positive and negative labels")
    ranks = rankdata(scores)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def f1(scores, labels, threshold: float = 0.5) -> float:
    """F1 of ``score >= threshold`` as the positive prediction."""
    pred = np.asarray(scores, dtype=np.float64) >= threshold
    labels = np.asarray(labels).astype(bool)
    tp = int((pred & labels).sum())
    fp = int((pred & ~labels).sum())
    fn = int((~pred & labels).sum())
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)
