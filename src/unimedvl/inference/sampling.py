"""Image sampling from KV contexts: the guided rectified-flow denoising loop (ARCHITECTURE 9.4).

Plain functions over an :class:`~.engine.Engine`:

* :func:`initial_noise` - the seeded ``[h*w, p*p*C]`` starting latents (drawn on the CPU, as the
  reference does, so a seed gives the same image on every device);
* :class:`DenoisingQuery` / :func:`velocities` - a noisy latent block queried against several
  contexts in **one** packed forward (one guidance branch per context), never written to a cache;
* :func:`sample_image` - the loop: at each step the branches the guidance needs, their
  combination (:func:`unimedvl.flow.combine_guidance`) and one Euler step (:func:`unimedvl.flow.euler_step`);
* :func:`sample_images` - the same loop for several images of one size and one sampler setting,
  every branch of every image in one packed forward per step (the server batches requests so).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..flow import combine_guidance, euler_step, sampling_timesteps
from ..model import KVCache
from .engine import Engine
from .presets import SamplerSettings
from .step_cache import VelocityForecaster

Progress = Callable[[int, int], None]


@dataclass
class ImageSample:
    latents: torch.Tensor  # [h*w, p*p*C] float32 final latent tokens (t = 0)
    grid_hw: tuple[int, int]  # latent token grid
    velocities: list[torch.Tensor]  # guided velocity of every step, each [h*w, p*p*C]
    full_steps: int = 0  # steps whose branch velocities the model computed
    forecast_steps: int = 0  # steps whose branch velocities the step cache forecast (no forward)


class NonFiniteLatentsError(RuntimeError):
    """The denoising loop produced NaN or infinite latents: nothing is decoded or saved."""


def check_finite_latents(x: torch.Tensor, step: int, total: int) -> None:
    """Raise :class:`NonFiniteLatentsError` if ``x`` holds a NaN or an infinity, naming ``step``
    (0: the initial noise), so that a broken setting or model never becomes a black "synthetic"
    image."""
    if not bool(torch.isfinite(x).all()):
        raise _non_finite(x, step, total)


def _non_finite(x: torch.Tensor, step: int, total: int) -> NonFiniteLatentsError:
    bad = int((~torch.isfinite(x)).sum())
    where, when = ("in the initial noise", "") if step == 0 else (f"at step {step} of {total}", " at the end")
    return NonFiniteLatentsError(
        f"image sampling produced non-finite latents {where} ({bad} of {x.numel()} values NaN or infinite{when}); no image was written. Check the sampler settings (timestep_shift, guidance scales) and the model's "
        "weights and dtype")


def initial_noise(engine: Engine, grid_hw: tuple[int, int], generator: torch.Generator | None,
                  noise: torch.Tensor | None = None) -> torch.Tensor:
    """``noise`` checked against the grid, or a fresh ``[h*w, p*p*C]`` draw from ``generator``."""
    n, dim = grid_hw[0] * grid_hw[1], engine.config.patch_latent_dim
    if noise is None:
        return torch.randn(n, dim, generator=generator)
    if tuple(noise.shape) != (n, dim):
        raise ValueError(f"noise must have shape ({n}, {dim}) for the {grid_hw[0]}x{grid_hw[1]} latent grid, got {tuple(noise.shape)}")
    return noise


class DenoisingQuery:
    """Noisy latent blocks queried against several contexts in one packed forward.

    ``groups[j]`` consecutive contexts query image ``j``'s block (default: one image for all
    contexts, i.e. the guidance branches of one image).  Positions, indices, routing, masks and
    RoPE tables are computed once; each call only swaps in the latents and the times.  The contexts
    must not change while the query is in use.
    """

    def __init__(self, engine: Engine, contexts: list[KVCache], grid_hw: tuple[int, int], groups: list[int] | None = None):
        self.engine, self.contexts, self.grid_hw = engine, list(contexts), grid_hw
        self.groups = [len(self.contexts)] if groups is None else list(groups)
        if sum(self.groups) != len(self.contexts) or min(self.groups, default=1) < 1:
            raise ValueError(f"groups {self.groups} do not split {len(self.contexts)} contexts")
        n = grid_hw[0] * grid_hw[1]
        placeholder = torch.zeros(n, engine.config.patch_latent_dim)  # replaced by x at every call
        b = engine.batch_builder()
        for ctx in self.contexts:  # one packed sample per branch, each at its context's next RoPE position
            b.new_sample(ctx.rope)
            b.add_latent_image(placeholder, grid_hw, 0.0, noisy=True)
        self.batch = b.build(engine.model.device)
        self.plan = engine.model.plan(self.batch, self.contexts, update_cache=False)
        self.lengths = [c.length for c in self.contexts]
        self.num_tokens = n
        self._repeats = torch.tensor(self.groups)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor | list[torch.Tensor], t: float | torch.Tensor | list) -> list[torch.Tensor]:
        """``x [h*w, p*p*C]`` at time ``t`` (or one block and time per image of ``groups``) -> one
        float32 velocity ``[h*w, p*p*C]`` per context."""
        if [c.length for c in self.contexts] != self.lengths:
            raise RuntimeError("a context changed after its denoising query was built")
        device = self.engine.model.device
        blocks = [x] if isinstance(x, torch.Tensor) else list(x)
        times = [t] * len(blocks) if not isinstance(t, (list, tuple)) else list(t)
        if len(blocks) != len(self.groups) or len(times) != len(self.groups):
            raise ValueError(f"got {len(blocks)} latent blocks and {len(times)} times for {len(self.groups)} images")
        if len(blocks) == 1:
            self.batch.latents = blocks[0].to(device).repeat(len(self.contexts), 1)  # [nb*h*w, p*p*C]: the same block per branch
        else:
            self.batch.latents = torch.cat([b.to(device).repeat(g, 1) for b, g in zip(blocks, self.groups)])
        per_image = torch.stack([torch.as_tensor(ti, dtype=torch.float32).reshape(()) for ti in times]).to(device)
        self.batch.latent_timesteps = per_image.repeat_interleave(self._repeats.to(device))  # [contexts]
        out = self.engine.forward(self.batch, self.contexts, update_cache=False, plan=self.plan)
        return list(out.velocities.float().split(self.num_tokens))


def velocities(engine: Engine, contexts: list[KVCache], x: torch.Tensor, t: float | torch.Tensor,
               grid_hw: tuple[int, int]) -> list[torch.Tensor]:
    """Velocity of the noisy latent block ``x [h*w, p*p*C]`` at time ``t`` under each context, all
    in one packed forward; the block sits at each context's RoPE position and is not cached."""
    return DenoisingQuery(engine, contexts, grid_hw)(x, t)


@dataclass
class ImageToSample:
    """One image of :func:`sample_images`: its contexts (ARCHITECTURE 9.4) and starting noise."""

    ctx: KVCache  # conditional
    ctx_text_uncond: KVCache | None  # without the last text item
    ctx_img_uncond: KVCache | None  # without images
    noise: torch.Tensor  # [h*w, p*p*C] at t = 1


def sample_image(
    engine: Engine,
    ctx: KVCache,
    ctx_text_uncond: KVCache | None,
    ctx_img_uncond: KVCache | None,
    noise: torch.Tensor,
    grid_hw: tuple[int, int],
    settings: SamplerSettings,
    progress: Progress | None = None,
) -> ImageSample:
    """Euler integration from ``noise [h*w, p*p*C]`` at ``t = 1`` to ``t = 0``.

    ``ctx`` is the conditional context, ``ctx_text_uncond`` the one without the last text item,
    ``ctx_img_uncond`` the one without images (ARCHITECTURE 9.4).  Each step evaluates the
    branches its guidance needs in one packed forward; the query batches (with and without
    guidance) are built once for the whole loop.  ``progress(step, total)`` is called after each
    step (a cancellation point for the server).
    """
    (sample,) = sample_images(engine, [ImageToSample(ctx, ctx_text_uncond, ctx_img_uncond, noise)], grid_hw, settings, progress)
    return sample


def sample_images(
    engine: Engine,
    images: list[ImageToSample],
    grid_hw: tuple[int, int],
    settings: SamplerSettings,
    progress: Progress | None = None,
    keep: Callable[[int], bool] | None = None,
) -> list[ImageSample | None]:
    """:func:`sample_image` for several images of one grid and one sampler setting: at each step
    every branch of every image runs in one packed forward (each image's latents and contexts its
    own, so each image is the one :func:`sample_image` draws alone, up to the packing's float
    rounding).  ``keep(i)`` is asked before each step: an image it drops (a cancelled request) leaves
    the batch and gets ``None``.  Non-finite latents of any image raise :class:`NonFiniteLatentsError`.

    With ``settings.cache`` (:mod:`.step_cache`) the steps its schedule skips forecast every branch's
    velocity from that branch's computed ones, then combine them as computed ones are combined; a
    branch without history (guidance just switched on) makes the step a full one.
    """
    ts = sampling_timesteps(settings.steps, settings.timestep_shift)  # [steps] from 1 to 0
    guidance = settings.guidance
    total = settings.steps - 1  # model evaluations
    forecaster = VelocityForecaster(settings.cache) if settings.cache is not None else None
    full_steps = forecast_steps = 0
    xs: list[torch.Tensor] = []
    for item in images:
        x = item.noise.to(torch.float32).to(engine.model.device)
        check_finite_latents(x, 0, settings.steps - 1)  # the starting noise (a caller's own may be broken)
        if x.shape[0] != grid_hw[0] * grid_hw[1]:
            raise ValueError(f"noise has {x.shape[0]} tokens, the {grid_hw[0]}x{grid_hw[1]} latent grid needs {grid_hw[0] * grid_hw[1]}")
        xs.append(x)
    active = list(range(len(images)))
    queries: dict[tuple, DenoisingQuery] = {}  # by (branches, images): at most two shapes per loop unless images leave
    per_step: list[list[torch.Tensor]] = [[] for _ in images]
    # the first step whose latents were not finite (0: none), kept on the device: testing each
    # step with a Python bool would synchronise a GPU once per step; one test after the loop
    first_bad = [torch.zeros((), dtype=torch.int64, device=x.device) for x in xs]
    for k in range(settings.steps - 1):
        if keep is not None:
            active = [i for i in active if keep(i)]
            if not active:
                break
        text_scale, img_scale = guidance.scales_at(float(ts[k]))
        n_branches = 1
        if text_scale > 1.0:  # as in the reference, image guidance only acts together with text guidance
            n_branches = 3 if img_scale > 1.0 else 2
        branches, unique = {}, {}
        for i in active:
            item = images[i]
            branches[i] = [item.ctx, item.ctx_text_uncond, item.ctx_img_uncond][:n_branches]
            if any(c is None for c in branches[i]):
                raise ValueError("guidance is on but an unconditional context is missing")
            # A branch whose context *is* another branch's (text-to-image: c_I equals c) is not run twice.
            unique[i] = list({id(c): c for c in branches[i]}.values())
        # a branch's history is kept only while it runs step after step (a slot is (image, context))
        slots = {i: [(i, id(c)) for c in unique[i]] for i in active}
        full = forecaster is None or settings.cache.is_full(k, total) or not forecaster.can_forecast(s for i in active for s in slots[i])
        if full:
            key = (n_branches, tuple(active))
            if key not in queries:
                queries[key] = DenoisingQuery(engine, [c for i in active for c in unique[i]], grid_hw, [len(unique[i]) for i in active])
            out = iter(queries[key]([xs[i] for i in active], [ts[k]] * len(active)))
            full_steps += 1
        else:
            forecast_steps += 1
        for i in active:
            if full:
                by_id = {id(c): next(out) for c in unique[i]}
                if forecaster is not None:
                    for c in unique[i]:
                        forecaster.record((i, id(c)), float(ts[k]), by_id[id(c)])
            else:
                by_id = {id(c): forecaster.forecast((i, id(c)), float(ts[k])) for c in unique[i]}
            if forecaster is not None:
                forecaster.keep_only(i, slots[i])
            vs = [by_id[id(c)] for c in branches[i]]
            v = combine_guidance(
                vs[0], vs[1] if len(vs) > 1 else None, vs[2] if len(vs) > 2 else None,
                text_scale, img_scale, guidance.cfg_renorm_type, guidance.cfg_renorm_min,
            )
            per_step[i].append(v)
            xs[i] = euler_step(xs[i], v, ts[k], ts[k + 1])
            first_bad[i] = torch.where((first_bad[i] == 0) & ~torch.isfinite(xs[i]).all(), k + 1, first_bad[i])
        if progress is not None:
            progress(k + 1, settings.steps - 1)
    results: list[ImageSample | None] = [None] * len(images)
    for i in active:
        if int(first_bad[i]):
            raise _non_finite(xs[i], int(first_bad[i]), settings.steps - 1)
        results[i] = ImageSample(xs[i], grid_hw, per_step[i], full_steps, forecast_steps)
    return results
