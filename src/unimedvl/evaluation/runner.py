"""Run a model over a benchmark, resumably, then score it.

Prompts follow EVALUATION.md 3.4-3.5: the question's image through the ViT, then the question
text (multiple choice: the VLMEvalKit prompt), no system prompt, greedy decoding.  Questions
are answered in batches; every answer is appended to ``OUT/predictions.jsonl`` as soon as it
exists, and a rerun skips the ids already there - an interrupted run loses at most the batch in
flight.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

from .answers import mcq_prompt
from .benchmarks import Question, load_benchmark
from .predictions import PredictionLog, read_predictions
from .vqa import score, write_report


def prompt_for(q: Question) -> str:
    return mcq_prompt(q.question, q.options, q.hint) if q.kind == "mcq" else q.question


def pipeline_answerer(pipeline, *, max_new_tokens: int = 512, batch_size: int = 8) -> Callable[[Sequence[tuple[list, str]]], list[str]]:
    """``[(images, prompt), ...] -> [reply, ...]`` with a :class:`UniMedVLPipeline`, greedy."""

    def answer(items):
        return [a.text for a in pipeline.ask_batch(list(items), max_new_tokens=max_new_tokens, batch_size=batch_size)]

    return answer


def run_benchmark(
    benchmark: str,
    questions: list[Question],
    answer: Callable[[Sequence[tuple[list, str]]], list[str]],
    out: str | Path,
    *,
    batch_size: int = 8,
    legacy_closed: bool = False,
    judge=None,
    progress: bool = True,
) -> dict:
    """Answer every question not yet in ``OUT/predictions.jsonl``, then score all of them and
    write the report.  Returns the results."""
    from tqdm import tqdm

    out = Path(out)
    with PredictionLog(out / "predictions.jsonl") as log:
        todo = [q for q in questions if q.id not in log.done]
        bar = tqdm(total=len(questions), initial=len(questions) - len(todo), desc=benchmark, unit="q", disable=not progress)
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            items = [([q.image()] if q.image is not None else [], prompt_for(q)) for q in chunk]
            for q, reply in zip(chunk, answer(items)):
                log.append(q.id, reply)
            bar.update(len(chunk))
        bar.close()
        predictions = dict(log.done)
    results, rows = score(benchmark, questions, predictions, legacy_closed=legacy_closed, judge=judge)
    write_report(out, results, rows)
    return results


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
    answer = pipeline_answerer(pipeline, max_new_tokens=max_new_tokens, batch_size=batch_size)
    return run_benchmark(benchmark, questions, answer, out, batch_size=batch_size, legacy_closed=legacy_closed, judge=judge,
                         progress=progress)
