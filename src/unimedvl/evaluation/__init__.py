"""The evaluation harness: the paper's benchmarks and metrics, offline (EVALUATION.md).

``evaluate_vqa`` runs or scores one understanding benchmark; the metric modules
(:mod:`.answers`, :mod:`.vqa`, :mod:`.image_metrics`, :mod:`.fid`, :mod:`.text_metrics`) are
usable on their own.
"""

from __future__ import annotations

from pathlib import Path

from .benchmarks import BENCHMARKS, BenchmarkFileError, Question, load_benchmark
from .predictions import PredictionFileError, read_predictions
from .vqa import score, write_report

__all__ = ["BENCHMARKS", "BenchmarkFileError", "PredictionFileError", "Question", "evaluate_vqa", "load_benchmark",
           "read_predictions", "score", "write_report"]


def evaluate_vqa(
    benchmark: str,
    data: str | Path,
    out: str | Path,
    *,
    pipeline=None,
    predictions: str | Path | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 512,
    limit: int | None = None,
    legacy_closed: bool = False,
    judge=None,
    progress: bool = True,
) -> dict:
    """Score ``predictions`` (a JSONL file) or run ``pipeline`` on benchmark ``benchmark`` from
    its local directory ``data``; writes ``results.json``, ``scored.jsonl``, ``results.md`` and
    charts into ``out`` and returns the results.  ``limit`` keeps the first N questions.
    ``judge`` (:class:`.judge.ChatJudge`) adds judge-assisted open accuracy; its verdicts are
    cached in ``out/judgements.jsonl``."""
    if (pipeline is None) == (predictions is None):
        raise ValueError("give exactly one of a model (pipeline) or a predictions file")
    questions = load_benchmark(benchmark, data)
    if limit is not None:
        questions = questions[:limit]
    if judge is not None:
        from .judge import JudgementCache

        judge = JudgementCache(judge, Path(out) / "judgements.jsonl")
    if predictions is not None:
        results, rows = score(benchmark, questions, read_predictions(predictions), legacy_closed=legacy_closed, judge=judge)
        write_report(out, results, rows)
        return results
    from .runner import pipeline_answerer, run_benchmark

    answer = pipeline_answerer(pipeline, max_new_tokens=max_new_tokens, batch_size=batch_size)
    return run_benchmark(benchmark, questions, answer, out, batch_size=batch_size, legacy_closed=legacy_closed, judge=judge,
                         progress=progress)
