"""Scoring understanding benchmarks: per-question verdicts, the results table, the report files.

:func:`score` judges every question of a benchmark against a ``{id: prediction}`` mapping.  A
question without a prediction counts as wrong and is listed.  ``results`` (all numbers in
percent) holds:

* ``accuracy`` - correct / all questions (the paper's Table 1 number, EVALUATION.md 3.1, strict);
* ``closed_accuracy`` / ``open_accuracy`` - the same over closed and open questions
  (``open_accuracy_judge`` stays ``null`` unless a local judge scored the open answers);
* ``open_accuracy_normalized`` / ``accuracy_normalized`` - open answers judged by
  :func:`.answers.normalized_match` instead of exact match (articles, punctuation, number words,
  list order, laterality and modality synonyms); yes/no questions keep their whole-word rule;
* ``open_recall`` - LLaVA-Med token recall over open questions, ``llava_closed_accuracy`` its
  closed rule and ``aligned`` their mean (Table 17); ``legacy_closed_quirk`` says whether the
  old script's denominator quirk was applied;
* ``yes_no_rule_disagreements`` - yes/no verdicts where the substring rule of peer harnesses
  would differ from ours;
* ``breakdowns`` - accuracy per question kind and per category (modality, question type, GMAI
  clinical task, ...), and for multiple choice ``macro_accuracy`` over modalities and
  ``unparsed`` (replies naming no single option).

:func:`write_report` writes ``results.json``, ``scored.jsonl``, ``results.md`` (this run beside
the paper's rows) and a bar chart per breakdown, atomically.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..formats.atomic import write_json, write_text
from . import answers
from .benchmarks import MCQ_BENCHMARKS, Question
from .paper import ALIGNED, UNDERSTANDING


def _pct(hits: list[float]) -> float | None:
    return round(100.0 * sum(hits) / len(hits), 4) if hits else None


def judge_question(q: Question, prediction: str | None, legacy_closed: bool = False) -> dict:
    """The verdicts of one question."""
    row = {"id": q.id, "kind": q.kind, "question": q.question, "answer": q.answer, "prediction": prediction,
           "missing": prediction is None, **({"categories": q.categories} if q.categories else {})}
    text = prediction or ""
    if q.kind == "mcq":
        choice = answers.extract_choice(text, q.options) if prediction is not None else None
        row.update(choice=choice, correct=choice == q.answer)
        return row
    if q.kind == "closed" and answers.is_yes_no(q.answer):
        row["correct"] = answers.yes_no_verdict(text, q.answer) if prediction is not None else False
        row["substring_rule_correct"] = answers.yes_no_substring_verdict(text, q.answer) if prediction is not None else False
    else:
        row["correct"] = answers.exact_match(text, q.answer) if prediction is not None else False
    row["normalized_correct"] = row["correct"]
    if q.kind == "open" and prediction is not None:
        row["normalized_correct"] = answers.normalized_match(text, q.answer)
    if q.kind == "closed":
        row["llava_closed"] = answers.llava_closed_verdict(text, q.answer, legacy_closed) if prediction is not None else False
    else:
        row["recall"] = answers.open_recall(text, q.answer) if prediction is not None else 0.0
    return row


def score(benchmark: str, questions: list[Question], predictions: dict[str, str], *, legacy_closed: bool = False,
          judge=None) -> tuple[dict, list[dict]]:
    """(results, scored rows) of ``predictions`` on ``questions``.  ``judge`` (:mod:`.judge`) adds
    the judge-assisted open accuracy: strictly-wrong open answers are sent to it."""
    known = {q.id for q in questions}
    unknown = sorted(set(predictions) - known)
    if unknown:
        raise ValueError(f"{len(unknown)} prediction id(s) are not questions of {benchmark} (first: {unknown[:5]}); "
                         "ids are the benchmark's own question ids, or 0-based row indices where it has none")
    rows = [judge_question(q, predictions.get(q.id), legacy_closed) for q in questions]
    if judge is not None:
        _judge_open_answers(judge, questions, rows)
    correct = [float(r["correct"]) for r in rows]
    closed = [r for r in rows if r["kind"] == "closed"]
    open_ = [r for r in rows if r["kind"] == "open"]
    missing = [r["id"] for r in rows if r["missing"]]
    results: dict = {
        "benchmark": benchmark, "n": len(rows), "answered": len(rows) - len(missing), "missing": len(missing),
        "missing_ids": missing[:100], "accuracy": _pct(correct),
        "closed_accuracy": _pct([float(r["correct"]) for r in closed]), "open_accuracy": _pct([float(r["correct"]) for r in open_]),
        "open_accuracy_normalized": _pct([float(r["normalized_correct"]) for r in open_]),
        "accuracy_normalized": _pct([float(r.get("normalized_correct", r["correct"])) for r in rows]),
        "open_accuracy_judge": None, "open_recall": _pct([r["recall"] for r in open_]),
        "n_closed": len(closed), "n_open": len(open_),
    }
    if judge is not None:
        results["judge_model"] = judge.name
        results["open_accuracy_judge"] = _pct([float(r["judge_correct"]) for r in open_])
        results["accuracy_judge"] = _pct([float(r["judge_correct"] if r["kind"] == "open" else r["correct"]) for r in rows])
        results["judge_failures"] = sum(1 for r in open_ if r.get("judge_failed"))
    if benchmark not in MCQ_BENCHMARKS:
        scored_closed = [r["llava_closed"] for r in closed if r["llava_closed"] is not None]
        results["llava_closed_accuracy"] = _pct([float(v) for v in scored_closed])
        results["legacy_closed_quirk"] = legacy_closed
        parts = [v for v in (results["llava_closed_accuracy"], results["open_recall"]) if v is not None]
        results["aligned"] = round(sum(parts) / len(parts), 4) if parts else None
        results["yes_no_rule_disagreements"] = sum(1 for r in closed if "substring_rule_correct" in r and r["substring_rule_correct"] != r["correct"])
    else:
        results["unparsed"] = sum(1 for r in rows if not r["missing"] and r["choice"] is None)
    breakdowns: dict[str, dict[str, dict]] = {"kind": {}}
    for r in rows:
        groups = {"kind": r["kind"], **r.get("categories", {})}
        for name, value in groups.items():
            breakdowns.setdefault(name, {}).setdefault(str(value), []).append(float(r["correct"]))
    results["breakdowns"] = {name: {value: {"n": len(hits), "accuracy": _pct(hits)} for value, hits in sorted(groups.items())}
                             for name, groups in breakdowns.items()}
    if "modality" in results["breakdowns"] and benchmark in MCQ_BENCHMARKS:
        per = [v["accuracy"] for v in results["breakdowns"]["modality"].values()]
        results["macro_accuracy"] = round(sum(per) / len(per), 4)
    return results, rows


def _judge_open_answers(judge, questions: list[Question], rows: list[dict]) -> None:
    from tqdm.auto import tqdm

    by_id = {q.id: q for q in questions}
    ask = [r for r in rows if r["kind"] == "open" and not r["missing"] and not r["correct"]]
    for r in rows:
        if r["kind"] == "open":
            r["judge_correct"] = bool(r["correct"])
    for r in tqdm(ask, desc=f"judge ({judge.name})", unit="q", disable=len(ask) < 20):
        verdict = judge(by_id[r["id"]].question, r["answer"], r["prediction"])
        r["judge_correct"] = bool(verdict)
        r["judge_failed"] = verdict is None


def markdown_table(results: dict) -> str:
    """This run beside the paper's rows for the same benchmark."""
    b = results["benchmark"]

    def cell(v):
        return "–" if v is None else f"{v:.2f}"

    lines = [f"# {b}: {results['n']} questions ({results['missing']} without a prediction, counted wrong)", "",
             "| | accuracy | closed | open (strict) | open (normalised) | open recall | aligned |", "|---|---|---|---|---|---|---|",
             f"| **this run** | {cell(results['accuracy'])} | {cell(results['closed_accuracy'])} | {cell(results['open_accuracy'])} | "
             f"{cell(results.get('open_accuracy_normalized'))} | {cell(results['open_recall'])} | {cell(results.get('aligned'))} |"]
    for model, row in UNDERSTANDING.items():
        if b in row:
            aligned = ALIGNED.get(model, {}).get(b)
            lines.append(f"| {model} (paper Table 1) | {cell(row[b])} | – | – | – | – | {cell(aligned)} |")
    if results.get("judge_model"):
        lines.append(f"| **this run, judge {results['judge_model']}** | {cell(results['accuracy_judge'])} | "
                     f"{cell(results['closed_accuracy'])} | {cell(results['open_accuracy_judge'])} (judge) | – | – | – |")
    lines.append("")
    lines.append("Paper accuracy is over all test questions with open answers judged by the authors' (unpublished) rule; "
                 "this run's strict column judges open answers by exact match, which undercounts paraphrases; the normalised "
                 "column forgives case, articles, punctuation, number words, list order and laterality/modality synonyms "
                 f"(all questions: {cell(results.get('accuracy_normalized'))})"
                 + (f"; the judge row asks {results['judge_model']} about strictly-wrong open answers "
                    f"({results['judge_failures']} without a verdict, counted wrong)." if results.get("judge_model") else "."))
    return "\n".join(lines) + "\n"


def write_report(out: str | Path, results: dict, rows: list[dict]) -> dict[str, Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = {"results": out / "results.json", "scored": out / "scored.jsonl", "markdown": out / "results.md"}
    write_json(written["results"], results)
    write_text(written["scored"], "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    write_text(written["markdown"], markdown_table(results))
    from ..formats.charts import bar_chart, save_chart

    for name, groups in results["breakdowns"].items():
        if len(groups) < 2:
            continue
        chart = bar_chart({k: v["accuracy"] for k, v in groups.items()}, f"{results['benchmark']}: accuracy (%) by {name}",
                          value_format="{:.1f}")
        written[f"chart_{name}"] = save_chart(chart, out / f"accuracy_by_{name}.png")
    return written
