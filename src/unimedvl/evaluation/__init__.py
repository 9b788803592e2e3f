"""The evaluation harness: the paper's benchmarks and metrics, offline (EVALUATION.md).

``evaluate_vqa`` runs or scores one understanding benchmark; the metric modules
(:mod:`.answers`, :mod:`.vqa`, :mod:`.image_metrics`, :mod:`.fid`, :mod:`.text_metrics`) are
usable on their own.
"""

from .benchmarks import BENCHMARKS, BenchmarkFileError, Question, load_benchmark
from .predictions import PredictionFileError, read_predictions
from .runner import evaluate_vqa
from .vqa import score, write_report

__all__ = ["BENCHMARKS", "BenchmarkFileError", "PredictionFileError", "Question", "evaluate_vqa", "load_benchmark",
           "read_predictions", "score", "write_report"]
