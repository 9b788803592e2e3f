"""The inference fast path of the decoder: fused projections prepared at load, the one-call
RMSNorm and the copy-free RoPE compute what the plain layers compute, and fall back to them
whenever the fused form could no longer stand for them."""

import copy

import pytest
import torch

from unimedvl.inference import Engine, UniMedVLPipeline
from unimedvl.model.layers import FusedLinear, Linear, RMSNorm, apply_rotary, rms_norm_heads_, rotary_cos_sin
from unimedvl.model.quantized import quantize_model
from unimedvl.tokenizer import SpecialTokens
from unimedvl.training.lora import LoRAConfig, apply_lora

from conftest import random_model

SPECIAL = SpecialTokens(bos=1, eos=2, start_of_image=3, end_of_image=4)


def _layers(bias: bool, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    owner = torch.nn.Module()
    owner.q, owner.k, owner.v = Linear(32, 16, bias=bias), Linear(32, 8, bias=bias), Linear(32, 8, bias=bias)
    return owner


def _separate(owner, x):
    return torch.cat([owner.q(x), owner.k(x), owner.v(x)], dim=-1)


@pytest.mark.parametrize("bias", [True, False])
def test_fused_product_equals_the_separate_layers_without_a_second_copy(bias):
    owner = _layers(bias)
    before = {k: v.clone() for k, v in owner.state_dict().items()}
    x = torch.randn(7, 32)
    expected = _separate(owner, x)
    fused = FusedLinear.of(owner, ["q", "k", "v"])
    assert fused is not None
    with torch.no_grad():
        torch.testing.assert_close(fused(x), expected, rtol=1e-6, atol=1e-6)
    # same names, same values; each weight is a row block of the fused tensor (no second copy)
    after = owner.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    row = 32 * fused.weight.element_size()
    assert owner.q.weight.data_ptr() == fused.weight.data_ptr()
    assert owner.k.weight.data_ptr() == fused.weight.data_ptr() + 16 * row
    assert owner.v.weight.data_ptr() == fused.weight.data_ptr() + 24 * row


def test_in_place_updates_reach_the_fused_product():
    owner = _layers(True)
    fused = FusedLinear.of(owner, ["q", "k", "v"])
    other = _layers(True, seed=1)
    owner.load_state_dict(other.state_dict())  # copies into the views
    x = torch.randn(5, 32)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), _separate(other, x), rtol=1e-6, atol=1e-6)


def test_fused_product_steps_aside_when_it_cannot_stand_for_the_layers():
    x = torch.randn(5, 32)
    owner = _layers(True)
    fused = FusedLinear.of(owner, ["q", "k", "v"])
    # gradients wanted: the fused weight is not a parameter, so the layers must run themselves
    assert fused(x) is None
    with torch.no_grad():
        assert fused(x) is not None
        owner.to(torch.float64)  # the layers get tensors of their own
        assert fused(x.double()) is None
    owner = _layers(True)
    fused = FusedLinear.of(owner, ["q", "k", "v"])
    owner.k = Linear(32, 8)  # a layer replaced (as LoRA or quantisation do)
    with torch.no_grad():
        assert fused(x) is None
    mixed = _layers(True)
    mixed.v = Linear(32, 8, bias=False)
    assert FusedLinear.of(mixed, ["q", "k", "v"]) is None  # bias on some layers only


def _query_velocity(model, seed=0):
    engine = Engine(model, SPECIAL)
    ctx = engine.new_context()
    engine.add_text(ctx, [10, 11, 12, 13])
    x = torch.randn(4, model.config.patch_latent_dim, generator=torch.Generator().manual_seed(seed))
    from unimedvl.inference.sampling import velocities

    return velocities(engine, [ctx, engine.new_context()], x, 0.7, (2, 2))


def test_engine_fuses_and_its_outputs_equal_the_unfused_model():
    plain = random_model(seed=5)
    reference = copy.deepcopy(plain)
    got = _query_velocity(plain)  # the Engine fuses plain's projections
    attn = plain.language_model.model.layers[0].self_attn
    assert attn.qkv["_moe_gen"] is not None and attn.qkv[""] is not None
    assert attn.q_proj_moe_gen.weight.data_ptr() == attn.qkv["_moe_gen"].weight.data_ptr()
    # the reference never fuses: the same forward through the separate layers
    reference.fuse_projections = lambda: None
    expected = _query_velocity(reference)
    assert reference.language_model.model.layers[0].self_attn.qkv == {}
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_file_backed_weights_are_left_unfused(fixture_a):
    """Zero-copy weights stay in the file mapping, where the page cache can drop them: fusing would
    copy them into private memory.  A cast copy is the model's own memory and is fused."""
    mapped = UniMedVLPipeline.from_pretrained(fixture_a, dtype="bf16")  # the fixture stores bf16: zero-copy
    attn = mapped.model.language_model.model.layers[0].self_attn
    assert not attn.q_proj_moe_gen.weight.untyped_storage().resizable()  # borrowed from the mapping
    assert attn.qkv["_moe_gen"] is None and mapped.model.language_model.model.layers[0].mlp.gate_up is None
    cast = UniMedVLPipeline.from_pretrained(fixture_a, dtype="fp32")
    assert cast.model.language_model.model.layers[0].self_attn.qkv["_moe_gen"] is not None


def test_lora_and_quantised_layers_are_left_unfused():
    lora = random_model(seed=6)
    apply_lora(lora, LoRAConfig(rank=4, alpha=8, targets=(r"self_attn\.(q|k|v)_proj$", r"mlp\.gate_proj$")))
    lora.fuse_projections()
    layer = lora.language_model.model.layers[0]
    assert layer.self_attn.qkv[""] is None and layer.mlp.gate_up is None
    assert layer.self_attn.qkv["_moe_gen"] is not None and layer.mlp_moe_gen.gate_up is not None  # untouched expert
    quant = random_model(seed=6)
    quantize_model(quant, "int8")
    quant.fuse_projections()
    assert quant.language_model.model.layers[0].self_attn.qkv["_moe_gen"] is None


@pytest.mark.parametrize("rows", [33, 600])  # 600 x 64: above the one-pass form's size in eager float32
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_keeps_the_qwen2_rounding_order(dtype, rows):
    norm = RMSNorm(64).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(64) + 0.5)
    x = (torch.randn(rows, 64) * 3).to(dtype)
    xf = x.float()
    normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + norm.eps)).to(dtype)
    expected = norm.weight * normed  # normalise in fp32, round to the input dtype, then scale
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            if dtype == torch.float32 and not grad and rows == 600:
                # eager float32 CPU inference takes the mean of squares from one vector_norm pass:
                # the same value to a few float32 roundings, not bit for bit
                torch.testing.assert_close(norm(x), expected, rtol=1e-6, atol=0)
            else:
                assert torch.equal(norm(x), expected), (dtype, grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_per_head_norm_in_place_equals_separate_norms(dtype):
    # the fused q/k/v product [n, hq + 2*hkv, d]: q and k heads normed in place, v untouched
    n, hq, hkv, d = 600, 4, 2, 16  # q and k heads: 600 x 6 x 16, above the one-pass form's size
    qkv = (torch.randn(n, hq + 2 * hkv, d) * 3).to(dtype)
    wq, wk = (torch.rand(d) + 0.5).to(dtype), (torch.rand(d) + 0.5).to(dtype)
    expected_q, expected_k = (RMSNorm(d), RMSNorm(d))
    with torch.no_grad():
        expected_q.weight.copy_(wq)
        expected_k.weight.copy_(wk)
        q, k = expected_q.to(dtype)(qkv[:, :hq]), expected_k.to(dtype)(qkv[:, hq : hq + hkv])
        v = qkv[:, hq + hkv :].clone()
        out = rms_norm_heads_(qkv[:, : hq + hkv], (wq, wk), (hq, hkv), 1e-6)
    assert out.data_ptr() == qkv.data_ptr()  # in place, in the product's own memory
    tol = dict(rtol=1e-6, atol=1e-7) if dtype == torch.float32 else dict(rtol=0, atol=0)
    torch.testing.assert_close(qkv[:, :hq], q, **tol)
    torch.testing.assert_close(qkv[:, hq : hq + hkv], k, **tol)
    assert torch.equal(qkv[:, hq + hkv :], v)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.bfloat16, 2e-2)])
def test_inference_rope_equals_the_autograd_formula_on_strided_input(dtype, tol):
    n, heads, d = 9, 5, 16
    cos, sin = rotary_cos_sin(torch.arange(3, 3 + n), d, 1e6, dtype)
    block = torch.randn(n, heads + 3, d).to(dtype)
    x = block[:, 1 : 1 + heads]  # a strided view, as q/k of the fused q/k/v product are
    half = d // 2
    expected = x * cos[:, None] + torch.cat([-x[..., half:], x[..., :half]], -1) * sin[:, None]
    with torch.no_grad():
        got = apply_rotary(x, cos, sin)
    assert got.is_contiguous() and got.shape == x.shape
    torch.testing.assert_close(got.float(), expected.float(), rtol=tol, atol=tol)
    # the autograd branch (training) computes the same rotation as the inference branch
    leaf = x.detach().clone().requires_grad_()
    trained = apply_rotary(leaf, cos, sin)
    assert trained.requires_grad
    torch.testing.assert_close(trained.detach().float(), got.float(), rtol=tol, atol=tol)
