"""Tiny benchmark directories in each distributed format, generated for the tests."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image


def png_bytes(seed: int, size=(40, 32)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def write_png(path: Path, seed: int, size=(40, 32)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(seed, size))


def _json_list(path: Path, items: list[dict]) -> None:
    """One item per line, so line numbers are predictable: item i starts on line i + 2."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("[\n" + ",\n".join(json.dumps(it) for it in items) + "\n]\n")


VQA_RAD_ITEMS = [
    {"qid": 101, "image_name": "synpic1.jpg", "question": "Is there a fracture?", "answer": "No", "answer_type": "CLOSED",
     "phrase_type": "test_freeform", "image_organ": "CHEST", "question_type": "ABN"},
    {"qid": 102, "image_name": "synpic1.jpg", "question": "What organ is shown?", "answer": "Lung", "answer_type": "OPEN",
     "phrase_type": "test_para", "image_organ": "CHEST", "question_type": "ORGAN"},
    {"qid": 103, "image_name": "synpic2.jpg", "question": "Is the heart enlarged?", "answer": "yes", "answer_type": "CLOSED",
     "phrase_type": "freeform", "image_organ": "CHEST", "question_type": "SIZE"},  # a training question
    {"qid": 104, "image_name": "synpic2.jpg", "question": "Where is the mass?", "answer": "left upper lobe", "answer_type": "OPEN",
     "phrase_type": "test_freeform", "image_organ": "HEAD", "question_type": "POS"},
]


def make_vqa_rad_json(root: Path) -> Path:
    _json_list(root / "VQA_RAD Dataset Public.json", VQA_RAD_ITEMS)
    for i, name in enumerate(("synpic1.jpg", "synpic2.jpg")):
        write_png(root / "VQA_RAD Image Folder" / name, i)
    return root


def make_vqa_rad_parquet(root: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"image": {"bytes": png_bytes(i), "path": None}, "question": q, "answer": a}
            for i, (q, a) in enumerate([("is this a ct?", "yes"), ("which organ?", "liver"), ("any effusion?", "no")])]
    (root / "data").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), root / "data" / "test-00000-of-00001.parquet")
    return root


SLAKE_ITEMS = [
    {"qid": 11, "img_name": "xmlab1/source.jpg", "question": "Is this a CT image?", "answer": "Yes", "q_lang": "en",
     "answer_type": "CLOSED", "content_type": "Modality", "modality": "CT", "location": "Abdomen"},
    {"qid": 12, "img_name": "xmlab1/source.jpg", "question": "这是CT吗?", "answer": "是", "q_lang": "zh",
     "answer_type": "CLOSED", "content_type": "Modality", "modality": "CT", "location": "Abdomen"},
    {"qid": 13, "img_name": "xmlab2/source.jpg", "question": "Which side is the lesion on?", "answer": "Left", "q_lang": "en",
     "answer_type": "CLOSED", "content_type": "Position", "modality": "MRI", "location": "Brain"},
    {"qid": 14, "img_name": "xmlab2/source.jpg", "question": "What diseases are included?", "answer": "Brain Edema, Brain Tumor",
     "q_lang": "en", "answer_type": "OPEN", "content_type": "Abnormality", "modality": "MRI", "location": "Brain"},
]


def make_slake(root: Path) -> Path:
    _json_list(root / "test.json", SLAKE_ITEMS)
    for i, d in enumerate(("xmlab1", "xmlab2")):
        write_png(root / "imgs" / d / "source.jpg", 10 + i)
    return root


def _tsv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\t".join(header) + "\n" + "".join("\t".join(r) + "\n" for r in rows))


def b64(seed: int) -> str:
    return base64.b64encode(png_bytes(seed)).decode()


def make_pathvqa_tsv(root: Path) -> Path:
    _tsv(root / "PathVQA_TEST.tsv", ["index", "image", "question", "answer"],
         [["0", b64(20), "is there necrosis?", "yes"], ["1", b64(21), "what is present?", "granuloma"]])
    return root


def make_omnimedvqa(root: Path) -> Path:
    items = [
        {"question_id": "omni_0", "dataset": "SynthCXR", "question_type": "Modality Recognition", "question": "What modality is this?",
         "gt_answer": "X-Ray", "option_A": "CT", "option_B": "X-Ray", "option_C": "MRI", "image_path": "Images/SynthCXR/0.png",
         "modality_type": "X-Ray"},
        {"question_id": "omni_1", "dataset": "SynthCXR", "question_type": "Disease Diagnosis", "question": "What is shown?",
         "gt_answer": "Pneumonia", "option_A": "Normal", "option_B": "Pneumonia", "image_path": "Images/SynthCXR/1.png",
         "modality_type": "X-Ray"},
        {"question_id": "omni_2", "dataset": "SynthFundus", "question_type": "Anatomy Identification", "question": "Which structure?",
         "gt_answer": "Optic disc", "option_A": "Macula", "option_B": "Optic disc", "option_C": "Vessel", "option_D": "Fovea",
         "image_path": "Images/SynthFundus/0.png", "modality_type": "Fundus Photography"},
    ]
    _json_list(root / "QA_information" / "Open-access" / "SynthCXR.json", items[:2])
    _json_list(root / "QA_information" / "Open-access" / "SynthFundus.json", items[2:])
    for i, it in enumerate(items):
        write_png(root / it["image_path"], 30 + i)
    return root


GMAI_HEADER = ["index", "image", "question", "A", "B", "C", "D", "E", "answer", "modality", "clinical VQA task", "department",
               "perceptual granularity"]


def make_gmai(root: Path) -> Path:
    _tsv(root / "GMAI-MMBench_VAL.tsv", GMAI_HEADER, [
        ["7", b64(40), "Which organ is abnormal?", "Liver", "Kidney", "Spleen", "", "", "B", "CT", "Disease Diagnosis", "Urology", "Organ"],
        ["8", b64(41), "What is the imaging modality?", "CT", "MR", "", "", "", "A", "CT", "Modality Recognition", "Radiology", "Image"],
        ["9", b64(42), "Grade the lesion.", "I", "II", "III", "IV", "", "C", "Fundus", "Severity Grading", "Ophthalmology", "Lesion"],
    ])
    return root
