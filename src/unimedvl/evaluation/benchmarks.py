"""Loaders for the understanding benchmarks, from their distributed files (EVALUATION.md 2).

Each loader turns a local directory into a list of :class:`Question` (the test split only):

* ``vqa-rad``: the original JSON (``VQA_RAD Dataset Public.json``-style list with ``qid``,
  ``image_name``, ``question``, ``answer``, ``answer_type``; test questions are those whose
  ``phrase_type`` starts with "test" when that field is present) plus its image folder, or the
  Hugging Face parquet (``test-*.parquet`` with ``image``, ``question``, ``answer``);
* ``slake``: ``test.json`` (``qid``, ``img_name``, ``question``, ``answer``, ``q_lang``,
  ``answer_type``, ``content_type``, ``modality``) with images under ``imgs/``; English only;
* ``pathvqa``: the Hugging Face parquet (``test-*.parquet``) or VLMEvalKit's ``PathVQA_TEST.tsv``
  (base64 images);
* ``omnimedvqa``: ``QA_information/Open-access/*.json`` (and ``Restricted-access`` when its images
  are present) with images relative to the benchmark root;
* ``gmai-mmbench``: VLMEvalKit TSVs (``GMAI-MMBench_VAL.tsv``, or the ``GMAI-MMBench_TEST*`` parts).

A question's ``id`` is the benchmark's own id, or the 0-based row index in the test file where it
has none.  Yes/no questions are *closed*; VQA-RAD and SLAKE also mark questions CLOSED with
other answers ("left", "CT"), which are closed too and judged by exact match.  Malformed files
raise :class:`BenchmarkFileError` naming the file and the line (or row).
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..formats.tables import TableError, read_rows, require
from .answers import is_yes_no

BENCHMARKS = ("vqa-rad", "slake", "pathvqa", "omnimedvqa", "gmai-mmbench")
MCQ_BENCHMARKS = ("omnimedvqa", "gmai-mmbench")


BenchmarkFileError = TableError  # "FILE, line N: what is wrong"


@dataclass
class Question:
    id: str
    question: str
    answer: str  # reference text; for multiple choice the correct option letter
    kind: str  # closed, open or mcq
    image: Callable[[], object] | None = None  # -> PIL image, loaded when needed
    options: dict[str, str] = field(default_factory=dict)  # letter -> text (multiple choice)
    hint: str | None = None
    categories: dict[str, str] = field(default_factory=dict)  # breakdown name -> value


# ---- shared readers -------------------------------------------------------------------------------
def _pil_from_path(path: Path) -> Callable[[], object]:
    def load():
        from PIL import Image

        if not path.is_file():
            raise FileNotFoundError(f"{path}: image file not found")
        with Image.open(path) as im:
            return im.convert("RGB")

    return load


def _pil_from_bytes(data: bytes, where: str) -> Callable[[], object]:
    def load():
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(io.BytesIO(data)) as im:
                return im.convert("RGB")
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"{where}: image is not a readable picture ({e})") from None

    return load


def _parquet_rows(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise BenchmarkFileError(path, None, f"not a readable Parquet file ({e})") from None


def _parquet_image(value, path: Path, row: int) -> Callable[[], object]:
    if isinstance(value, dict) and value.get("bytes"):
        return _pil_from_bytes(value["bytes"], f"{path}, row {row}")
    if isinstance(value, (bytes, bytearray)):
        return _pil_from_bytes(bytes(value), f"{path}, row {row}")
    raise BenchmarkFileError(path, f"row {row}", "image column holds no image bytes")


def _closed_or_open(answer: str, answer_type: str | None) -> str:
    if answer_type is not None and str(answer_type).strip().upper() == "CLOSED":
        return "closed"
    if answer_type is not None and str(answer_type).strip().upper() == "OPEN" and not is_yes_no(answer):
        return "open"
    return "closed" if is_yes_no(answer) else "open"


def _hf_vqa(files: list[Path]) -> list[Question]:
    out = []
    offset = 0
    for path in files:
        rows = _parquet_rows(path)
        for i, row in enumerate(rows):
            require(path, f"row {i}", row, ("image", "question", "answer"))
            answer = str(row["answer"])
            out.append(Question(str(offset + i), str(row["question"]), answer, _closed_or_open(answer, row.get("answer_type")),
                                image=_parquet_image(row["image"], path, i)))
        offset += len(rows)
    return out


def _find(root: Path, patterns: tuple[str, ...]) -> list[Path]:
    for pattern in patterns:
        found = sorted(p for p in root.glob(pattern) if p.is_file())
        if found:
            return found
    return []


# ---- benchmarks -----------------------------------------------------------------------------------
HF_TEST_PARQUET = ("test-*.parquet", "data/test-*.parquet", "**/test-*.parquet")  # Hugging Face dataset layouts


def load_vqa_rad(root: Path) -> list[Question]:
    parquet = _find(root, HF_TEST_PARQUET)
    if parquet:
        return _hf_vqa(parquet)
    files = _find(root, ("VQA_RAD Dataset Public.json", "*.json"))
    if not files:
        raise FileNotFoundError(f"{root}: no VQA-RAD test parquet (test-*.parquet) or JSON file")
    path = files[0]
    images = next((d for d in (root / "VQA_RAD Image Folder", root / "images", root) if d.is_dir()), root)
    items = read_rows(path)
    test_marked = any(isinstance(r, dict) and "phrase_type" in r for _, r in items)
    out = []
    for i, (line, row) in enumerate(items):
        require(path, line, row, ("image_name", "question", "answer"))
        if test_marked and not str(row.get("phrase_type", "")).lower().startswith("test"):
            continue
        answer = str(row["answer"])
        cats = {k: str(row[k]) for k in ("image_organ", "question_type") if row.get(k) is not None}
        out.append(Question(str(row.get("qid", i)), str(row["question"]), answer, _closed_or_open(answer, row.get("answer_type")),
                            image=_pil_from_path(images / row["image_name"]), categories=cats))
    return out


def load_slake(root: Path) -> list[Question]:
    path = next((p for p in (root / "test.json", root / "Slake1.0" / "test.json") if p.is_file()), None)
    if path is None:
        raise FileNotFoundError(f"{root}: no SLAKE test.json")
    images = path.parent / "imgs"
    out = []
    for i, (line, row) in enumerate(read_rows(path)):
        require(path, line, row, ("img_name", "question", "answer", "q_lang"))
        if row["q_lang"] != "en":
            continue
        answer = str(row["answer"])
        cats = {k: str(row[k]) for k in ("modality", "content_type", "location") if row.get(k) is not None}
        cats["answer_type"] = _closed_or_open(answer, row.get("answer_type"))
        out.append(Question(str(row.get("qid", i)), str(row["question"]), answer, cats["answer_type"],
                            image=_pil_from_path(images / row["img_name"]), categories=cats))
    return out


def load_pathvqa(root: Path) -> list[Question]:
    parquet = _find(root, HF_TEST_PARQUET)
    if parquet:
        return _hf_vqa(parquet)
    tsv = _find(root, ("PathVQA_TEST.tsv", "*.tsv"))
    if not tsv:
        raise FileNotFoundError(f"{root}: no PathVQA test parquet (test-*.parquet) or PathVQA_TEST.tsv")
    out = []
    for line, row in read_rows(tsv[0]):
        require(tsv[0], line, row, ("index", "question", "answer", "image"))
        answer = row["answer"]
        out.append(Question(row["index"], row["question"], answer, _closed_or_open(answer, row.get("answer_type")),
                            image=_base64_image(row["image"], tsv[0], line)))
    return out


def _base64_image(value: str, path: Path, line: int) -> Callable[[], object]:
    try:
        data = base64.b64decode(value, validate=True)
    except (ValueError, TypeError):
        raise BenchmarkFileError(path, line, "image column is not valid base64") from None
    return _pil_from_bytes(data, f"{path}, line {line}")


def load_omnimedvqa(root: Path) -> list[Question]:
    qa = root / "QA_information"
    files = sorted((qa / "Open-access").glob("*.json")) if (qa / "Open-access").is_dir() else []
    files += sorted((qa / "Restricted-access").glob("*.json")) if (qa / "Restricted-access").is_dir() else []
    if not files:
        raise FileNotFoundError(f"{root}: no QA_information/Open-access/*.json")
    out = []
    for path in files:
        for where, row in read_rows(path):
            require(path, where, row, ("question_id", "question", "gt_answer", "image_path"))
            options = {letter: str(row[f"option_{letter}"]) for letter in "ABCDE" if row.get(f"option_{letter}") not in (None, "")}
            if len(options) < 2:
                raise BenchmarkFileError(path, where, "fewer than two options (option_A, option_B, ...)")
            correct = [letter for letter, text in options.items() if text.strip() == str(row["gt_answer"]).strip()]
            if len(correct) != 1:
                raise BenchmarkFileError(path, where, f"gt_answer {row['gt_answer']!r} matches {len(correct)} options")
            cats = {"modality": str(row.get("modality_type", "")), "question_type": str(row.get("question_type", "")),
                    "dataset": str(row.get("dataset", path.stem))}
            out.append(Question(str(row["question_id"]), str(row["question"]), correct[0], "mcq",
                                image=_pil_from_path(root / row["image_path"]), options=options, categories=cats))
    return out


GMAI_CATEGORIES = {"modality": "modality", "clinical vqa task": "clinical_task", "department": "department",
                   "perceptual granularity": "granularity"}


def load_gmai_mmbench(root: Path) -> list[Question]:
    files = _find(root, ("GMAI-MMBench_VAL.tsv", "GMAI-MMBench_TEST*.tsv", "*.tsv"))
    if not files:
        raise FileNotFoundError(f"{root}: no GMAI-MMBench TSV (GMAI-MMBench_VAL.tsv)")
    out = []
    for path in files:
        for line, row in read_rows(path):
            require(path, line, row, ("index", "question", "answer", "image"))
            options = {letter: row[letter] for letter in "ABCDE" if row.get(letter) not in (None, "", "nan")}
            if row["answer"] not in options:
                raise BenchmarkFileError(path, line, f"answer {row['answer']!r} is not one of the options {sorted(options)}")
            lowered = {k.lower(): v for k, v in row.items()}  # column names vary in case between releases
            cats = {name: lowered[col] for col, name in GMAI_CATEGORIES.items() if lowered.get(col) not in (None, "")}
            hint = row.get("hint") if row.get("hint") not in (None, "", "nan") else None
            out.append(Question(row["index"], row["question"], row["answer"], "mcq", image=_base64_image(row["image"], path, line),
                                options=options, hint=hint, categories=cats))
    return out


LOADERS = {"vqa-rad": load_vqa_rad, "slake": load_slake, "pathvqa": load_pathvqa, "omnimedvqa": load_omnimedvqa,
           "gmai-mmbench": load_gmai_mmbench}


def load_benchmark(name: str, root: str | Path) -> list[Question]:
    """The test questions of benchmark ``name`` from its local directory."""
    if name not in LOADERS:
        raise ValueError(f"unknown benchmark {name!r}; choose one of {list(BENCHMARKS)}")
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: benchmark directory not found")
    questions = LOADERS[name](root)
    ids = [q.id for q in questions]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise BenchmarkFileError(root, None, f"question id {dup!r} occurs more than once")
    if not questions:
        raise BenchmarkFileError(root, None, "no test questions found")
    return questions
