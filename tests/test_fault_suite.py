"""Bad-input suite: every bad value of a field is refused with a message that names the file and
the field (and what was expected); nothing half-runs or writes before the check.

Covers curriculum plans, model config files, tokenizer files, checkpoint tensors, training
checkpoints on resume and export, and data build configs (with the build's worker processes)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from unimedvl.config import UniMedVLConfig
from unimedvl.formats.checkpoint import CheckpointError, read_config, write_config
from unimedvl.tokenizer import BUNDLED_TINY_TOKENIZER, Tokenizer, TokenizerError
from unimedvl.training.plan import PLANS_DIR, PlanError, parse_plan


# ---- curriculum plans -----------------------------------------------------------------------

def _plan_doc() -> dict:
    doc = yaml.safe_load((PLANS_DIR / "demo.yaml").read_text())
    doc.pop("autoencoder")
    return doc


BAD_STAGE_VALUES = [
    ("lr", float("nan")), ("lr", float("inf")), ("lr", 0), ("lr", -1e-3), ("lr", "fast"), ("lr", True),
    ("min_lr", -1.0), ("steps", 2.7), ("steps", 0), ("steps", "two"), ("grad_accum", 0), ("grad_accum", 1.5),
    ("tokens_per_batch", 10), ("tokens_per_batch", 0), ("max_tokens_per_sample", 5), ("betas", [0.9, 1.5]),
    ("betas", "0.9"), ("betas", [0.9, float("nan")]), ("vit_transform", [56, "a", 14, 3136]), ("vae_transform", [64, -32, 16]),
    ("eps", -1.0), ("eps", 0), ("grad_clip", 0), ("warmup_steps", -1), ("checkpoint_every", 0), ("log_every", 0),
    ("weight_decay", -0.1), ("ema_decay", 1.5), ("dropout_text", 2), ("schedule", "linear"), ("augment", "yes"),
    ("frozen", "vae_model"), ("frozen", [3]), ("timestep_shift", 0), ("ce_weight", -1), ("mse_weight", float("nan")),
    ("mixture", {"understanding": "lots"}), ("mixture", {"nonsense": 1.0}),
]


@pytest.mark.parametrize("field,value", BAD_STAGE_VALUES, ids=[f"{f}={v!r}" for f, v in BAD_STAGE_VALUES])
def test_bad_stage_values_are_refused_naming_the_field(field, value):
    doc = _plan_doc()
    doc["stages"][1][field] = value
    with pytest.raises(PlanError) as e:
        parse_plan(doc, "plan.yaml")
    assert "stages[1]" in str(e.value) and field in str(e.value)


@pytest.mark.parametrize("value", [float("nan"), 0, -1.0, "x"])
def test_bad_defaults_are_refused_for_every_stage(value):
    doc = _plan_doc()
    doc["defaults"]["lr"] = value
    for stage in doc["stages"]:
        stage.pop("lr", None)
    with pytest.raises(PlanError, match="lr"):
        parse_plan(doc)


def test_tokens_per_batch_states_its_bound():
    doc = _plan_doc()
    doc["defaults"]["tokens_per_batch"] = 10
    with pytest.raises(PlanError, match=r"tokens_per_batch=10 is below what one sample needs: at least \d+"):
        parse_plan(doc)


@pytest.mark.parametrize("seed", ["abc", 1.5, -1, True, [1]])
def test_bad_seed(seed):
    doc = _plan_doc()
    doc["seed"] = seed
    with pytest.raises(PlanError, match="seed"):
        parse_plan(doc)


@pytest.mark.parametrize("field,value", [("lr", float("nan")), ("steps", 2.5), ("kl_weight", "x"), ("crop", 0)])
def test_bad_autoencoder_values(field, value):
    doc = _plan_doc()
    doc["autoencoder"] = {field: value}
    with pytest.raises(PlanError, match=field):
        parse_plan(doc)


def test_shipped_plans_still_parse():
    from unimedvl.training.plan import load_plan

    for name in ("demo", "unimedvl"):
        load_plan(name)


@pytest.mark.parametrize("frozen", [["no_such_module"], ["vae_model", "vit_modle"], ["vae_model.no_such_layer"]])
def test_frozen_names_that_match_no_module_are_refused(frozen, tmp_path):
    from unimedvl import UniMedVL
    from unimedvl.training.trainer import Trainer

    doc = _plan_doc()
    doc["stages"][2]["frozen"] = frozen
    plan = parse_plan(doc)
    model = UniMedVL.from_config(UniMedVLConfig.from_preset("tiny"))
    with pytest.raises(PlanError) as e:
        Trainer(plan, tmp_path / "no-dataset", tmp_path / "run", model=model, tokenizer=Tokenizer(BUNDLED_TINY_TOKENIZER))
    assert "stages[2]" in str(e.value) and "frozen" in str(e.value)
    assert not (tmp_path / "run").exists()  # checked before anything is written


# ---- model config files -----------------------------------------------------------------------

@pytest.fixture
def config_dir(tmp_path) -> Path:
    write_config(UniMedVLConfig.from_preset("tiny"), tmp_path)
    return tmp_path


BAD_CONFIG_VALUES = [
    ("llm_config.json", "num_hidden_layers", "two"), ("llm_config.json", "num_hidden_layers", 2.7),
    ("llm_config.json", "num_hidden_layers", 0), ("llm_config.json", "num_attention_heads", -4),
    ("llm_config.json", "num_attention_heads", 0), ("llm_config.json", "hidden_size", True),
    ("llm_config.json", "vocab_size", None), ("llm_config.json", "num_key_value_heads", "2"),
    ("llm_config.json", "rms_norm_eps", "tiny"), ("llm_config.json", "rope_theta", -1),
    ("vit_config.json", "patch_size", "14"), ("vit_config.json", "image_size", 980.5),
    ("vit_config.json", "num_hidden_layers", "3"), ("vit_config.json", "layer_norm_eps", None),
    ("ae_config.json", "ch", "32"), ("ae_config.json", "scale_factor", "x"), ("ae_config.json", "ch_mult", "1244"),
    ("ae_config.json", "z_channels", 16.5), ("ae_config.json", "ch_mult", [1, "2"]),
    ("unimedvl_config.json", "max_latent_size", 1.5), ("unimedvl_config.json", "latent_patch_size", "2"),
    ("unimedvl_config.json", "image_transforms", {"image_size": "big"}),
    ("unimedvl_config.json", "image_transforms", {"generation_vae": [64, "x", 16]}),
]


@pytest.mark.parametrize("file,field,value", BAD_CONFIG_VALUES, ids=[f"{a}:{b}={c!r}" for a, b, c in BAD_CONFIG_VALUES])
def test_bad_config_values_name_file_and_field(config_dir, file, field, value):
    doc = json.loads((config_dir / file).read_text())
    doc[field] = value
    (config_dir / file).write_text(json.dumps(doc))
    with pytest.raises(CheckpointError) as e:
        read_config(config_dir)
    message = str(e.value)
    assert file in message
    inner = value if field == "image_transforms" else None
    assert (field in message) or (inner and any(k in message for k in inner)), message


@pytest.mark.parametrize("file", ["llm_config.json", "vit_config.json", "ae_config.json", "unimedvl_config.json"])
@pytest.mark.parametrize("text", ["{not json", "[1, 2]", "\"a string\""])
def test_malformed_config_files(config_dir, file, text):
    (config_dir / file).write_text(text)
    with pytest.raises(CheckpointError, match=file.replace(".", r"\.")):
        read_config(config_dir)


# ---- tokenizer files --------------------------------------------------------------------------

@pytest.mark.parametrize("file,text,expect", [
    ("vocab.json", "{broken", "not valid JSON"),
    ("vocab.json", "[\"a\", \"b\"]", "expected a JSON object"),
    ("vocab.json", json.dumps({"a": 0, "b": "one"}), "non-negative integer id"),
    ("vocab.json", json.dumps({"a": 0, "b": -3}), "non-negative integer id"),
    ("tokenizer_config.json", "{broken", "not valid JSON"),
    ("tokenizer_config.json", "[]", "expected a JSON object"),
])
def test_malformed_tokenizer_files_name_the_file(tmp_path, file, text, expect):
    shutil.copytree(BUNDLED_TINY_TOKENIZER, tmp_path / "tok")
    (tmp_path / "tok" / file).write_text(text)
    with pytest.raises(TokenizerError) as e:
        Tokenizer(tmp_path / "tok")
    assert file in str(e.value) and expect in str(e.value)


# ---- checkpoint tensors -----------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.uint8])
def test_integer_tensor_where_a_float_weight_belongs(tmp_path, dtype):
    from safetensors.torch import load_file, save_file

    from unimedvl import UniMedVL, load_pretrained
    from unimedvl.formats.checkpoint import save_pretrained

    model = UniMedVL.from_config(UniMedVLConfig.from_preset("tiny"))
    save_pretrained(model, tmp_path, weights="ema")
    weights = next(p for p in tmp_path.glob("*.safetensors") if p.name != "ae.safetensors")
    state = load_file(str(weights))
    key = sorted(k for k in state if "layers.0" in k and k.endswith("weight"))[0]
    state[key] = state[key].to(dtype)
    save_file(state, str(weights))
    with pytest.raises(CheckpointError) as e:
        load_pretrained(tmp_path, dtype="fp32", device="cpu")
    message = str(e.value)
    assert key in message and str(dtype).removeprefix("torch.") in message and "floating-point" in message


# ---- training checkpoints: resume and export ----------------------------------------------------

def _short_plan(steps: int = 3, **stage0):
    doc = _plan_doc()
    for stage in doc["stages"]:
        stage["steps"] = steps
    doc["stages"][0].update(stage0)
    doc["defaults"]["checkpoint_every"] = 1
    return parse_plan(doc)


def _trainer(plan, dataset, run):
    from unimedvl import UniMedVL
    from unimedvl.training.trainer import Trainer

    model = UniMedVL.from_config(UniMedVLConfig.from_preset("tiny"), seed=0)
    return Trainer(plan, dataset, run, model=model, tokenizer=Tokenizer(BUNDLED_TINY_TOKENIZER), tensorboard=False)


@pytest.fixture(scope="module")
def trained_run(demo_dataset, tmp_path_factory) -> Path:
    """A run stopped at step 2 of a 3-step first stage: checkpoints at steps 1 and 2 (mid-stage)."""
    run = tmp_path_factory.mktemp("fault-run") / "run"
    _trainer(_short_plan(), demo_dataset, run).run(max_steps=2)
    assert (run / "checkpoints" / "step-0000002" / "state.json").is_file()
    return run


@pytest.fixture
def run_copy(trained_run, tmp_path) -> Path:
    shutil.copytree(trained_run, tmp_path / "run")
    return tmp_path / "run"


@pytest.mark.parametrize("pointer", [
    None,  # latest.json names a deleted step: step-0000002 is removed below
    "{garbage", "[]", json.dumps({"global_step": 2}), json.dumps({"checkpoint": 5}),
    json.dumps({"checkpoint": "../../elsewhere"}),
])
def test_a_broken_latest_pointer_falls_back_to_the_newest_complete_checkpoint(run_copy, pointer):
    from unimedvl.training.checkpointing import CheckpointWarning, latest_checkpoint

    ckpts = run_copy / "checkpoints"
    if pointer is None:
        shutil.rmtree(ckpts / "step-0000002")
        expected = "step-0000001"
    else:
        (ckpts / "latest.json").write_text(pointer)
        expected = "step-0000002"
    with pytest.warns(CheckpointWarning, match="latest.json"):
        assert latest_checkpoint(run_copy).name == expected


def test_resume_after_a_deleted_step_continues_from_the_newest_complete_one(run_copy, demo_dataset):
    from unimedvl.training.checkpointing import CheckpointWarning

    shutil.rmtree(run_copy / "checkpoints" / "step-0000002")
    trainer = _trainer(_short_plan(), demo_dataset, run_copy)
    with pytest.warns(CheckpointWarning, match="step-0000002"):
        result = trainer.run(resume=True, max_steps=2)
    assert result.global_step == 2
    rows = [json.loads(r)["step"] for r in (run_copy / "metrics.jsonl").read_text().splitlines()]
    assert rows == [1, 2]  # resumed at step 1, not restarted from scratch


def test_a_pointer_with_no_complete_checkpoint_left_is_an_error(run_copy):
    from unimedvl.training.checkpointing import latest_checkpoint

    for step in ("step-0000001", "step-0000002"):
        shutil.rmtree(run_copy / "checkpoints" / step)
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        latest_checkpoint(run_copy)


@pytest.mark.parametrize("change,expect", [
    ({"steps": 5}, "stages"),
    ({"name": "renamed"}, "stages"),
])
def test_resuming_under_another_plan_is_refused(run_copy, demo_dataset, change, expect):
    plan = _short_plan(**change)
    with pytest.raises(PlanError) as e:
        _trainer(plan, demo_dataset, run_copy).run(resume=True, max_steps=3)
    assert "state.json" in str(e.value) and expect in str(e.value) and "another plan" in str(e.value)


def test_resuming_under_a_plan_of_another_name_is_refused(run_copy, demo_dataset):
    import dataclasses

    plan = dataclasses.replace(_short_plan(), name="other")
    with pytest.raises(PlanError, match="plan name 'demo' -> 'other'"):
        _trainer(plan, demo_dataset, run_copy).run(resume=True, max_steps=3)


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


DAMAGE = {
    "truncated model.safetensors": ("model.safetensors", _truncate),
    "truncated ema.safetensors": ("ema.safetensors", _truncate),
    "garbage optimizer.pt": ("optimizer.pt", lambda p: p.write_bytes(b"not a pickle at all")),
    "missing optimizer.pt": ("optimizer.pt", lambda p: p.unlink()),
    "state.json without global_step": ("state.json", lambda p: p.write_text(json.dumps({k: v for k, v in json.loads(p.read_text()).items() if k != "global_step"}))),
    "state.json with a string global_step": ("state.json", lambda p: p.write_text(json.dumps({**json.loads(p.read_text()), "global_step": "two"}))),
    "state.json not JSON": ("state.json", lambda p: p.write_text("{oops")),
    "state.json without stream": ("state.json", lambda p: p.write_text(json.dumps({k: v for k, v in json.loads(p.read_text()).items() if k != "stream"}))),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_resume_from_a_damaged_checkpoint_names_the_file(run_copy, demo_dataset, damage):
    name, spoil = DAMAGE[damage]
    spoil(run_copy / "checkpoints" / "step-0000002" / name)
    with pytest.raises(CheckpointError) as e:
        _trainer(_short_plan(), demo_dataset, run_copy).run(resume=True, max_steps=3)
    assert name in str(e.value)


@pytest.mark.parametrize("damage", ["truncated model.safetensors", "truncated ema.safetensors", "state.json not JSON"])
def test_export_from_a_damaged_checkpoint_names_the_file(run_copy, tmp_path, damage):
    from unimedvl.training.export import export_checkpoint

    name, spoil = DAMAGE[damage]
    spoil(run_copy / "checkpoints" / "step-0000002" / name)
    with pytest.raises(CheckpointError) as e:
        export_checkpoint(run_copy / "checkpoints" / "step-0000002", tmp_path / "out")
    assert name in str(e.value)


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}
    return subprocess.run([sys.executable, "-m", "unimedvl", *args], capture_output=True, text=True, env=env, timeout=300)


def test_cli_export_of_a_truncated_checkpoint_is_one_line_without_traceback(run_copy, tmp_path):
    _truncate(run_copy / "checkpoints" / "step-0000002" / "model.safetensors")
    done = _cli("export", str(run_copy), "--out", str(tmp_path / "out"))
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and "model.safetensors" in done.stderr


# ---- data build configs -------------------------------------------------------------------------

def _png(path: Path, side: int, seed: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(path)


def _sources(root: Path, n: int = 4, side: int = 160) -> Path:
    folder = root / "fundus"
    folder.mkdir(parents=True)
    rows = ["file,label"]
    for i in range(n):
        _png(folder / f"img{i}.png", side, i)
        rows.append(f"img{i}.png,{'normal' if i % 2 else 'glaucoma'}")
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")
    return folder


def _build_doc(**top) -> dict:
    doc = {"salt": "a-secret-salt", "seed": 0, "splits": {"val": 0.0, "test": 0.25}, "items_per_shard": 2,
           "qc": {"min_side": 64}, "sources": [{"name": "fundus", "kind": "image_folder", "path": "fundus", "modality": "CFP",
                                                 "license": "test", "options": {"tasks": ["caption"]}}]}
    doc.update(top)
    return doc


BAD_BUILD_VALUES = [
    ("splits", 0.1, "splits"), ("splits", {"val": "a"}, "val"), ("splits", {"test": float("nan")}, "test"),
    ("qc", {"min_side": "big"}, "min_side"), ("qc", {"blank_std": -1}, "blank_std"), ("qc", {"saturated_fraction": 3}, "saturated_fraction"),
    ("qc", {"min_side": 1.5}, "min_side"), ("qc", "strict", "qc"), ("qc", {"min_text_chars": 50, "max_text_chars": 10}, "min_text_chars"),
    ("items_per_shard", 2.9, "items_per_shard"), ("items_per_shard", "x", "items_per_shard"), ("items_per_shard", 0, "items_per_shard"),
    ("max_side", -5, "max_side"), ("max_side", 32, "max_side"), ("max_side", "large", "max_side"),
    ("seed", "abc", "seed"), ("seed", 1.5, "seed"), ("log_item_paths", "yes", "log_item_paths"),
]


@pytest.mark.parametrize("field,value,named", BAD_BUILD_VALUES, ids=[f"{f}={v!r}" for f, v, _ in BAD_BUILD_VALUES])
def test_bad_build_config_values_name_the_field(tmp_path, field, value, named):
    from unimedvl.data.build_config import BuildConfigError, load_build_config

    _sources(tmp_path)
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(_build_doc(**{field: value})))
    with pytest.raises(BuildConfigError) as e:
        load_build_config(tmp_path / "b.yaml")
    assert named in str(e.value) and "b.yaml" in str(e.value)


BAD_SOURCE_OPTIONS = [
    ("image_folder", {"sr_factor": -2}, "sr_factor"), ("image_folder", {"sr_factor": "4"}, "sr_factor"),
    ("image_folder", {"tasks": "caption"}, "tasks"), ("image_folder", {"labels": 3}, "labels"),
    ("dicom", {"window": "sideways"}, "window"), ("dicom", {"window": [40]}, "window"), ("dicom", {"slices_per_series": 0}, "slices_per_series"),
    ("dicom", {"reject_possible_burned_in": "no"}, "reject_possible_burned_in"),
    ("nifti", {"min_foreground": 5}, "min_foreground"), ("nifti", {"slices_per_volume": 2.5}, "slices_per_volume"),
]


@pytest.mark.parametrize("kind,options,named", BAD_SOURCE_OPTIONS, ids=[f"{k}:{o}" for k, o, _ in BAD_SOURCE_OPTIONS])
def test_source_options_no_file_can_satisfy_are_refused_before_anything_is_written(tmp_path, kind, options, named):
    from unimedvl.data.build_config import load_build_config
    from unimedvl.data.builder import build

    _sources(tmp_path)
    doc = _build_doc()
    doc["sources"][0].update(kind=kind, options=options)
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(doc))
    with pytest.raises(ValueError) as e:
        build(load_build_config(tmp_path / "b.yaml"), tmp_path / "out")
    assert f"options.{named}" in str(e.value)
    assert not (tmp_path / "out" / "build.json").exists()


def test_a_dicom_source_without_dicom_files_fails_and_writes_nothing_then_the_fix_builds(tmp_path):
    from unimedvl.data.build_config import load_build_config
    from unimedvl.data.builder import BuildError, build

    _sources(tmp_path)
    doc = _build_doc()
    doc["sources"][0].update(kind="dicom", options={})
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(doc))
    with pytest.raises(BuildError, match="'fundus' \\(kind dicom\\): no items found"):
        build(load_build_config(tmp_path / "b.yaml"), tmp_path / "out")
    assert not (tmp_path / "out" / "build.json").exists()
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(_build_doc()))  # corrected config, same folder
    summary = build(load_build_config(tmp_path / "b.yaml"), tmp_path / "out")
    assert summary["finalized"] and summary["sources_without_records"] == []


def test_a_source_whose_every_item_is_rejected_fails_the_cli(tmp_path):
    _sources(tmp_path, side=40)  # all below qc.min_side=64
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(_build_doc()))
    done = _cli("data", "build", str(tmp_path / "b.yaml"), "--out", str(tmp_path / "out"))
    assert done.returncode == 1, done.stderr
    assert "fundus" in done.stderr and "rejected" in done.stderr and "Traceback" not in done.stderr


def test_cli_build_config_error_is_one_line_exit_2(tmp_path):
    _sources(tmp_path)
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(_build_doc(items_per_shard=2.9)))
    done = _cli("data", "build", str(tmp_path / "b.yaml"), "--out", str(tmp_path / "out"))
    assert done.returncode == 2 and "items_per_shard" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_build_workers_exit_when_the_parent_is_killed(tmp_path):
    _sources(tmp_path, n=8)
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(_build_doc(items_per_shard=1)))
    script = tmp_path / "run_build.py"
    script.write_text(textwrap.dedent(f"""
        import time
        import unimedvl.data.builder as builder
        from unimedvl.data.build_config import load_build_config

        def slow(config, plan, out):
            time.sleep(120)

        builder.build_shard = slow  # workers stay busy until the parent is killed
        builder.build(load_build_config({str(tmp_path / 'b.yaml')!r}), {str(tmp_path / 'out')!r}, workers=2)
    """))
    parent = subprocess.Popen([sys.executable, str(script)])
    workers: list[int] = []
    try:
        deadline = time.time() + 60
        while time.time() < deadline and len(workers) < 2:
            time.sleep(0.2)
            workers = _children(parent.pid)
        assert len(workers) >= 2, "the build did not start its workers"
        time.sleep(0.5)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        deadline = time.time() + 10
        while time.time() < deadline and any(_alive(w) for w in workers):
            time.sleep(0.2)
        survivors = [w for w in workers if _alive(w)]
        assert not survivors, f"worker(s) {survivors} outlived the killed build"
    finally:
        for w in workers:
            if _alive(w):
                os.kill(w, signal.SIGKILL)
        if parent.poll() is None:
            parent.kill()
