"""Training options: FLOP accounting, activation checkpointing, bf16 autocast, plan-level LoRA."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from unimedvl import UniMedVL, UniMedVLConfig
from unimedvl.image_transforms import ImageTransform
from unimedvl.tokenizer import BUNDLED_TINY_TOKENIZER, SpecialTokens, Tokenizer
from unimedvl.training import DropoutConfig, PlanItem, build_batch, training_losses
from unimedvl.training.flops import attention_flops, linear_flops
from unimedvl.training.lora import LoRAConfig
from unimedvl.training.parallelize import apply_activation_checkpointing, is_activation_checkpointed, transformer_layers
from unimedvl.training.plan import PlanError, parse_plan, with_overrides
from unimedvl.precision import training_compute
from unimedvl.training.trainer import Trainer

from test_training_loop import demo_plan


def _batch(model):
    v = model.config.llm.vocab_size
    special = SpecialTokens(v - 4, v - 3, v - 2, v - 1)
    rng = np.random.default_rng(0)
    plans = [
        [PlanItem("vit", pixels=rng.integers(0, 255, (56, 42, 3), dtype=np.uint8)), PlanItem("text", ids=list(range(10, 30))),
         PlanItem("text", ids=list(range(20, 60)), loss=True)],
        [PlanItem("text", ids=list(range(30, 60))), PlanItem("vae", pixels=rng.integers(0, 255, (64, 48, 3), dtype=np.uint8), loss=True)],
    ]
    return build_batch(model, plans, ["understanding", "generation"], special, generator=torch.Generator().manual_seed(0),
                       vit_transform=ImageTransform(56, 28, 14), vae_transform=ImageTransform(64, 32, 16), dropout=DropoutConfig(0, 0, 0))


def test_flop_count_matches_torch_flop_counter():
    """The analytic count against torch's FlopCounterMode on a real forward + backward (math SDPA,
    so attention shows up as bmm): attention exactly, linear layers within 5% (the counter skips
    the input gradients of the first layers, which need none)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    model = UniMedVL.from_config(UniMedVLConfig.from_preset("tiny"), seed=0).train()
    tb = _batch(model)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        training_losses(model, tb).total.backward()
    counts = counter.get_flop_counts()["Global"]
    aten = torch.ops.aten
    assert attention_flops(model.config, tb.batch) == counts[aten.bmm]
    measured_linear = counts[aten.mm] + counts[aten.addmm]
    assert linear_flops(model.config, tb.batch, tb.labels.numel()) == pytest.approx(measured_linear, rel=0.05)


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    """Applied from outside the model (composable ``checkpoint`` on every decoder and ViT layer):
    the parameter names stay, far fewer activations are kept, every layer runs its forward a second
    time in the backward, and the loss and gradients are those of the plain model."""
    def grads(checkpointing):
        model = UniMedVL.from_config(UniMedVLConfig.from_preset("tiny"), seed=0).train()
        with torch.no_grad():
            model.llm2vae.weight.normal_(0, 0.02, generator=torch.Generator().manual_seed(1))  # non-zero, so every layer receives a flow gradient
        names, keys = [n for n, _ in model.named_parameters()], list(model.state_dict())
        if checkpointing:
            apply_activation_checkpointing(model)
        assert [n for n, _ in model.named_parameters()] == names and list(model.state_dict()) == keys
        layers = transformer_layers(model)
        assert len(layers) == model.config.llm.num_layers + model.config.vit.num_layers
        assert [is_activation_checkpointed(layer) for layer in layers] == [checkpointing] * len(layers)
        calls = [0] * len(layers)  # forward calls per layer; a recomputation in the backward is one more
        for i, layer in enumerate(layers):
            layer.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
        tb = _batch(model)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            loss = training_losses(model, tb).total
        kept[checkpointing] = sum(saved)
        assert calls == [1] * len(layers)
        loss.backward()
        assert calls == [2 if checkpointing else 1] * len(layers)  # each layer recomputed once, ViT included
        return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    kept = {}
    loss_a, ga = grads(False)
    loss_b, gb = grads(True)
    assert loss_a == loss_b
    assert kept[True] < 0.5 * kept[False]  # the layers' activations are recomputed, not kept
    assert ga.keys() == gb.keys() and any("language_model.model.layers.0." in k for k in ga)
    assert any("vision_model.encoder.layers.0." in k for k in ga)
    for k in ga:
        assert torch.allclose(ga[k], gb[k], rtol=1e-5, atol=1e-7), k


def test_bf16_autocast_trains_close_to_fp32_and_keeps_fp32_master_weights(demo_dataset, tmp_path):
    tok = Tokenizer(BUNDLED_TINY_TOKENIZER)
    rows = {}
    for precision in ("fp32", "bf16"):
        plan = dataclasses.replace(demo_plan(3), precision=precision)
        model = UniMedVL.from_config(UniMedVLConfig.from_preset("tiny"), seed=0)
        trainer = Trainer(plan, demo_dataset, tmp_path / precision, model=model, tokenizer=tok, tensorboard=False)
        assert trainer.precision == precision
        assert not any(is_activation_checkpointed(layer) for layer in transformer_layers(model))  # the plan leaves it off
        trainer.run(max_steps=2, checkpoint_at_end=False)
        rows[precision] = [json.loads(x) for x in (tmp_path / precision / "metrics.jsonl").read_text().splitlines()]
        assert all(p.dtype == torch.float32 for p in model.parameters())
        assert all(v.dtype == torch.float32 for v in trainer.ema.values())
    for a, b in zip(rows["fp32"], rows["bf16"]):
        assert b["loss"] == pytest.approx(a["loss"], rel=0.05)
        assert b["loss"] != a["loss"]  # autocast did run in bf16
    assert training_compute("auto", torch.device("cpu")) == "fp32"
    assert training_compute("auto", torch.device("cuda")) == "bf16"


def test_plan_level_options_are_validated_and_lora_from_the_plan_trains_adapters_only(demo_dataset, tmp_path):
    import yaml

    from unimedvl.training.lora import LoRALinear
    from unimedvl.training.plan import PLANS_DIR

    doc = yaml.safe_load((PLANS_DIR / "demo.yaml").read_text())
    for bad, message in ((dict(precision="fp16"), "precision must be one of"),
                         (dict(activation_checkpointing="yes"), "activation_checkpointing must be true or false"),
                         (dict(lora={"rank": 4, "layers": []}), "lora takes rank, alpha and targets"),
                         (dict(lora={"rank": -1}), "lora rank must be >= 0")):
        with pytest.raises(PlanError, match=message):
            parse_plan({**doc, **bad}, "my.yaml")
    plan = parse_plan({**doc, "lora": {"rank": 2, "alpha": 4, "targets": [r"mlp_moe_gen\.down_proj$"]}, "activation_checkpointing": True})
    assert plan.lora == LoRAConfig(2, 4.0, (r"mlp_moe_gen\.down_proj$",)) and plan.activation_checkpointing
    assert parse_plan({**doc, "lora": {"rank": 0}}).lora is None
    # command-line overrides go through the same checks
    assert with_overrides(plan, lora_rank=8).lora == LoRAConfig(8, 4.0, (r"mlp_moe_gen\.down_proj$",))
    assert with_overrides(plan, lora_rank=0).lora is None
    assert with_overrides(parse_plan(doc), lora_rank=4).lora == LoRAConfig(4)  # default targets: the generation expert's attention
    with pytest.raises(PlanError, match="command line: precision must be one of"):
        with_overrides(plan, precision="fp8")
    plan = dataclasses.replace(plan, autoencoder=None, stages=tuple(dataclasses.replace(s, steps=1) for s in plan.stages))
    model = UniMedVL.from_config(UniMedVLConfig.from_preset("tiny"), seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = Trainer(plan, demo_dataset, tmp_path / "run", model=model, tokenizer=Tokenizer(BUNDLED_TINY_TOKENIZER), tensorboard=False)
    assert all(is_activation_checkpointed(layer) for layer in transformer_layers(model))  # the plan turns it on
    wrapped = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    assert wrapped and all(n.endswith("mlp_moe_gen.down_proj") for n in wrapped)
    trainer.run(max_steps=2, checkpoint_at_end=False)
    after = {k.replace(".base.", "."): v for k, v in model.state_dict().items() if "lora_" not in k}
    assert all(torch.equal(before[k], after[k]) for k in before)
