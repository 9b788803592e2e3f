"""The curriculum loop on the demo corpus at the tiny preset: learning, frozen modules, resume."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from unimedvl import UniMedVL, UniMedVLConfig, load_pretrained
from unimedvl.tokenizer import BUNDLED_TINY_TOKENIZER, Tokenizer
from unimedvl.training.plan import PLANS_DIR, parse_plan
from unimedvl.training.trainer import Trainer


def demo_plan(steps: int, checkpoint_every: int = 1000):
    import yaml

    doc = yaml.safe_load((PLANS_DIR / "demo.yaml").read_text())
    doc.pop("autoencoder")  # the curriculum alone (the autoencoder step has its own tests)
    for stage in doc["stages"]:
        stage["steps"] = steps
    doc["defaults"]["checkpoint_every"] = checkpoint_every
    return parse_plan(doc)


def new_model(seed=0):
    return UniMedVL.from_config(UniMedVLConfig.from_preset("tiny"), seed=seed)


def test_three_stages_learn_and_frozen_modules_stay(demo_dataset, tmp_path):
    plan = demo_plan(12)
    model = new_model()
    vae_before = {k: v.clone() for k, v in model.vae_model.state_dict().items()}
    trainer = Trainer(plan, demo_dataset, tmp_path / "run", model=model, tokenizer=Tokenizer(BUNDLED_TINY_TOKENIZER))
    vit_after_stage1 = {}
    original_enter = trainer._enter_stage

    def enter(index, *a, **k):
        if index == 1:
            vit_after_stage1.update({n: p.detach().clone() for n, p in model.vit_model.named_parameters()})
        return original_enter(index, *a, **k)

    trainer._enter_stage = enter
    result = trainer.run()
    assert result.global_step == 36
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 37))
    for key in ("stage", "step", "loss", "ce", "mse", "lr", "tokens_per_s"):
        assert key in rows[0]
    for stage in ("foundation", "instruction", "unified"):
        losses = [r["loss"] for r in rows if r["stage"] == stage]
        assert np.mean(losses[-4:]) < np.mean(losses[:4]), stage
    # the VAE never trains; the ViT trains in stage 1 and is frozen afterwards
    assert all(torch.equal(v, model.vae_model.state_dict()[k]) for k, v in vae_before.items())
    assert all(torch.equal(p, dict(model.vit_model.named_parameters())[n]) for n, p in vit_after_stage1.items())
    assert (tmp_path / "run" / "checkpoints" / "step-0000036" / "ema.safetensors").is_file()
    # EMA: a module frozen in the current stage carries its weights (the ViT's stage-1 EMA was replaced on entering
    # stage 2), a trained one lags behind its weights
    assert all(torch.equal(trainer.ema[f"vit_model.{n}"], p.detach().float()) for n, p in model.vit_model.named_parameters())
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained and any(not torch.equal(trainer.ema[n], dict(model.named_parameters())[n].detach().float()) for n in trained)
    assert set(rows[-1]["per_family"]) <= {"understanding", "generation", "interleaved"} and rows[-1]["per_family"]
    # the same rows in TensorBoard
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, 37))
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx([r["loss"] for r in rows], rel=1e-6)
    assert "family/understanding/ce" in events.Tags()["scalars"] and "train/tflops_per_s" in events.Tags()["scalars"]
    assert rows[0]["mfu"] is None and rows[0]["tflops_per_s"] > 0  # no known peak on a CPU
    plots = sorted(p.name for p in (tmp_path / "run" / "plots").iterdir())
    assert plots == ["loss.png", "loss_foundation.png", "loss_instruction.png", "loss_unified.png"]


def test_resumed_run_matches_an_uninterrupted_one_bit_for_bit(demo_dataset, tmp_path):
    plan = demo_plan(5, checkpoint_every=3)  # checkpoints at global steps 3, 5, 8, 10, 13, 15
    tok = Tokenizer(BUNDLED_TINY_TOKENIZER)
    full = Trainer(plan, demo_dataset, tmp_path / "full", model=new_model(), tokenizer=tok)
    full.run(max_steps=9)
    interrupted = Trainer(plan, demo_dataset, tmp_path / "cut", model=new_model(), tokenizer=tok)
    interrupted.run(max_steps=7, checkpoint_at_end=False)  # dies after step 7; the last checkpoint is step 5
    resumed = Trainer(plan, demo_dataset, tmp_path / "cut", model=new_model(seed=123), tokenizer=tok)
    resumed.run(resume=True, max_steps=9)
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(full.ema[k], resumed.ema[k]) for k in full.ema)
    rows = [json.loads(line)["step"] for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert rows == list(range(1, 10))
    with pytest.raises(FileExistsError, match="--resume"):
        Trainer(plan, demo_dataset, tmp_path / "cut", model=new_model(), tokenizer=tok).run()


def test_export_loads_strictly_and_reproduces_the_trainers_model(demo_dataset, tmp_path):
    from typer.testing import CliRunner

    from unimedvl.cli import app
    from unimedvl.inference.engine import Engine

    plan = demo_plan(3)
    tok = Tokenizer(BUNDLED_TINY_TOKENIZER)
    trainer = Trainer(plan, demo_dataset, tmp_path / "run", model=new_model(), tokenizer=tok)
    trainer.run(max_steps=4)
    r = CliRunner().invoke(app, ["export", str(tmp_path / "run"), "--out", str(tmp_path / "export")])
    assert r.exit_code == 0, r.output
    ema, ema_tokenizer = load_pretrained(tmp_path / "export", dtype=torch.float32)  # strict: every key present and shaped
    raw = load_pretrained(tmp_path / "export", dtype=torch.float32, weights="model")[0]
    assert all(torch.equal(raw.state_dict()[k], v) for k, v in trainer.model.state_dict().items())
    assert all(torch.equal(ema.state_dict()[k], v.to(ema.state_dict()[k].dtype)) for k, v in trainer.ema.items())
    assert ema_tokenizer is not None and len(ema_tokenizer) == len(tok)

    def logits(model):
        eng = Engine(model.eval(), tok.special)
        ctx = eng.new_context()
        eng.add_text(ctx, tok.encode("A chest X-ray."))
        return eng.generate_text(ctx, 4).logits

    reference = new_model()
    reference.load_state_dict(trainer.model.state_dict())
    # not bit-exact: the exported weights are assigned file-backed tensors, so BLAS may take another path (seen: 1.5e-7 at |logit| <= 0.56)
    torch.testing.assert_close(logits(raw), logits(reference), rtol=1e-5, atol=1e-5)


def test_sigkill_then_resume_through_the_cli_is_bit_identical(demo_dataset, tmp_path):
    """A training process killed with SIGKILL mid-run and restarted with --resume ends with the same
    weights as a run that was never interrupted."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import yaml
    from safetensors.torch import load_file

    doc = yaml.safe_load((PLANS_DIR / "demo.yaml").read_text())
    doc.pop("autoencoder")  # the curriculum alone (the autoencoder step has its own tests)
    for stage in doc["stages"]:
        stage["steps"] = 6
    doc["defaults"]["checkpoint_every"] = 2
    plan_file = tmp_path / "plan.yaml"
    plan_file.write_text(yaml.safe_dump(doc))
    cmd = lambda out, *extra: [sys.executable, "-m", "unimedvl", "train", str(plan_file), "--data", str(demo_dataset), "--out", str(out), *extra]  # noqa: E731

    full = subprocess.run(cmd(tmp_path / "full", "--max-steps", "10"), capture_output=True, text=True)
    assert full.returncode == 0, full.stderr
    proc = subprocess.Popen(cmd(tmp_path / "killed", "--max-steps", "10"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 5):
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    steps_done = len(metrics.read_text().splitlines())
    assert 5 <= steps_done < 10, "the run was not interrupted mid-way"
    resumed = subprocess.run(cmd(tmp_path / "killed", "--max-steps", "10", "--resume"), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    a = load_file(str(tmp_path / "full" / "checkpoints" / "step-0000010" / "model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "checkpoints" / "step-0000010" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not list((tmp_path / "killed" / "checkpoints").glob(".*partial"))


def test_lora_trains_only_its_adapters_and_exports_merged(demo_dataset, tmp_path):
    from typer.testing import CliRunner

    from unimedvl.cli import app
    from unimedvl.inference.engine import Engine
    from unimedvl.training.lora import LoRAConfig, LoRALinear

    plan = demo_plan(3)
    tok = Tokenizer(BUNDLED_TINY_TOKENIZER)
    model = new_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lora = LoRAConfig(rank=4, alpha=8.0, targets=(r"self_attn\.(q|v)_proj$", r"mlp_moe_gen\.down_proj$"))
    trainer = Trainer(dataclasses.replace(plan, lora=lora), demo_dataset, tmp_path / "run", model=model, tokenizer=tok)
    wrapped = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    assert len(wrapped) == 2 * 2 + 2  # q and v of 2 layers' und expert, the gen MLP down projection of 2 layers
    trainer.run(max_steps=4)
    after = {k.replace(".base.", "."): v for k, v in model.state_dict().items() if "lora_" not in k}
    assert after.keys() == before.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)  # every original weight is untouched
    assert any(not torch.equal(m.lora_b, torch.zeros_like(m.lora_b)) for m in model.modules() if isinstance(m, LoRALinear))
    r = CliRunner().invoke(app, ["export", str(tmp_path / "run"), "--out", str(tmp_path / "export")])
    assert r.exit_code == 0, r.output
    raw = load_pretrained(tmp_path / "export", dtype=torch.float32, weights="model")[0]  # strict: official keys only

    def logits(m):
        eng = Engine(m.eval(), tok.special)
        ctx = eng.new_context()
        eng.add_text(ctx, tok.encode("A chest X-ray."))
        return eng.generate_text(ctx, 4).logits

    assert torch.allclose(logits(raw), logits(model), atol=1e-5)


def test_two_fsdp_processes_match_one_process_and_resume_from_sharded_checkpoints(demo_dataset, tmp_path):
    """torchrun with 2 CPU processes (gloo, FSDP2, grad_accum 1) trains like 1 process accumulating
    the same 2 micro-batches: losses within 1e-4 relative, weights within 1e-5.  The 2-process
    checkpoints are sharded (torch.distributed.checkpoint, no model.safetensors); a 2-process run
    stopped mid-stage and resumed ends bit-identical to the uninterrupted one; export assembles the
    shards into the official layout, which loads strictly."""
    import subprocess
    import sys

    import yaml

    from unimedvl.training.export import export_checkpoint, load_training_weights

    def plan_file(accum):
        doc = yaml.safe_load((PLANS_DIR / "demo.yaml").read_text())
        doc.pop("autoencoder")
        for stage in doc["stages"]:
            stage["steps"] = 3
        doc["defaults"]["grad_accum"] = accum
        path = tmp_path / f"plan{accum}.yaml"
        path.write_text(yaml.safe_dump(doc))
        return path

    def torchrun(run, steps, *extra):
        two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29533",
                              "-m", "unimedvl.train", str(plan_file(1)), "--out", str(tmp_path / run), "--data", str(demo_dataset),
                              "--max-steps", str(steps), "--no-tensorboard", *extra], capture_output=True, text=True)
        assert two.returncode == 0, two.stderr[-3000:]

    one = subprocess.run([sys.executable, "-m", "unimedvl.train", str(plan_file(2)), "--out", str(tmp_path / "one"),
                          "--data", str(demo_dataset), "--max-steps", "4", "--no-tensorboard"], capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-2000:]
    torchrun("two", 4)
    rows = lambda run: [json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    a, b = rows("one"), rows("two")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-4)
    ckpt = tmp_path / "two" / "checkpoints" / "step-0000004"
    assert (ckpt / "sharded" / ".metadata").is_file() and not (ckpt / "model.safetensors").exists()
    wa = load_training_weights(tmp_path / "one" / "checkpoints" / "step-0000004")
    wb = load_training_weights(ckpt)
    assert wa.keys() == wb.keys()
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-5

    torchrun("two_resumed", 2)  # stops mid-stage 1: the optimiser state must come back
    torchrun("two_resumed", 4, "--resume")
    wr = load_training_weights(tmp_path / "two_resumed")
    assert all(torch.equal(wb[k], wr[k]) for k in wb)
    assert all(torch.equal(x, y) for x, y in zip(load_training_weights(ckpt, "ema").values(),
                                                 load_training_weights(tmp_path / "two_resumed", "ema").values()))

    out = export_checkpoint(ckpt, tmp_path / "exported")
    model = load_pretrained(out, dtype=torch.float32, weights="model")[0]  # strict key check
    state = model.state_dict()
    assert all(torch.equal(state[k], wb[k]) for k in wb if k in state and not k.startswith("vae_model"))
