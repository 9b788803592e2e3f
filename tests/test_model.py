"""Behaviour of the network: KV-cached inference equals the full forward, packed samples are
isolated, the attention rules of each split hold, and tokens are routed to the right expert."""

import pytest
import torch

from unimedvl.inference import Engine
from unimedvl.model.patching import patchify, unpatchify
from unimedvl.model.packing import PackedBatchBuilder
from unimedvl.tokenizer import SpecialTokens
from unimedvl.inference.sampling import velocities

from conftest import random_model

SPECIAL = SpecialTokens(bos=1, eos=2, start_of_image=3, end_of_image=4)


@pytest.fixture(scope="module")
def model():
    return random_model(seed=3)


def _pixels(h, w, seed):
    return torch.rand(3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _latents(n, seed, dim=64):
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))


def test_kv_cached_incremental_forward_equals_full_forward(model):
    image = _pixels(28, 42, 0)  # 2 x 3 ViT patches
    latent = _latents(4, 1)  # a clean 2 x 2 latent image
    text1, text2, decode = [10, 11, 12, 13], [20, 21, 22], [30, 31, 32]

    # Full forward: one packed sample holding everything, the decoded tokens as a causal text split.
    b = PackedBatchBuilder(model.config, SPECIAL)
    b.add_vit_image(image)
    b.add_text(text1)
    b.add_latent_image(latent, (2, 2), 0.0, noisy=False)
    b.add_text(text2)
    idx = b.add_tokens([SPECIAL.bos, *decode], logits=True)
    with torch.no_grad():
        full = model(b.build())

    # Incremental: context updates block by block, then one token per step.
    engine = Engine(model, SPECIAL)
    ctx = engine.new_context()
    engine.add_vit_image(ctx, image)
    engine.add_text(ctx, text1)
    engine.add_latent_tokens(ctx, latent, (2, 2))
    engine.add_text(ctx, text2)
    assert ctx.length == idx[0] and ctx.rope == 1 + 6 + 1 + 5
    gen = engine.generate_text(ctx, len(decode) + 1, forced_ids=decode + [0])
    torch.testing.assert_close(gen.logits, full.logits, rtol=1e-4, atol=1e-4)
    assert ctx.length == idx[0], "decoding must not modify the context it starts from"


def test_denoising_query_through_cache_equals_full_forward(model):
    """A noisy block attends to the cached context exactly as in a full packed forward."""
    text, x = [5, 6, 7, 8], _latents(6, 2)
    b = PackedBatchBuilder(model.config, SPECIAL)
    b.add_text(text)
    b.add_latent_image(x, (2, 3), 0.7, noisy=True)
    with torch.no_grad():
        full = model(b.build())
    engine = Engine(model, SPECIAL)
    ctx = engine.new_context()
    engine.add_text(ctx, text)
    (v,) = velocities(engine, [ctx], x, 0.7, (2, 3))
    torch.testing.assert_close(v, full.velocities, rtol=1e-4, atol=1e-4)
    assert ctx.length == len(text) + 2, "the denoising query must not be written to the cache"


def test_batched_guidance_branches_equal_separate_forwards(model):
    engine = Engine(model, SPECIAL)
    c1, c2 = engine.new_context(), engine.new_context()
    engine.add_text(c1, [9, 10, 11])
    engine.add_vit_image(c2, _pixels(28, 28, 4))
    x = _latents(4, 5)
    together = velocities(engine, [c1, c2, engine.new_context()], x, 0.5, (2, 2))
    alone = [velocities(engine, [c], x, 0.5, (2, 2))[0] for c in (c1, c2, engine.new_context())]
    for a, b in zip(together, alone):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(together[0], together[1], atol=1e-3), "contexts must change the velocity"


def _two_sample_batch(model, second_text, backend_latent_seed=7):
    b = PackedBatchBuilder(model.config, SPECIAL)
    b.new_sample()
    b.add_vit_image(_pixels(28, 28, 8))
    i1 = b.add_text([40, 41, 42], logits=True)
    b.add_latent_image(_latents(4, backend_latent_seed), (2, 2), 0.5, noisy=True)
    b.new_sample()
    b.add_text(second_text, logits=True)
    b.add_latent_image(_latents(4, 9), (2, 2), 0.3, noisy=True)
    return b.build(), len(i1)


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_packed_samples_do_not_attend_across(model, backend):
    batch_a, n1 = _two_sample_batch(model, [50, 51, 52, 53])
    batch_b, _ = _two_sample_batch(model, [60, 61, 62, 63])
    with torch.no_grad():
        out_a = model(batch_a, attention_backend=backend)
        out_b = model(batch_b, attention_backend=backend)
    n_first = batch_a.layout.sample_lengths[0]
    torch.testing.assert_close(out_a.hidden[:n_first], out_b.hidden[:n_first], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_a.logits[:n1], out_b.logits[:n1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_a.velocities[:4], out_b.velocities[:4], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out_a.hidden[n_first:], out_b.hidden[n_first:], atol=1e-3)


def test_flex_backend_equals_sdpa(model):
    batch, _ = _two_sample_batch(model, [50, 51, 52, 53])
    with torch.no_grad():
        a = model(batch, attention_backend="sdpa")
        b = model(batch, attention_backend="flex")
    torch.testing.assert_close(a.hidden, b.hidden, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_noise_split_is_hidden_from_other_splits(model, backend):
    """Later text must not see a noisy block; the noisy block must see the earlier text."""

    def run(latent_seed, first_text):
        b = PackedBatchBuilder(model.config, SPECIAL)
        b.add_text(first_text)
        b.add_latent_image(_latents(4, latent_seed), (2, 2), 0.8, noisy=True)
        later = b.add_text([70, 71, 72], logits=True)
        with torch.no_grad():
            return model(b.build(), attention_backend=backend), later

    base, later = run(1, [10, 11])
    other_noise, _ = run(2, [10, 11])
    other_text, _ = run(1, [12, 13])
    torch.testing.assert_close(base.logits, other_noise.logits, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(base.velocities, other_text.velocities, atol=1e-3)
    # The noisy block does not advance the RoPE counter: the later text starts at position 4 + 0.
    b = PackedBatchBuilder(model.config, SPECIAL)
    b.add_text([10, 11])
    b.add_latent_image(_latents(4, 1), (2, 2), 0.8, noisy=True)
    b.add_text([70])
    assert b.build().position_ids.tolist() == [0, 1, 2, 3] + [4] * 6 + [4, 5, 6]


def test_causal_text_does_not_see_future_tokens(model):
    def logits(tokens):
        b = PackedBatchBuilder(model.config, SPECIAL)
        b.add_tokens(tokens, logits=True)
        with torch.no_grad():
            return model(b.build()).logits

    a, b = logits([5, 6, 7, 8]), logits([5, 6, 7, 9])
    torch.testing.assert_close(a[:3], b[:3], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(a[3], b[3], atol=1e-3)


def test_latent_tokens_use_the_generation_expert_only(model):
    """Perturbing generation-expert weights changes velocities but not text-only logits."""
    engine = Engine(model, SPECIAL)
    ctx = engine.new_context()
    engine.add_text(ctx, [10, 11, 12])
    x = _latents(4, 3)
    before_logits = engine.generate_text(ctx, 3, forced_ids=[5, 6, 7]).logits
    before_v = velocities(engine, [ctx], x, 0.5, (2, 2))[0]
    saved = {n: p.detach().clone() for n, p in model.named_parameters() if "_moe_gen" in n}
    try:
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "_moe_gen" in n:
                    p.add_(0.05 * torch.randn_like(p))
        ctx2 = engine.new_context()
        engine.add_text(ctx2, [10, 11, 12])
        after_logits = engine.generate_text(ctx2, 3, forced_ids=[5, 6, 7]).logits
        after_v = velocities(engine, [ctx2], x, 0.5, (2, 2))[0]
    finally:
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in saved:
                    p.copy_(saved[n])
    torch.testing.assert_close(before_logits, after_logits)
    assert not torch.allclose(before_v, after_v, atol=1e-4)


def test_patchify_round_trip_and_order():
    x = torch.arange(2 * 4 * 6, dtype=torch.float32).reshape(2, 4, 6)
    tokens = patchify(x, 2)
    assert tokens.shape == (6, 8)
    # token 1 = patch (row 0, col 1); its first entries are pixel (0, 2) channels 0 and 1.
    assert tokens[1, :2].tolist() == [x[0, 0, 2].item(), x[1, 0, 2].item()]
    torch.testing.assert_close(unpatchify(tokens, 2, 3, 2), x)


def test_builder_positions_follow_the_layout_rules(model):
    b = PackedBatchBuilder(model.config, SPECIAL)
    b.add_latent_image(_latents(4, 0), (2, 2), 0.0, noisy=False)
    b.add_vit_image(_pixels(14, 28, 0))
    b.add_text([7, 8])
    batch = b.build()
    assert batch.position_ids.tolist() == [0] * 6 + [1] * 4 + [2, 3, 4, 5]
    assert [s.mode for s in batch.layout.samples[0]] == ["full", "full", "causal"]
    assert batch.token_ids.tolist() == [3, 4, 3, 4, 1, 7, 8, 2]
    assert batch.latent_position_ids.tolist() == [0, 1, 64, 65]
    assert batch.vit_position_ids.tolist() == [0, 1]


def test_kv_cache_forks_are_copy_on_write():
    """Forks share storage until one of them writes past the shared prefix; neither sees the other's rows."""
    from unimedvl.model import KVCache

    cache = KVCache(1)
    k = lambda n, fill: torch.full((2, n, 4), float(fill))  # noqa: E731
    cache.extend(0, k(3, 1), k(3, 1), commit=True)
    cache.advance(3)
    fork = cache.fork()
    fork.extend(0, k(2, 2), k(2, 2), commit=True)
    fork.advance(2)
    cache.extend(0, k(1, 3), k(1, 3), commit=True)  # must not overwrite the fork's rows
    cache.advance(1)
    fk, _ = fork.get(0)
    ck, _ = cache.get(0)
    assert fk[0, :, 0].tolist() == [1, 1, 1, 2, 2]
    assert ck[0, :, 0].tolist() == [1, 1, 1, 3]
    # Scratch rows (a denoising query) never become part of the context.
    keys, _ = cache.extend(0, k(5, 9), k(5, 9), commit=False)
    assert keys.shape[1] == 9 and cache.length == 4
    assert cache.get(0)[0][0, :, 0].tolist() == [1, 1, 1, 3]
    assert fork.get(0)[0][0, :, 0].tolist() == [1, 1, 1, 2, 2]
    # Growth past the initial capacity keeps the content.
    for i in range(KVCache.MIN_CAPACITY + 10):
        cache.extend(0, k(1, i), k(1, i), commit=True)
        cache.advance(1)
    assert cache.length == 4 + KVCache.MIN_CAPACITY + 10
    assert cache.get(0)[0][0, :5, 0].tolist() == [1, 1, 1, 3, 0]


@pytest.mark.parametrize("n_und", [0, 1, 2, 9, 20])
def test_expert_routing_paths_agree(n_und):
    """Gather/scatter, all-one-expert and 'majority expert on every row' give the same rows."""
    from unimedvl.model.llm import ExpertRouting

    n = 20
    gen_mask = torch.ones(n, dtype=torch.bool)
    gen_mask[torch.randperm(n, generator=torch.Generator().manual_seed(n_und))[:n_und]] = False
    x = torch.randn(n, 6)
    und, gen = (lambda t: t * 2 + 1), (lambda t: -t)
    expected = torch.where(gen_mask[:, None], gen(x), und(x))
    routing = ExpertRouting.from_gen_mask(gen_mask)
    assert torch.equal(routing.apply(x, und, gen), expected)
    parts = routing.apply_split(x, lambda t: (und(t)[:, :2], und(t)[:, 2:]), lambda t: (gen(t)[:, :2], gen(t)[:, 2:]), [2, 4])
    assert torch.equal(torch.cat(parts, dim=1), expected)


def test_decoder_linear_one_row_kernel_matches_f_linear():
    # one bf16 row on a CPU goes through torch.mv (decoding); the result must be F.linear's up to
    # bf16 rounding, and anything else must be F.linear itself
    from unimedvl.model.layers import Linear

    g = torch.Generator().manual_seed(0)
    layer = Linear(64, 48, bias=True).to(torch.bfloat16)
    assert set(layer.state_dict()) == {"weight", "bias"}
    with torch.no_grad():
        for shape in [(64,), (1, 64), (1, 1, 64)]:
            x = torch.randn(*shape, generator=g).to(torch.bfloat16)
            got = layer(x)
            expected = x.double() @ layer.weight.double().T + layer.bias.double()
            assert got.shape == (*shape[:-1], 48) and got.dtype == torch.bfloat16
            assert (got.double() - expected).abs().max() < 0.02 * expected.abs().max()
        rows = torch.randn(3, 64, generator=g).to(torch.bfloat16)
        assert torch.equal(layer(rows), torch.nn.functional.linear(rows, layer.weight, layer.bias))
        x32 = torch.randn(1, 64, generator=g)
        layer32 = layer.float()
        assert torch.equal(layer32(x32), torch.nn.functional.linear(x32, layer32.weight, layer32.bias))
