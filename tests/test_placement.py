"""Placement over several devices (``device_map``/``max_memory``): budgets, plans, hooks, outputs.

A CPU has one torch device, so the plans here use ``cpu:N`` placements: all in host memory, but
distinct placements to the plan and its hooks, which carry the activations between them exactly as
between GPUs.  Outputs are compared bit for bit with the unplaced model (the same CPU arithmetic).
Where a second *real* device matters - the KV caches following their layer - the meta device plays
it; a GPU test runs the same checks across cuda:0 and the CPU when a GPU is present.
"""

from __future__ import annotations

import gc
import json
import weakref

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from unimedvl import UniMedVLConfig, load_pretrained, save_pretrained
from unimedvl.cli import app
from unimedvl.inference import UniMedVLPipeline
from unimedvl.inference.placement import (
    LAYERS,
    RETURN_UNIT,
    PlacementError,
    PlacementPlan,
    Planner,
    apply_placement,
    kv_bytes_per_layer,
    meta_model,
    parse_max_memory,
    parse_size,
    placement_units,
    plan_placement,
    resolve_plan,
    unit_sizes,
)
from unimedvl.model.quantized import Int8Linear
from unimedvl.tokenizer import Tokenizer

from conftest import random_model, tiny_config

GIB = 2**30
QUESTION = "What is shown in this image?"
TWO = {"": "cpu", f"{LAYERS}.1": "cpu:1"}  # the fixture's two layers on two placements
runner = CliRunner()


def _layer(i: int) -> str:
    return f"{LAYERS}.{i}"


# ---- (a) budgets ---------------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("20GiB", 20 * 2**30), ("64GB", 64 * 10**9), ("512MiB", 512 * 2**20), ("1.5GiB", int(1.5 * 2**30)),
    ("100", 100), ("7B", 7), ("3KB", 3000), ("3KiB", 3072), ("2TB", 2 * 10**12), ("1TiB", 2**40),
    ("8G", 8 * 2**30), ("8gib", 8 * 2**30), (" 2 MiB ", 2 * 2**20),
])
def test_sizes_in_decimal_and_binary_units(text, expected):
    assert parse_size(text) == expected


def test_max_memory_keeps_the_order_and_normalises_devices():
    budgets = parse_max_memory("cuda:0=20GiB,cpu=64GiB")
    assert budgets == {"cuda:0": 20 * GIB, "cpu": 64 * GIB} and list(budgets) == ["cuda:0", "cpu"]
    assert list(parse_max_memory("cpu=1GB, cuda=2GiB,1=3GiB")) == ["cpu", "cuda:0", "cuda:1"]
    assert parse_max_memory({"cuda:1": "1GiB", "cpu": 5}) == {"cuda:1": GIB, "cpu": 5}


@pytest.mark.parametrize("text, names", [
    ("cuda:0=20GiB;cpu=64GiB", "'cuda:0=20GiB;cpu=64GiB'"),  # wrong separator: the entry is named
    ("cuda:0", "'cuda:0'"),
    ("cuda:0=20GiB,gpu=3GiB", "'gpu=3GiB'"),
    ("cpu=12XB", "'cpu=12XB'"),
    ("cpu=0GiB", "'cpu=0GiB'"),
    ("cpu==1GiB", "'cpu==1GiB'"),
])
def test_bad_max_memory_names_the_entry_and_the_expected_form(text, names):
    with pytest.raises(PlacementError) as e:
        parse_max_memory(text)
    assert names in str(e.value) and "DEVICE=SIZE" in str(e.value) and "cuda:0=20GiB,cpu=64GiB" in str(e.value)


def test_repeated_or_empty_budgets_are_refused():
    with pytest.raises(PlacementError, match="cpu twice"):
        parse_max_memory("cpu=1GiB,cpu=2GiB")
    with pytest.raises(PlacementError, match="empty"):
        parse_max_memory(" , ")


# ---- (c) plans: budgets, order, errors ------------------------------------------------------------


@pytest.fixture(scope="module")
def meta_14b():
    return meta_model(UniMedVLConfig.from_preset("unimedvl-14b"))


def _check_rule(plan: PlacementPlan, model, headroom: float) -> None:
    """Everything outside the layers on the first device, layers contiguous and in order, every
    device within its usable budget, and each device as full as the rule makes it (the next layer
    did not fit)."""
    outside, layers = placement_units(model)
    devices = list(plan.budgets)
    assert all(plan.units[u] == devices[0] for u in outside)
    order = [devices.index(plan.units[u]) for u in layers]
    assert order == sorted(order), order  # in order, never back to an earlier device
    for d in plan.devices:
        assert plan.bytes_on(d) <= plan.budgets[d] * (1 - headroom)
    for a, b in zip(layers, layers[1:]):
        if plan.units[a] != plan.units[b]:  # a boundary: layer b did not fit beside layer a
            need = plan.sizes[b] + plan.kv[b]
            assert plan.bytes_on(plan.units[a]) + need > plan.budgets[plan.units[a]] * (1 - headroom)


def test_the_14b_plan_over_a_gpu_and_the_cpu(meta_14b):
    plan = plan_placement(meta_14b, "cuda:0=20GiB,cpu=64GiB", dtype=torch.bfloat16)
    _check_rule(plan, meta_14b, 0.10)
    assert plan.devices == ["cuda:0", "cpu"] and plan.first_device == "cuda:0"
    on_gpu = plan.layers_on("cuda:0")
    assert on_gpu == list(range(len(on_gpu))) and 0 < len(on_gpu) < 28
    assert plan.layers_on("cpu") == list(range(len(on_gpu), 28))
    # sizes are the bf16 bytes of the meta state dict; KV: 2 x 4 kv heads x 128 x 2 bytes per token
    bf16 = sum(t.numel() * 2 for t in meta_14b.state_dict().values())
    assert sum(plan.sizes.values()) == bf16
    assert plan.kv[_layer(0)] == 2 * 4 * 128 * 2 * 32768
    assert "layers 0-" in plan.describe() and "cpu: layers" in plan.describe()


def test_quantised_sizes_come_from_the_quantised_meta_tensors(meta_14b):
    int8 = meta_model(UniMedVLConfig.from_preset("unimedvl-14b"), "int8")
    full, small = unit_sizes(meta_14b, torch.bfloat16), unit_sizes(int8, torch.bfloat16)
    layer = int8.get_submodule(_layer(3))
    expected = sum(t.numel() * (1 if t.dtype == torch.int8 else 2) for t in layer.state_dict().values())
    assert small[_layer(3)] == expected and 0.45 < small[_layer(3)] / full[_layer(3)] < 0.55
    assert small["language_model.lm_head"] == full["language_model.lm_head"]  # kept in bf16
    plan = plan_placement(int8, "cuda:0=20GiB,cpu=64GiB", dtype=torch.bfloat16)
    assert plan.devices == ["cuda:0"]  # int8 fits on the one GPU the bf16 model does not fit on
    _check_rule(plan, int8, 0.10)


def test_a_model_that_does_not_fit_says_how_much_it_needs(meta_14b):
    weights = sum(t.numel() * 2 for t in meta_14b.state_dict().values())
    kv = 28 * 2 * 4 * 128 * 2 * 32768
    with pytest.raises(PlacementError) as e:
        plan_placement(meta_14b, "cuda:0=20GiB,cuda:1=8GiB", dtype=torch.bfloat16)
    message = str(e.value)
    assert f"needs {(weights + kv) / GIB:.2f} GiB" in message and "give 28.00 GiB" in message
    assert "cuda:0=20.00 GiB, cuda:1=8.00 GiB" in message
    # a smaller KV reserve and headroom, and 2 GiB more, make it fit
    plan = plan_placement(meta_14b, "cuda:0=20GiB,cuda:1=10GiB", dtype=torch.bfloat16, kv_tokens=4096, headroom=0.05)
    _check_rule(plan, meta_14b, 0.05)
    with pytest.raises(PlacementError, match="outside the decoder layers .* first device cuda:0"):
        plan_placement(meta_14b, "cuda:0=2GiB,cpu=64GiB", dtype=torch.bfloat16)


@pytest.mark.parametrize("budgets", [
    {"cpu": 80 * 2**20, "cpu:1": 20 * 2**20},
    {"cpu": 40 * 2**20, "cpu:1": 6 * 2**20, "cpu:2": 20 * 2**20},
    {"cpu": 30 * 2**20, "cpu:1": 20 * 2**20},
])
def test_small_plans_follow_the_rule(budgets):
    model = meta_model(tiny_config(llm={"num_layers": 6}))
    plan = plan_placement(model, budgets, dtype=torch.float32, kv_tokens=4096)
    _check_rule(plan, model, 0.10)


def test_explicit_plans_are_checked():
    model = meta_model(tiny_config())
    plan = resolve_plan(model, TWO)
    assert plan.units[_layer(0)] == "cpu" and plan.units[_layer(1)] == "cpu:1" and plan.first_device == "cpu"
    assert plan.device_of(f"{_layer(1)}.mlp.up_proj.weight") == "cpu:1"
    with pytest.raises(PlacementError, match="whole units"):
        resolve_plan(model, {"": "cpu", f"{_layer(1)}.mlp": "cpu:1"})
    with pytest.raises(PlacementError, match="names no part"):
        resolve_plan(model, {"": "cpu", "language_model.model.layer.1": "cpu:1"})
    with pytest.raises(PlacementError, match="one device"):
        resolve_plan(model, {"": "cpu", "vit_model": "cpu:1"})
    with pytest.raises(PlacementError, match="no device for"):
        resolve_plan(model, {LAYERS: "cpu"})
    with pytest.raises(PlacementError, match="meta device"):
        resolve_plan(model, {"": "meta"})


# ---- (b) two placements give the outputs of one --------------------------------------------------


@pytest.fixture(scope="module")
def placed(fixture_a):
    return UniMedVLPipeline.from_pretrained(fixture_a, dtype="fp32", device_map=TWO)


def _teacher_forced(pipe, image, ids):
    ctx = pipe.chat().add_user(QUESTION, [image])
    return pipe.engine.generate_text(ctx, len(ids), forced_ids=ids).logits


def test_two_placements_answer_as_one(pipe, placed, image):
    placement = placed.placement
    assert placement is not None and placement.plan.units[_layer(1)] == "cpu:1"
    forwards, crossed, returned, prepared = (placement.forwards, placement.crossings[_layer(1)],
                                             placement.crossings[RETURN_UNIT], placement.prepared["cpu:1"])
    answer = pipe.ask([image], QUESTION, temperature=0, max_new_tokens=16)
    ours = placed.ask([image], QUESTION, temperature=0, max_new_tokens=16)
    assert ours.token_ids == answer.token_ids and ours.text == answer.text
    ids = answer.token_ids + [pipe.tokenizer.special.eos]
    assert torch.equal(_teacher_forced(placed, image, ids), _teacher_forced(pipe, image, ids))
    # the activations crossed into placement cpu:1 at layer 1, and back, once per forward; layer 0 stayed
    ran = placement.forwards - forwards
    assert ran >= 2 * len(ids)
    assert placement.crossings[_layer(1)] - crossed == ran and placement.crossings[RETURN_UNIT] - returned == ran
    assert _layer(0) not in placement.crossings
    assert placement.prepared["cpu:1"] - prepared == ran  # one copy of masks/RoPE/routing per forward


def test_batched_answers_and_edits_are_the_same_too(pipe, placed, image):
    items = [([image], QUESTION), ([], "Describe a normal chest X-ray.")]
    ours = placed.ask_batch(items, max_new_tokens=8)
    assert [a.token_ids for a in ours] == [a.token_ids for a in pipe.ask_batch(items, max_new_tokens=8)]
    kwargs = dict(analyze=False, height=32, width=32, steps=3, seed=1)
    edited = placed.edit([image], "Make the lesion smaller.", **kwargs)
    assert np.array_equal(np.asarray(edited.image), np.asarray(pipe.edit([image], "Make the lesion smaller.", **kwargs).image))


def test_the_placement_keeps_no_kv_cache_alive(placed):
    ctx = placed.engine.new_context()
    placed.engine.add_text(ctx, placed.tokenizer.encode("A context that is dropped afterwards."))
    assert placed.placement._shared  # the per-device copies of this forward's inputs are kept ...
    dropped = weakref.ref(ctx)
    del ctx
    gc.collect()
    assert dropped() is None  # ... but not the caches they were built for


def test_two_placements_draw_the_same_image(pipe, placed):
    kwargs = dict(height=64, width=48, steps=4, seed=5)
    before = dict(placed.placement.prepared), placed.placement.forwards
    ours = placed.generate_image("An axial brain MRI.", **kwargs)
    theirs = pipe.generate_image("An axial brain MRI.", **kwargs)
    assert np.array_equal(np.asarray(ours.image), np.asarray(theirs.image))
    assert torch.equal(ours.latents, theirs.latents)
    # the denoising steps reuse one forward plan: its inputs reach cpu:1 once, not once per step
    forwards = placed.placement.forwards - before[1]
    prepared = placed.placement.prepared["cpu:1"] - before[0].get("cpu:1", 0)
    assert prepared < forwards


def test_auto_splits_where_the_budget_ends(fixture_a, pipe, image):
    meta = meta_model(pipe.model.config)
    sizes, kv = unit_sizes(meta, torch.float32), kv_bytes_per_layer(meta, 512, torch.float32)
    outside = sum(sizes[u] for u in placement_units(meta)[0])
    first = int((outside + sizes[_layer(0)] + kv) / 0.9) + 1024  # room for layer 0, not for layer 1
    assert first < (outside + sizes[_layer(0)] + sizes[_layer(1)] + 2 * kv) / 0.9
    planner = Planner("auto", {"cpu": first, "cpu:1": 64 * 2**20}, kv_tokens=512)
    auto = UniMedVLPipeline.from_pretrained(fixture_a, dtype="fp32", device_map=planner)
    assert auto.placement.plan.layers_on("cpu") == [0] and auto.placement.plan.layers_on("cpu:1") == [1]
    ours = auto.ask([image], QUESTION, temperature=0, max_new_tokens=12)
    assert ours.token_ids == pipe.ask([image], QUESTION, temperature=0, max_new_tokens=12).token_ids
    assert auto.placement.crossings[_layer(1)] == auto.placement.forwards > 0


@pytest.fixture(scope="module")
def four_layer_dir(tmp_path_factory, fixture_a):
    """A random 4-layer model with the fixture's tokenizer, in the official layout."""
    out = tmp_path_factory.mktemp("four_layers")
    save_pretrained(random_model(tiny_config(llm={"num_layers": 4}), seed=3), out, tokenizer=Tokenizer(fixture_a))
    return out


def test_three_placements_with_several_layers_each(four_layer_dir, image):
    plan = {"": "cpu", _layer(1): "cpu:1", _layer(2): "cpu:1", _layer(3): "cpu:2"}
    one = UniMedVLPipeline.from_pretrained(four_layer_dir, dtype="fp32")
    three = UniMedVLPipeline.from_pretrained(four_layer_dir, dtype="fp32", device_map=plan)
    a = one.ask([image], QUESTION, temperature=0, max_new_tokens=10)
    b = three.ask([image], QUESTION, temperature=0, max_new_tokens=10)
    assert b.token_ids == a.token_ids
    p = three.placement
    assert set(p.crossings) == {_layer(1), _layer(3), RETURN_UNIT}  # entering cpu:1, then cpu:2, then back
    assert all(n == p.forwards for n in p.crossings.values())
    assert p.prepared == {"cpu:1": p.forwards, "cpu:2": p.forwards}  # per device and forward, not per layer
    ga = one.generate_image("A chest X-ray.", height=32, width=32, steps=3, seed=2)
    gb = three.generate_image("A chest X-ray.", height=32, width=32, steps=3, seed=2)
    assert np.array_equal(np.asarray(ga.image), np.asarray(gb.image))
    # taking the placement off stops the hooks; the model still answers the same (all of it is on the CPU)
    p.remove()
    forwards = p.forwards
    assert three.ask([image], QUESTION, temperature=0, max_new_tokens=10).token_ids == a.token_ids
    assert p.forwards == forwards
    # an explicit plan may go back and forth: layers 1 and 3 away, 0 and 2 on the first device
    zigzag = apply_placement(three.model, {"": "cpu", _layer(1): "cpu:1", _layer(3): "cpu:1"})
    assert three.ask([image], QUESTION, temperature=0, max_new_tokens=10).token_ids == a.token_ids
    assert set(zigzag.crossings) == {_layer(1), _layer(2), _layer(3), RETURN_UNIT}
    assert all(n == zigzag.forwards for n in zigzag.crossings.values())


# ---- (d) the KV caches live with their layers ----------------------------------------------------


def test_each_layers_kv_cache_is_allocated_on_that_layers_device(fixture_a):
    """Layer 1 on the meta device (a second real device type on a CPU machine): its keys and values
    are allocated there, layer 0's stay on the CPU, and the masks reach meta once per forward."""
    pipe = UniMedVLPipeline.from_pretrained(fixture_a, dtype="fp32", visual_gen=False)
    plan = resolve_plan(pipe.model, {"": "cpu"})
    plan.units[_layer(1)] = "meta"  # past the user-facing check, which refuses meta
    placement = apply_placement(pipe.model, plan)
    assert pipe.model.get_submodule(f"{_layer(1)}.mlp.up_proj").weight.device.type == "meta"
    # meta outputs hold no data: stand in for layer 1's output before the placement brings it back
    last = pipe.model.get_submodule(_layer(1))
    last.register_forward_hook(lambda module, args, out: torch.zeros(out.shape, dtype=out.dtype), prepend=True)
    ctx = pipe.engine.new_context()
    pipe.engine.add_text(ctx, pipe.tokenizer.encode("Two tokens and more."))  # a causal split: a real mask
    pipe.engine.add_text(ctx, pipe.tokenizer.encode("Again."))
    k0, v0 = ctx.get(0)
    k1, v1 = ctx.get(1)
    assert k0.device.type == v0.device.type == "cpu" and k1.device.type == v1.device.type == "meta"
    assert k1.shape == k0.shape and k1.shape[1] == ctx.length
    assert placement.crossings[_layer(1)] == placement.prepared["meta"] == placement.forwards == 2


# ---- loading straight to the planned devices ------------------------------------------------------


def test_load_reads_each_tensor_to_its_planned_device(fixture_a):
    seen = []

    def planner(meta):
        seen.append({n for n, m in meta.named_modules() if isinstance(m, Int8Linear)})
        return {"": "cpu", _layer(1): "meta"}  # meta: proof that layer 1 never went through the CPU copy

    model, _ = load_pretrained(fixture_a, dtype="fp32", quantize="int8", device_map=planner)
    assert seen and f"{_layer(0)}.mlp.up_proj" in seen[0]  # the planner saw the quantised meta model
    assert model.get_submodule(f"{_layer(1)}.mlp.up_proj").weight.device.type == "meta"
    assert model.get_submodule(f"{_layer(1)}.mlp.up_proj").scale.device.type == "meta"  # scales with their weights
    assert model.get_submodule(f"{_layer(0)}.mlp.up_proj").weight.device.type == "cpu"
    assert model.language_model.lm_head.weight.device.type == "cpu"


# ---- (e) int8 and placement -----------------------------------------------------------------------


def test_int8_placed_equals_int8_alone(fixture_a, image):
    alone = UniMedVLPipeline.from_pretrained(fixture_a, dtype="fp32", quantize="int8", visual_gen=False)
    placed = UniMedVLPipeline.from_pretrained(fixture_a, dtype="fp32", quantize="int8", visual_gen=False, device_map=TWO)
    assert isinstance(placed.model.get_submodule(f"{_layer(1)}.self_attn.q_proj"), Int8Linear)
    a = alone.ask([image], QUESTION, temperature=0, max_new_tokens=12)
    b = placed.ask([image], QUESTION, temperature=0, max_new_tokens=12)
    assert b.token_ids == a.token_ids
    ids = a.token_ids + [alone.tokenizer.special.eos]
    assert torch.equal(_teacher_forced(placed, image, ids), _teacher_forced(alone, image, ids))
    assert placed.placement.crossings[_layer(1)] == placed.placement.forwards > 0
    # the plan counted the int8 layer: weights one byte, scales and biases four (fp32)
    layer = placed.model.get_submodule(_layer(1))
    assert placed.placement.plan.sizes[_layer(1)] == sum(t.numel() * t.element_size() for t in layer.state_dict().values())


# ---- (f) the command line -------------------------------------------------------------------------


def test_info_prints_the_plan(fixture_a):
    r = runner.invoke(app, ["info", "--model", str(fixture_a), "--device-map", "auto", "--max-memory", "cpu=30MiB,cpu:1=20MiB",
                            "--dtype", "fp32"])
    assert r.exit_code == 0, r.output
    assert "placement plan (fp32 weights)" in r.stdout
    assert "cpu: outside the decoder" in r.stdout and "cpu:1: layers 0-1 (2)" in r.stdout and "of 30.00 MiB" in r.stdout
    js = runner.invoke(app, ["info", "--model", str(fixture_a), "--max-memory", "cpu=30MiB,cpu:1=20MiB", "--dtype", "fp32",
                             "--json", "--understanding-only"])
    assert js.exit_code == 0, js.output
    placement = json.loads(js.stdout)["placement"]
    assert placement["weights"] == "fp32, understanding only" and placement["budgets"] == {"cpu": 30 * 2**20, "cpu:1": 20 * 2**20}
    assert placement["units"][_layer(1)] in ("cpu", "cpu:1") and "time_embedder" not in placement["units"]
    bad = runner.invoke(app, ["info", "--model", str(fixture_a), "--max-memory", "cpu:20GiB"])
    assert bad.exit_code == 2 and "'cpu:20GiB'" in bad.output and "DEVICE=SIZE" in bad.output
    small = runner.invoke(app, ["info", "--preset", "unimedvl-14b", "--max-memory", "cuda:0=8GiB"])
    assert small.exit_code == 2 and "does not fit" in small.output and "GiB" in small.output


def test_ask_with_a_plan_file_answers_as_without(fixture_a, tmp_path):
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(json.dumps({"units": TWO}))
    base = ["ask", str(fixture_a / "test_image.png"), "-q", QUESTION, "-m", str(fixture_a), "--dtype", "fp32",
            "--max-new-tokens", "8", "--temperature", "0", "--json"]
    plain = runner.invoke(app, base)
    placed = runner.invoke(app, base + ["--device-map", str(plan_file)])
    assert plain.exit_code == 0 and placed.exit_code == 0, placed.output
    assert json.loads(placed.stdout) == json.loads(plain.stdout)
    assert "cpu:1: layers 1" in placed.stderr
    missing = runner.invoke(app, base + ["--device-map", str(tmp_path / "nope.json")])
    assert missing.exit_code == 2 and "no such file" in missing.output


# ---- a real second device ---------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_and_cpu_placement(fixture_a, image):
    gpu = UniMedVLPipeline.from_pretrained(fixture_a, device="cuda", dtype="fp32", visual_gen=False)
    split = UniMedVLPipeline.from_pretrained(fixture_a, dtype="fp32", visual_gen=False,
                                             device_map={"": "cuda:0", _layer(1): "cpu"})
    assert split.model.device.type == "cuda"
    assert split.model.get_submodule(f"{_layer(1)}.mlp.up_proj").weight.device.type == "cpu"
    a = gpu.ask([image], QUESTION, temperature=0, max_new_tokens=12)
    b = split.ask([image], QUESTION, temperature=0, max_new_tokens=12)
    ids = a.token_ids + [gpu.tokenizer.special.eos]
    la, lb = _teacher_forced(gpu, image, ids), _teacher_forced(split, image, ids)
    assert lb.device.type == "cuda"
    assert torch.allclose(la, lb, rtol=1e-4, atol=1e-4)
    ctx = split.chat().add_user(QUESTION, [image])
    assert ctx.get(0)[0].device.type == "cuda" and ctx.get(1)[0].device.type == "cpu"
