"""Quality control after the build: leakage across splits, model-based scoring, expert review."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from unimedvl.cli import app
from unimedvl.data.adapters.base import Adapter, BuildContext, SourceConfig
from unimedvl.data.build_config import load_build_config
from unimedvl.data.builder import build
from unimedvl.data.curation import export_review, import_review
from unimedvl.data.layout import DatasetLayout

runner = CliRunner()
SALT = "curation-test-salt"


def _patient_in(split: str, seed: int) -> str:
    ctx = BuildContext(salt=SALT, seed=seed, test_fraction=0.5)
    probe = Adapter.__new__(Adapter)
    probe.source, probe.ctx = SourceConfig("x", "image_folder", Path(".")), ctx
    return next(p for p in (f"patient-{i}" for i in range(1000)) if probe.split_for(probe.patient_group(p, "")) == split)


def _texture(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(128 + 50 * rng.standard_normal((160, 160)), 0, 255).astype(np.uint8)


@pytest.fixture()
def dataset(tmp_path):
    for folder in ("a", "b", "c"):
        (tmp_path / folder).mkdir()
    shared = _texture(0)
    Image.fromarray(shared).save(tmp_path / "a" / "x.png")
    Image.fromarray(shared).save(tmp_path / "b" / "y.png")  # the same image, another patient
    (tmp_path / "a" / "labels.csv").write_text(f"file,label,patient\nx.png,a nodule,{_patient_in('test', 1)}\n")
    (tmp_path / "b" / "labels.csv").write_text(f"file,label,patient\ny.png,a nodule,{_patient_in('train', 1)}\n")
    rows = ["file,label,patient"]
    for i in range(12):
        Image.fromarray(_texture(100 + i)).save(tmp_path / "c" / f"{i:02d}.png")
        rows.append(f"{i:02d}.png,{'a mass' if i % 2 else 'an effusion'},c{i}")
    (tmp_path / "c" / "labels.csv").write_text("\n".join(rows) + "\n")
    cfg = {"salt": SALT, "seed": 1, "splits": {"test": 0.5}, "sources": [
        {"name": "a", "kind": "image_folder", "path": "a", "modality": "CT", "options": {"tasks": ["caption"]}},
        {"name": "b", "kind": "image_folder", "path": "b", "modality": "CT", "options": {"tasks": ["t2i"]}},
        {"name": "c", "kind": "image_folder", "path": "c", "modality": "MRI", "options": {"tasks": ["caption"]}},
    ]}
    (tmp_path / "build.yaml").write_text(yaml.safe_dump(cfg))
    build(load_build_config(tmp_path / "build.yaml"), tmp_path / "out")
    return tmp_path / "out"


def manifest(out):
    return json.loads((out / "manifest.json").read_text())


def test_train_copy_of_a_held_out_image_is_excluded_as_leakage(dataset):
    m = manifest(dataset)
    assert m["rejections"].get("qc2/leakage") == 1
    leaked = [json.loads(line) for line in (dataset / "leakage.jsonl").read_text().splitlines()]
    assert [r["source"] for r in leaked] == ["b"] and leaked[0]["id"] in m["excluded"]


def test_scoring_keeps_the_top_fraction_per_modality(dataset, tmp_path):
    scorer_file = tmp_path / "scorer.py"
    scorer_file.write_text("import numpy as np\ndef brightness(image, text):\n    return float(np.asarray(image).mean())\n")
    before = {r["id"]: r["modality"] for r in DatasetLayout(dataset).iter_kept(["id", "modality"])}
    r = runner.invoke(app, ["data", "score", str(dataset), "--scorer", f"{scorer_file}:brightness", "--keep-fraction", "0.5"])
    assert r.exit_code == 0, r.output
    scores = {s["id"]: s["score"] for s in map(json.loads, (dataset / "record_scores.jsonl").read_text().splitlines())}
    kept = {r["id"] for r in DatasetLayout(dataset).iter_kept(["id"])}
    for modality in set(before.values()):
        ids = sorted((i for i, m in before.items() if m == modality), key=lambda i: -scores[i])
        n_keep = max(1, round(len(ids) * 0.5))
        assert set(ids[:n_keep]) <= kept and not set(ids[n_keep:]) & kept, modality
    assert manifest(dataset)["rejections"]["qc2/low_score"] == len(before) - len(kept)
    r = runner.invoke(app, ["data", "score", str(dataset), "--scorer", "no_such_module:f"])
    assert r.exit_code == 2 and "no_such_module" in r.output


def test_review_sheet_round_trip(dataset, tmp_path):
    sheet = tmp_path / "review.html"
    n = export_review(dataset, sheet, n=6, seed=0)
    page = sheet.read_text()
    ids = re.findall(r'class="card" data-id="([0-9a-f]+)"', page)
    assert len(ids) == n >= 2 and page.count("data:image/png;base64,") >= n
    assert "<script>" in page and "verdicts.json" in page  # self-contained: images and the download logic inline
    verdicts = {"reviewer": "Dr. A", "verdicts": [{"id": ids[0], "verdict": "reject", "comment": "label does not match"}]
                + [{"id": i, "verdict": "accept", "comment": ""} for i in ids[1:]]}
    (tmp_path / "verdicts.json").write_text(json.dumps(verdicts))
    result = import_review(dataset, tmp_path / "verdicts.json")
    assert result["rejected"] == 1
    m = manifest(dataset)
    assert ids[0] in m["excluded"] and m["rejections"]["review/expert_reject"] == 1
    review = [json.loads(line) for line in (dataset / "review.jsonl").read_text().splitlines()]
    assert review[0]["detail"] == "Dr. A: label does not match"
    # a second reviewer overturns it
    (tmp_path / "v2.json").write_text(json.dumps({"verdicts": [{"id": ids[0], "verdict": "accept"}]}))
    assert import_review(dataset, tmp_path / "v2.json")["rejected"] == 0
    assert ids[0] not in manifest(dataset)["excluded"]
    (tmp_path / "bad.json").write_text(json.dumps({"verdicts": [{"id": "nope", "verdict": "accept"}]}))
    with pytest.raises(ValueError, match=r"verdicts\[0\].id 'nope' is not a kept record"):
        import_review(dataset, tmp_path / "bad.json")
