"""Denoising steps run each decoder layer as one function of tensors (context_query_layer), eagerly
or compiled: it computes what the layer modules compute, it is used exactly when it can stand for
them, and the compiled form (torch.compile, fullgraph) equals the eager one.  Also the few-row
float32 products that the image markers' rows go through."""

import shutil

import pytest
import torch
import torch.nn.functional as F

from unimedvl.inference import Engine, UniMedVLPipeline
from unimedvl.inference.compilation import CompilationUnavailable, compile_denoising, compiler_problem, is_compiled, uncompile_denoising
from unimedvl.inference.sampling import velocities
from unimedvl.model.layers import FEW_ROWS, linear
from unimedvl.model.quantized import quantize_model
from unimedvl.tokenizer import SpecialTokens
from unimedvl.training.lora import LoRAConfig, apply_lora

from conftest import random_model

SPECIAL = SpecialTokens(bos=1, eos=2, start_of_image=3, end_of_image=4)
needs_compiler = pytest.mark.skipif(compiler_problem(torch.device("cpu")) is not None, reason="no C++ compiler for torch.compile")


class CountingLayer:
    """Stands in for the model's layer function and counts its calls."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.fn(*args, **kwargs)


def _spy(model) -> CountingLayer:
    lm = model.language_model.model
    spy = CountingLayer(lm.context_query_layer)
    lm.context_query_layer = spy
    return spy


def _step(engine, branches: int, seed: int = 0, grid=(2, 3)):
    """Velocities of one denoising step guided by ``branches`` contexts of different lengths."""
    contexts = []
    for b in range(branches):
        ctx = engine.new_context()
        if b < 2:
            engine.add_text(ctx, [10, 11, 12, 13, 14][: 5 - 2 * b])  # 5 and 3 tokens; a third branch stays empty
        contexts.append(ctx)
    x = torch.randn(grid[0] * grid[1], engine.config.patch_latent_dim, generator=torch.Generator().manual_seed(seed))
    return velocities(engine, contexts, x, 0.6, grid)


def _module_path(model):
    """The same model with the layer function refused, so that its layers run as modules."""
    model.language_model.model.context_query_weights = lambda routing, plan: None
    return model


@pytest.mark.parametrize("branches", [1, 2, 3])
def test_denoising_step_runs_the_layer_function_and_equals_the_module_path(branches):
    model = random_model(seed=3)
    engine = Engine(model, SPECIAL)
    spy = _spy(model)
    got = _step(engine, branches)
    assert spy.calls == model.config.llm.num_layers  # one call per layer, none through the modules
    expected = _step(Engine(_module_path(random_model(seed=3)), SPECIAL), branches)
    for a, b in zip(got, expected, strict=True):
        assert a.abs().max() > 0.1  # random weights: the velocities are not trivially zero
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_layer_function_in_bf16_equals_the_module_path_to_bf16_rounding():
    model = random_model(seed=4, dtype=torch.bfloat16)
    engine = Engine(model, SPECIAL)
    spy = _spy(model)
    got = _step(engine, 2)
    assert spy.calls == model.config.llm.num_layers  # the bf16 step did run through the function
    expected = _step(Engine(_module_path(random_model(seed=4, dtype=torch.bfloat16)), SPECIAL), 2)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)


def test_layer_function_is_used_only_where_it_stands_for_the_layers():
    model = random_model(seed=5)
    engine = Engine(model, SPECIAL)
    spy = _spy(model)
    ctx = engine.new_context()
    engine.add_text(ctx, [10, 11, 12])  # a prompt: understanding tokens that join the context
    assert spy.calls == 0
    from unimedvl.inference.sampling import DenoisingQuery

    plan = DenoisingQuery(engine, [ctx, engine.new_context()], (2, 2)).plan
    lm = model.language_model.model
    with torch.no_grad():
        assert lm.context_query_weights(plan.routing, plan.attention) is not None
    with torch.enable_grad():  # gradients wanted (training): the modules run
        assert lm.context_query_weights(plan.routing, plan.attention) is None
    # a hook on a layer (device placement, checkpointing): the modules run, so that it fires
    fired = []
    handle = model.language_model.model.layers[0].register_forward_pre_hook(lambda m, a: fired.append(1))
    _step(engine, 2)
    assert spy.calls == 0 and fired
    handle.remove()
    _step(engine, 2)
    assert spy.calls == model.config.llm.num_layers


@pytest.mark.parametrize("change", ["int8", "lora"])
def test_replaced_layers_keep_the_module_path_and_the_step_still_works(change):
    model = random_model(seed=6)
    if change == "int8":
        quantize_model(model, "int8")
    else:
        apply_lora(model, LoRAConfig(rank=4, alpha=8, targets=(r"mlp\.down_proj$",)))  # the understanding expert's
    engine = Engine(model, SPECIAL)
    spy = _spy(model)
    out = _step(engine, 2)
    assert spy.calls == 0 and all(torch.isfinite(v).all() for v in out)


@pytest.mark.parametrize("rows", [1, 2, 4, 17, FEW_ROWS, FEW_ROWS + 1])
@pytest.mark.parametrize("bias", [True, False])
def test_few_row_products_equal_f_linear(rows, bias):
    g = torch.Generator().manual_seed(rows)
    weight = torch.randn(40, 24, generator=g)
    b = torch.randn(40, generator=g) if bias else None
    x = torch.randn(rows, 1, 24, generator=g)  # a leading batch shape, as packed callers pass
    got = linear(x, weight, b)
    assert got.shape == (rows, 1, 40) and got.is_contiguous()
    torch.testing.assert_close(got, F.linear(x, weight, b), rtol=1e-5, atol=1e-5)
    # differentiable like F.linear (LoRA and fine-tuning on a CPU run through it)
    w = weight.clone().requires_grad_()
    linear(x, w, b).square().sum().backward()
    w2 = weight.clone().requires_grad_()
    F.linear(x, w2, b).square().sum().backward()
    torch.testing.assert_close(w.grad, w2.grad, rtol=1e-4, atol=1e-4)


# ---- compiled ------------------------------------------------------------------------------------


@needs_compiler
def test_compiled_step_equals_the_eager_step_for_each_guidance_shape():
    model = random_model(seed=7)
    engine = Engine(model, SPECIAL)
    eager = {b: _step(engine, b) for b in (1, 2, 3)}
    compile_denoising(model)
    assert is_compiled(model)
    torch._dynamo.utils.counters.clear()
    for b in (2, 3, 1, 2):  # three graphs (the branch count is structure); the repeat reuses one
        for got, expected in zip(_step(engine, b), eager[b], strict=True):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 3
    uncompile_denoising(model)
    assert not is_compiled(model)


@needs_compiler
def test_compiled_pipeline_draws_the_eager_image(fixture_a):
    eager = UniMedVLPipeline.from_pretrained(fixture_a, dtype="fp32")
    compiled = UniMedVLPipeline.from_pretrained(fixture_a, dtype="fp32", compile=True)
    assert is_compiled(compiled.model) and not is_compiled(eager.model)
    kwargs = dict(height=32, width=32, seed=3, steps=3)
    a, b = eager.generate_image("Axial CT image", **kwargs), compiled.generate_image("Axial CT image", **kwargs)
    torch.testing.assert_close(b.latents, a.latents, rtol=1e-4, atol=1e-4)


def test_missing_compiler_is_refused_before_loading(fixture_a, monkeypatch):
    import torch._inductor.cpp_builder as cpp_builder

    def no_compiler():
        raise RuntimeError("no compiler")

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", no_compiler)
    problem = compiler_problem(torch.device("cpu"))
    assert problem is not None and "C++ compiler" in problem and "without --compile" in problem
    model = random_model(seed=8)
    with pytest.raises(CompilationUnavailable, match="C\\+\\+ compiler"):
        compile_denoising(model)
    assert not is_compiled(model)
    with pytest.raises(CompilationUnavailable):
        UniMedVLPipeline.from_pretrained(fixture_a, dtype="fp32", compile=True)


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("clang++") is None, reason="no C++ compiler")
def test_compiler_found_where_one_is_installed():
    assert compiler_problem(torch.device("cpu")) is None


@pytest.mark.parametrize("heads,kv_heads", [(8, 2), (4, 4)])
def test_context_attention_matches_attention_written_out_per_head(heads, kv_heads):
    """Each query head h reads key/value head h // (heads / kv_heads), over its sample's context
    and its own block; written out with softmax per head (grouped queries are stacked per key/value
    head on CPUs, which must not change which head reads which)."""
    from unimedvl.model.attention import attend_contexts

    g, d, lengths = torch.Generator().manual_seed(0), 16, [5, 3]
    q = torch.randn(sum(lengths), heads, d, generator=g)
    k, v = torch.randn(sum(lengths), kv_heads, d, generator=g), torch.randn(sum(lengths), kv_heads, d, generator=g)
    contexts = [(torch.randn(kv_heads, 4, d, generator=g), torch.randn(kv_heads, 4, d, generator=g)), (None, None)]
    out = attend_contexts(q, k, v, contexts, lengths, d**-0.5)
    start = 0
    for (ck, cv), n in zip(contexts, lengths):
        for h in range(heads):
            j = h // (heads // kv_heads)
            keys, values = k[start : start + n, j], v[start : start + n, j]  # [n, d]
            if ck is not None:
                keys, values = torch.cat([ck[j], keys]), torch.cat([cv[j], values])
            expected = torch.softmax(q[start : start + n, h] @ keys.T * d**-0.5, dim=-1) @ values
            torch.testing.assert_close(out[start : start + n, h], expected, rtol=1e-5, atol=1e-6)
        start += n
