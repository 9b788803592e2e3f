"""The Python API: ask about images, write reports, generate images, edit images.

    from unimedvl import UniMedVLPipeline

    pipe = UniMedVLPipeline.from_pretrained("/models/UniMedVL")
    answer = pipe.ask(["chest.dcm"], "Is there a pleural effusion?")
    follow_up = pipe.ask([], "Which side?", history=answer.conversation)   # the cache is reused
    for piece in pipe.ask(["chest.dcm"], "Describe the heart.", stream=True):
        print(piece, end="")
    pipe.generate_image("Axial brain MRI, T2-weighted, normal study.", seed=7).save("brain.png")
    result = pipe.edit(["he_tile.png"], "Convert this H&E tile to HER2 IHC staining, level 2+.")

Task flows follow the official UniMedVL scripts (ARCHITECTURE 9.5): VQA with ViT image blocks,
sampling at temperature 0.1, 512 new tokens; editing with an understanding pre-pass whose answer is
appended to the instruction, then VAE+ViT conditioning.  Image sampling settings come from a named
preset (:mod:`.presets`: ``driver`` for text-to-image, ``unimedvl-edit`` for editing, by default)
plus any field given as an override.  Everything random comes from one CPU generator seeded with
``seed``: the same seed gives the same output.  This module orchestrates; the network never sees a
file or a prompt string.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

from typing_extensions import Unpack

import numpy as np
import torch
from PIL import Image

from ..formats.checkpoint import CheckpointError, load_pretrained
from ..formats.generated import generation_record, save_dicom_secondary_capture, save_png
from ..formats.medical_io import MedicalImage
from ..image_transforms import ImageTransform, normalize_u8, to_uint8_image
from ..model import KVCache, UniMedVL
from ..precision import resolve_dtype
from ..tokenizer import Tokenizer
from . import prompts
from . import prompts as _prompts  # where a parameter is named ``prompts``
from .compilation import compile_denoising, require_compiler
from .conversation import Answer, AnswerStream, Conversation, raw_text, require_text
from .engine import Engine, Sampler, check_max_new_tokens
from .inputs import ImageInput, ImageReadOptions, load_image_with_meta
from .placement import Placement, Planner, apply_placement, placement_of
from .presets import SamplerOverrides, SamplerSettings, SettingError, check_finite, check_whole, sampler_settings
from .sampling import ImageSample, ImageToSample, NonFiniteLatentsError, Progress, initial_noise, sample_image, sample_images


def check_text(text, what: str) -> str:
    """``text`` (the question, prompt or instruction) as given, if it is a non-empty ``str`` that is
    valid Unicode: bytes that were not UTF-8 reach Python as lone surrogates (``surrogateescape``
    decoding of ``argv`` and files), which no tokenizer can encode."""
    if not isinstance(text, str):
        raise SettingError(what, f"must be text (str), got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise SettingError(what, f"is not valid UTF-8 text (an undecodable byte at character {e.start})") from None
    require_text(text, what)
    return text


def check_output_path(path: str | Path, *, overwrite: bool = True) -> Path:
    """``path`` if an image can be written there: not an existing folder, every existing folder above
    it a folder (not a file), and - unless ``overwrite`` - no file there yet.  Checked before any
    model work, so that a bad ``-o`` fails in a second instead of after the image is drawn."""
    path = Path(path)
    if path.is_dir():
        raise SettingError("out", f"{path} is a folder; give a file name inside it, e.g. {path / 'image.png'}")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise SettingError("out", f"{path}: {parent} is a file, not a folder")
            break
    if path.exists() and not overwrite:
        raise SettingError("out", f"{path} exists; pass --overwrite to replace it, or choose another name")
    return path


# ---- results -----------------------------------------------------------------------------------


@dataclass
class Report:
    findings: str
    impression: str
    text: str  # the whole answer
    modality: str | None
    answer: Answer


@dataclass
class GeneratedImage:
    image: Image.Image
    latents: torch.Tensor  # [h*w, 64] final latent tokens
    record: dict  # model, task, prompt, seed, sampler settings - written into saved files
    thinking: str | None = None  # think mode: the planning text
    analysis: str | None = None  # editing: the understanding pre-pass answer appended to the instruction
    explanation: str | None = None  # editing with explain=True: the model's text about its output
    velocities: list[torch.Tensor] = field(default_factory=list, repr=False)
    full_steps: int = 0  # denoising steps the model computed
    forecast_steps: int = 0  # denoising steps the step cache forecast instead (0 without a cache)

    def save(self, path: str | Path) -> Path:
        """PNG (``.png``) or DICOM Secondary Capture (``.dcm``), both marked synthetic, written atomically."""
        path = check_output_path(path)  # a folder, or a path under a file, is refused before anything is written
        if path.suffix.lower() in (".dcm", ".dicom"):
            return save_dicom_secondary_capture(self.image, path, self.record)
        if path.suffix.lower() != ".png":
            raise ValueError(f"{path}: generated images are saved as .png or .dcm (metadata marks them synthetic)")
        return save_png(self.image, path, self.record)


# ---- the pipeline ------------------------------------------------------------------------------


class UniMedVLPipeline:
    """Understanding and generation on one loaded :class:`UniMedVL` with its tokenizer."""

    def __init__(self, model: UniMedVL, tokenizer: Tokenizer, *, name: str = "unimedvl",
                 read_options: ImageReadOptions = ImageReadOptions(), compile: bool = False):
        """``compile=True`` runs the denoising steps of generation and editing compiled
        (:mod:`.compilation`: fused element-wise work around the products; needs a C++ compiler
        on CPUs, and the first image of each size waits for the compilation)."""
        if tokenizer is None:
            raise ValueError("the pipeline needs the checkpoint's tokenizer (vocab.json and merges.txt)")
        if compile:
            compile_denoising(model)  # refused before anything else when the device's compiler is missing
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.engine = Engine(model, tokenizer.special)
        self.name = name
        self.read_options = read_options
        self.placement: Placement | None = placement_of(model)  # set when the model is placed over devices

    @classmethod
    def from_pretrained(
        cls,
        directory: str | Path,
        *,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "auto",
        visual_gen: bool = True,
        weights: str = "ema",
        quantize: str | None = None,
        read_options: ImageReadOptions = ImageReadOptions(),
        device_map: str | Path | Mapping[str, str] | Planner | None = None,
        max_memory: str | Mapping[str, int | str] | None = None,
        compile: bool = False,
    ) -> "UniMedVLPipeline":
        """Load a checkpoint directory in the official layout.  ``dtype`` ``auto`` (the default) is
        bfloat16 on CUDA, as the official scripts run, and float32 on CPUs (:mod:`unimedvl.precision`).
        ``visual_gen=False`` loads an understanding-only model (no generation expert, adapters or
        autoencoder).  ``quantize`` (``"int8"``, ``"int4"``, ``"nf4"``, ``"fp8"``) stores the linear
        layers of the decoder, ViT and connector in that weight-only scheme, quantised while loading
        (:mod:`unimedvl.model.quantized`; a scheme the device cannot run is refused, naming what to
        use instead); a pre-quantised checkpoint (``unimedvl quantize``) loads in its own scheme.

        ``device_map`` places the model over several devices instead of ``device``
        (:mod:`.placement`): ``"auto"`` puts whole decoder layers in order on the devices of
        ``max_memory`` (``"cuda:0=20GiB,cpu=64GiB"`` or a mapping; default: the free memory of each
        GPU, then the CPU), a mapping or JSON plan file gives ``{module prefix: device}``.  Each tensor
        is read straight to its device; ``dtype="auto"`` follows the first device, which holds
        everything outside the decoder layers.  ``max_memory`` alone implies ``device_map="auto"``; a
        :class:`~.placement.Planner` sets the KV reserve and headroom too.  The applied placement
        (hooks and counters) is :attr:`placement`.  ``compile``: see :class:`UniMedVLPipeline`
        (checked before loading; a model placed over devices runs uncompiled)."""
        if compile:
            require_compiler(torch.device(device))  # before reading gigabytes
        planner = None
        if isinstance(device_map, Planner):  # its own KV reserve or headroom
            if max_memory is not None:
                raise ValueError("give the budgets to the Planner, not max_memory beside it")
            planner = device_map
        elif device_map is not None or max_memory is not None:
            planner = Planner(device_map if device_map is not None else "auto", max_memory)
        if planner is not None:
            device = planner.first_device
            planner.dtype = resolve_dtype(dtype, device)
        model, tokenizer = load_pretrained(directory, device=device, dtype=dtype, weights=weights, visual_gen=visual_gen,
                                           quantize=quantize, device_map=planner)
        if tokenizer is None:
            raise CheckpointError(f"{directory}: no tokenizer files (vocab.json and merges.txt are needed)")
        pipe = cls(model, tokenizer, name=Path(directory).name, read_options=read_options, compile=compile)
        if planner is not None:
            pipe.placement = apply_placement(model, planner.plan)
        return pipe

    # ---- what the model works at --------------------------------------------------------------
    @property
    def context_window(self) -> int:
        return self.engine.context_window

    @property
    def default_image_size(self) -> int:
        """The generated side used when none is given: the official 1024, or the scale a model was trained at."""
        return self.model.config.transforms.image_size

    def transform(self, which: str) -> ImageTransform:
        """The model's inference resize rule ``which`` (``understanding_vit``, ``generation_vit``, ``generation_vae``)."""
        return ImageTransform(*getattr(self.model.config.transforms, which))

    def generation_size(self, width: int, height: int) -> tuple[int, int]:
        """``(width, height)`` at which an image of ``width x height`` is encoded and regenerated
        (the model's generation resize rule: multiples of 16 within its size limits)."""
        return self.transform("generation_vae").target_size(width, height)

    def output_size(self, height, width, default_height: int, default_width: int) -> tuple[int, int]:
        """``(height, width)`` of a generated image: each given side (``None``: its default) checked
        against what the model can generate - a whole number of pixels, a positive multiple of its
        latent stride (16 for the official weights), at most its largest generated side."""
        stride = self.engine.config.latent_downsample
        largest = self.engine.config.max_latent_size * stride
        sides = []
        for name, value, default in (("height", height, default_height), ("width", width, default_width)):
            if value is None:
                sides.append(default)
                continue
            rule = f"must be a positive multiple of {stride} pixels, at most {largest} for this model, got {value!r}"
            try:
                side = check_whole(name, value, minimum=stride)
            except SettingError:
                raise SettingError(name, rule) from None
            if side % stride or side > largest:
                raise SettingError(name, rule)
            sides.append(side)
        return sides[0], sides[1]

    def load_images(self, images: ImageInput | Sequence[ImageInput] | None) -> list[tuple[Image.Image, dict]]:
        """Each input as an 8-bit RGB image with its reader's metadata (DICOM/NIfTI read with :attr:`read_options`)."""
        if images is None:
            return []
        if isinstance(images, (str, Path, Image.Image, MedicalImage)) or hasattr(images, "shape"):
            images = [images]
        return [load_image_with_meta(im, self.read_options) for im in images]

    def _require_generation(self) -> None:
        if not self.model.config.visual_gen:
            raise RuntimeError("this model was loaded for understanding only (visual_gen=False): it has no generation expert, "
                               "adapters or autoencoder; load it with visual_gen=True (the default) to generate or edit images")

    def _add_text(self, ctx: KVCache, text: str) -> None:
        self.engine.add_text(ctx, self.tokenizer.encode(text))

    def _greedy_text(self, ctx: KVCache, max_new_tokens: int):
        """Greedy decoding from ``ctx`` (left unchanged): ``(text, stream)``."""
        stream = self.engine.stream_text(ctx, self.engine.answer_budget(ctx, max_new_tokens), sampler=Sampler())
        for _ in stream:
            pass
        return raw_text(self.tokenizer, stream.ids), stream

    # ---- understanding ------------------------------------------------------------------------
    def chat(self, think: bool = False) -> Conversation:
        """A new empty conversation; ``conversation.ask(question, images)`` adds turns."""
        return Conversation(self, think=think)

    def ask(
        self,
        images: ImageInput | Sequence[ImageInput] | None,
        question: str,
        *,
        history: Conversation | None = None,
        think: bool = False,
        max_new_tokens: int = 512,
        temperature: float = 0.1,
        top_p: float = 1.0,
        seed: int | None = 42,
        stream: bool = False,
    ) -> Answer | AnswerStream:
        """Answer ``question`` about ``images`` (any number, each a ViT block before the question).

        ``history`` continues a :class:`Conversation` (from ``answer.conversation``); its cached
        context is extended, never recomputed.  ``temperature=0`` decodes greedily.  ``think``
        starts a conversation with the reasoning system prompt and returns the ``<think>`` part
        separately.  ``stream=True`` returns an :class:`AnswerStream` of text pieces.
        """
        check_text(question, "question")
        check_finite("temperature", temperature, minimum=0)
        check_finite("top_p", top_p, above=0, maximum=1)
        check_whole("max_new_tokens", max_new_tokens, minimum=1)
        if history is not None and think and not history.think:
            raise ValueError("this conversation was started without think mode; start a new one with think=True")
        conv = history if history is not None else Conversation(self, think=think)
        ctx = conv.add_user(question, images)
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        text_stream = self.engine.stream_text(ctx, self.engine.answer_budget(ctx, max_new_tokens),
                                              sampler=Sampler(temperature, top_p, generator))
        if stream:
            return AnswerStream(conv, text_stream)
        for _ in text_stream:  # decoded once at the end, not piece by piece
            pass
        return conv.record_answer(text_stream, self.engine.close_answer(text_stream))

    def ask_batch(
        self,
        items: Sequence[tuple[ImageInput | Sequence[ImageInput] | None, str]],
        *,
        max_new_tokens: int = 512,
        batch_size: int = 8,
    ) -> list[Answer]:
        """Answer several independent ``(images, question)`` items greedily, for evaluation throughput.

        Each answer equals ``ask(images, question, temperature=0, max_new_tokens=max_new_tokens)``
        (text, ids, finished and a closed conversation).  Items are processed ``batch_size`` at a
        time: every context is built as :meth:`ask` builds it, then the chunk decodes together with
        one packed forward per step (:meth:`Engine.generate_text_batch`), and one more closes all
        the answers (:meth:`Engine.close_answers`).  Every question is checked before any work starts.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        check_max_new_tokens(max_new_tokens)
        items = list(items)
        for _, question in items:
            check_text(question, "question")
        answers: list[Answer] = []
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            convs = [Conversation(self) for _ in chunk]
            contexts = [conv.add_user(question, images) for conv, (images, question) in zip(convs, chunk)]
            budgets = [self.engine.answer_budget(ctx, max_new_tokens) for ctx in contexts]
            generations = self.engine.generate_text_batch(contexts, budgets)
            closed = self.engine.close_answers(generations)
            answers.extend(conv.record_answer(gen, ctx) for conv, gen, ctx in zip(convs, generations, closed))
        return answers

    def report(
        self,
        image: ImageInput,
        modality: str | None = None,
        *,
        max_new_tokens: int = 512,
        temperature: float = 0.1,
        seed: int | None = 42,
        think: bool = False,
    ) -> Report:
        """A findings/impression report of one image.  ``modality`` (e.g. "chest X-ray") defaults
        to the DICOM/NIfTI modality when the file has one."""
        pil, meta = self.load_images(image)[0]
        modality = modality or meta.get("modality")
        answer = self.ask(
            [pil], prompts.report_prompt(modality), max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, think=think
        )
        sections = prompts.parse_report(answer.text)
        return Report(sections.findings, sections.impression, answer.text, modality, answer)

    # ---- generation ---------------------------------------------------------------------------
    def _draw(self, ctx, ctx_text, ctx_img, grid, noise, generator, settings: SamplerSettings, progress) -> tuple[ImageSample, Image.Image]:
        """Sample latents from the three contexts and decode them to an 8-bit image."""
        noise = initial_noise(self.engine, grid, generator, noise)
        sample = sample_image(self.engine, ctx, ctx_text, ctx_img, noise, grid, settings, progress)  # raises on NaN latents
        return sample, self._decode_image(sample)

    def _decode_image(self, sample: ImageSample) -> Image.Image:
        """Final latents -> an 8-bit image; never a black "synthetic" image from NaN pixels."""
        pixels = self.engine.decode_latents(sample.latents, sample.grid_hw)
        if not bool(torch.isfinite(pixels).all()):
            raise NonFiniteLatentsError("the autoencoder decoded non-finite pixels; no image was written (check the model's "
                                        "weights and dtype)")
        return Image.fromarray(to_uint8_image(pixels))

    def generate_image(
        self,
        prompt: str,
        *,
        preset: str | SamplerSettings | None = None,
        height: int | None = None,
        width: int | None = None,
        seed: int = 42,
        think: bool = False,
        max_think_tokens: int = 1000,
        noise: torch.Tensor | None = None,
        progress: Progress | None = None,
        **overrides: Unpack[SamplerOverrides],
    ) -> GeneratedImage:
        """Text-to-image.

        Sampler settings: ``preset`` (a name in :data:`~.presets.SAMPLER_PRESETS`; default
        ``driver``, the reference driver's 3.0 / 1.5 / (0.4, 1] / global / shift 3 / 50 steps) with
        ``overrides`` of its fields (:class:`~.presets.SamplerOverrides`: ``steps``, ``cfg_text_scale``,
        ``cfg_img_scale``, ``cfg_interval``, ``cfg_renorm_type``, ``cfg_renorm_min``, ``timestep_shift``;
        ``None`` keeps the preset's).  ``steps`` is the official
        ``num_timesteps``: the schedule's length, ``steps - 1`` model evaluations.  The
        text-unconditional context is empty (or the system prompt in think mode); the
        image-unconditional one equals the conditional one, so ``cfg_img_scale`` only rescales text
        guidance, as in the reference driver.  ``think`` first writes a plan that conditions the
        image.  ``noise [h*w, 64]`` overrides the seeded initial noise.  ``height`` and ``width``
        default to :attr:`default_image_size` (1024 for the official weights).
        """
        (result,) = self.generate_images([prompt], seeds=[seed], preset=preset, height=height, width=width, think=think,
                                         max_think_tokens=max_think_tokens, noises=None if noise is None else [noise],
                                         progress=progress, **overrides)
        return result

    def generate_images(
        self,
        prompts: Sequence[str],
        *,
        seeds: Sequence[int],
        preset: str | SamplerSettings | None = None,
        height: int | None = None,
        width: int | None = None,
        think: bool = False,
        max_think_tokens: int = 1000,
        noises: Sequence[torch.Tensor] | None = None,
        progress: Progress | None = None,
        keep=None,
        **overrides: Unpack[SamplerOverrides],
    ) -> list[GeneratedImage | None]:
        """Text-to-image for several prompts of one size and one sampler setting, denoised together:
        each step runs every guidance branch of every image in one packed forward.  Image ``i`` is
        ``generate_image(prompts[i], seed=seeds[i], ...)`` (equal up to the packing's float
        rounding).  ``keep(i)``, asked before each step, drops image ``i`` (its result is then
        ``None``): a server's cancelled request stops costing forwards."""
        # 1. check inputs before any model work
        self._require_generation()
        if len(seeds) != len(prompts) or (noises is not None and len(noises) != len(prompts)):
            raise ValueError(f"got {len(prompts)} prompts, {len(seeds)} seeds and {'no' if noises is None else len(noises)} noises")
        for prompt in prompts:
            check_text(prompt, "prompt")
        settings = sampler_settings("text-to-image", preset, **overrides)
        height, width = self.output_size(height, width, self.default_image_size, self.default_image_size)  # 0 is refused, not the default
        grid = self.engine.latent_grid(height, width)
        items, thoughts = [], []
        for i, (prompt, seed) in enumerate(zip(prompts, seeds)):
            # 2. contexts: c_T = (system prompt), c = c_I = c_T + prompt (+ the plan in think mode, c only)
            ctx = self.engine.new_context()
            if think:
                self._add_text(ctx, _prompts.GENERATION_SYSTEM_PROMPT)
            ctx_text = ctx.fork()
            self._add_text(ctx, prompt)
            ctx_img = ctx
            thinking = None
            if think:
                thinking, stream = self._greedy_text(ctx, max_think_tokens)
                ctx = self.engine.close_answer(stream)
            noise = initial_noise(self.engine, grid, torch.Generator().manual_seed(seed), None if noises is None else noises[i])
            items.append(ImageToSample(ctx, ctx_text, ctx_img, noise))
            thoughts.append(thinking)
        # 3. denoise together, decode each
        samples = sample_images(self.engine, items, grid, settings, progress, keep)  # raises on NaN latents
        results: list[GeneratedImage | None] = []
        for prompt, seed, thinking, sample in zip(prompts, seeds, thoughts, samples):
            if sample is None:
                results.append(None)
                continue
            image = self._decode_image(sample)
            record = generation_record(
                model=self.name, task="text-to-image", prompt=prompt, seed=seed, sampler=settings.record(height, width), thinking=thinking
            )
            results.append(GeneratedImage(image, sample.latents, record, thinking=thinking, velocities=sample.velocities,
                                          full_steps=sample.full_steps, forecast_steps=sample.forecast_steps))
        return results

    def edit(
        self,
        images: ImageInput | Sequence[ImageInput],
        instruction: str,
        *,
        preset: str | SamplerSettings | None = None,
        height: int | None = None,
        width: int | None = None,
        seed: int = 42,
        analyze: bool = True,
        think: bool = False,
        explain: bool = False,
        max_analysis_tokens: int = 800,
        max_explanation_tokens: int = 512,
        noise: torch.Tensor | None = None,
        posterior_noise: Sequence[torch.Tensor] | None = None,
        progress: Progress | None = None,
        **overrides: Unpack[SamplerOverrides],
    ) -> GeneratedImage:
        """Image-conditioned generation: staining, super-resolution, contrast translation,
        counterfactuals.

        Sampler settings: ``preset`` (default ``unimedvl-edit``: 4.0 / 2.0 / (0, 1] / text_channel /
        shift 3 / 50 steps, UniMedVL's editing script) with any field overridden.  ``analyze`` (the
        official default) first answers the instruction about the image and appends that answer
        to it; ``think`` uses the think-mode variant of that pre-pass.  ``explain`` adds the
        generated image to the context and returns the model's text about it (e.g. a
        counterfactual's explanation).  The output size defaults to the input's size after the
        generation resize rule.  ``posterior_noise`` (one ``[z, h/8, w/8]`` per image) and ``noise``
        override the seeded draws (taken in that order).
        """
        # 1. check inputs before any model work
        self._require_generation()
        check_text(instruction, "instruction")
        settings = sampler_settings("image-to-image", preset, **overrides)
        self.output_size(height, width, 0, 0)  # the given sides, checked before the inputs are read
        loaded = [pil for pil, _ in self.load_images(images)]
        if not loaded:
            raise ValueError("edit needs at least one input image")

        # 2. resize: each input by the generation VAE rule, its ViT view from that; the output size follows the first
        gen_vae, gen_vit = self.transform("generation_vae"), self.transform("generation_vit")
        vae_images = [gen_vae.resize(im) for im in loaded]
        vit_pixels = [gen_vit(im, img_num=len(loaded)) for im in vae_images]  # each [3, h, w] in [-1, 1]
        out_w, out_h = vae_images[0].size
        height, width = self.output_size(height, width, out_h, out_w)
        grid = self.engine.latent_grid(height, width)

        # 3. random draws, in the reference's order: each input's posterior sample, then (in step 6) the initial noise
        generator = torch.Generator().manual_seed(seed)
        z, down = self.model.config.ae.z_channels, self.model.config.ae.downsample
        if posterior_noise is None:
            posterior_noise = [torch.randn(z, im.size[1] // down, im.size[0] // down, generator=generator) for im in vae_images]
        elif len(posterior_noise) != len(vae_images):
            raise ValueError(f"posterior_noise needs one tensor per image ({len(vae_images)}), got {len(posterior_noise)}")

        # 4. the understanding pre-pass: its answer (the analysis) is appended to the instruction
        analysis = thinking = None
        final_instruction = instruction
        if analyze or think:
            ctx_a = self.engine.new_context()
            if think:
                self._add_text(ctx_a, prompts.UNDERSTANDING_SYSTEM_PROMPT)
            for px in vit_pixels:
                self.engine.add_vit_image(ctx_a, px)
            self._add_text(ctx_a, prompts.EDIT_ANALYSIS_THINK_TEMPLATE.format(instruction=instruction) if think else instruction)
            raw, _ = self._greedy_text(ctx_a, max_analysis_tokens)
            if think:
                thinking, analysis = prompts.split_thinking(raw)
                final_instruction = instruction + prompts.EDIT_ANALYSIS_THINK_SEPARATOR + raw
            else:
                analysis = raw
                final_instruction = instruction + prompts.EDIT_ANALYSIS_SEPARATOR + raw

        # 5. contexts - c_T: the image blocks (VAE then ViT per image); c: c_T + instruction; c_I: the instruction only
        ctx_text = self.engine.new_context()
        for im, px, eps in zip(vae_images, vit_pixels, posterior_noise):
            self.engine.add_vae_image(ctx_text, normalize_u8(np.asarray(im)), eps)
            self.engine.add_vit_image(ctx_text, px)
        ctx = ctx_text.fork()
        self._add_text(ctx, final_instruction)
        ctx_img = self.engine.new_context()
        self._add_text(ctx_img, final_instruction)

        # 6. denoise and decode
        sample, image = self._draw(ctx, ctx_text, ctx_img, grid, noise, generator, settings, progress)

        # 7. optionally, the model's text about its own output (the counterfactual's explanation)
        explanation = None
        if explain:
            ctx_e = ctx.fork()
            self.engine.add_latent_tokens(ctx_e, sample.latents, grid)
            self.engine.add_vit_image(ctx_e, gen_vit(image))
            explanation, _ = self._greedy_text(ctx_e, max_explanation_tokens)
        record = generation_record(
            model=self.name, task="image-to-image", prompt=instruction, conditioning_text=final_instruction, seed=seed,
            sampler=settings.record(height, width), input_images=len(loaded), thinking=thinking, explanation=explanation,
        )
        return GeneratedImage(
            image, sample.latents, record, thinking=thinking, analysis=analysis, explanation=explanation, velocities=sample.velocities,
            full_steps=sample.full_steps, forecast_steps=sample.forecast_steps,
        )
