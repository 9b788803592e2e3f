"""The Python API: ask about images, write reports, generate images, edit images.

    from unimedvl import UniMedVLPipeline

    pipe = UniMedVLPipeline.from_pretrained("/models/UniMedVL", dtype="bf16")
    answer = pipe.ask(["chest.dcm"], "Is there a pleural effusion?")
    follow_up = pipe.ask([], "Which side?", history=answer.conversation)   # the cache is reused
    for piece in pipe.ask(["chest.dcm"], "Describe the heart.", stream=True):
        print(piece, end="")
    pipe.generate_image("Axial brain MRI, T2-weighted, normal study.", seed=7).save("brain.png")
    result = pipe.edit(["he_tile.png"], "Convert this H&E tile to HER2 IHC staining, level 2+.")

Task flows and defaults follow the official UniMedVL scripts (ARCHITECTURE 9.5): VQA with ViT
image blocks, sampling at temperature 0.1, 512 new tokens; text-to-image with the driver's guidance
defaults (text 3.0, image 1.5, interval (0.4, 1.0), global renorm, shift 3.0, 50 steps, 1024x1024);
editing with an understanding pre-pass whose answer is appended to the instruction, then
VAE+ViT conditioning and text-channel guidance (text 4.0, image 2.0, interval (0, 1]); seed 42.
Everything random comes from one CPU generator seeded with ``seed``: the same seed gives the same
output.  This module orchestrates; the network never sees a file or a prompt string.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from ..flow import GuidanceConfig
from ..image_transforms import ImageTransform, normalize_u8, to_uint8_image
from ..formats.medical_io import MedicalImage
from ..model import KVCache, UniMedVL
from ..formats.checkpoint import CheckpointError, load_pretrained
from ..formats.generated import generation_record, save_dicom_secondary_capture, save_png
from ..tokenizer import Tokenizer
from . import prompts
from .engine import Engine, Sampler, TextGeneration, TextStream, check_max_new_tokens
from .inputs import ImageInput, ImageReadOptions, load_image_with_meta

Progress = Callable[[int, int], None]


class PromptTooLongError(ValueError):
    """The context would exceed the model's context window."""


# ---- results -----------------------------------------------------------------------------------


@dataclass
class Answer:
    text: str  # the answer (the <think> block removed in think mode)
    thinking: str | None  # the reasoning inside <think> ... </think>, think mode only
    token_ids: list[int]  # generated ids
    finished: bool  # False when max_new_tokens cut the answer short
    conversation: "Conversation"  # pass as ``history=`` to continue

    def __str__(self) -> str:
        return self.text


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

    def save(self, path: str | Path) -> Path:
        """PNG (``.png``) or DICOM Secondary Capture (``.dcm``), both marked synthetic, written atomically."""
        path = Path(path)
        if path.suffix.lower() in (".dcm", ".dicom"):
            return save_dicom_secondary_capture(self.image, path, self.record)
        if path.suffix.lower() != ".png":
            raise ValueError(f"{path}: generated images are saved as .png or .dcm (metadata marks them synthetic)")
        return save_png(self.image, path, self.record)


# ---- conversations -----------------------------------------------------------------------------


class Conversation:
    """A multi-turn understanding session.  Its KV context grows turn by turn: earlier images,
    questions and answers are never recomputed."""

    def __init__(self, pipeline: "UniMedVLPipeline", think: bool = False):
        self.pipeline = pipeline
        self.think = think
        self.context: KVCache = pipeline.engine.new_context()
        self.turns: list[dict] = []
        if think:
            pipeline._add_text(self.context, prompts.UNDERSTANDING_SYSTEM_PROMPT)

    def ask(self, question: str, images: Sequence[ImageInput] = (), **kwargs):
        return self.pipeline.ask(images, question, history=self, **kwargs)

    def add_system(self, text: str) -> None:
        """A system text item (before the first turn), e.g. an OpenAI ``system`` message."""
        _require_text(text, "system message")
        self.pipeline._add_text(self.context, text)
        self.turns.append({"role": "system", "text": text})

    def add_user(self, text: str, images: Sequence[ImageInput] = ()) -> None:
        """A user turn without answering it (replaying a transcript)."""
        _require_text(text, "user message")
        self.pipeline._user_turn(self, images, text)

    def add_assistant(self, text: str) -> None:
        """An assistant turn from a transcript: the same text item a decoded answer becomes."""
        _require_text(text, "assistant message")
        self.pipeline._add_text(self.context, text)
        self.turns.append({"role": "assistant", "text": text})


class AnswerStream:
    """Iterator of text pieces of an answer as it is decoded; ``"".join`` of them equals the
    non-streamed answer (in think mode: the raw text, ``<think>`` block included).  After
    exhaustion :attr:`answer` holds the :class:`Answer`."""

    def __init__(self, pipeline: "UniMedVLPipeline", conversation: Conversation, stream: TextStream, question: str):
        self.pipeline, self.conversation, self.stream, self.question = pipeline, conversation, stream, question
        self.answer: Answer | None = None
        self._pieces = self._run()

    def __iter__(self):
        return self

    def __next__(self) -> str:
        return next(self._pieces)

    def _run(self) -> Iterator[str]:
        tok = self.pipeline.tokenizer
        emitted = ""
        for _ in self.stream:
            text = tok.decode(self.stream.ids)
            if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for its next byte
                continue
            if text.startswith(emitted) and len(text) > len(emitted):
                yield text[len(emitted):]
                emitted = text
        closed = self.pipeline.engine.close_answer(self.stream)
        self.answer = self.pipeline._finish_answer(self.conversation, self.stream, self.question, closed)
        full = self.answer.text if not self.conversation.think else _raw_text(tok, self.stream.ids)
        if full.startswith(emitted) and len(full) > len(emitted):
            yield full[len(emitted):]

    def result(self) -> Answer:
        """Consume the rest of the stream and return the answer."""
        for _ in self:
            pass
        return self.answer


def _require_text(text: str, what: str) -> None:
    if not text or not text.strip():
        raise ValueError(f"the {what} is empty")


def _raw_text(tokenizer: Tokenizer, ids: list[int]) -> str:
    return tokenizer.decode_generation([tokenizer.special.bos, *ids])


# ---- the pipeline ------------------------------------------------------------------------------


class UniMedVLPipeline:
    """Understanding and generation on one loaded :class:`UniMedVL` with its tokenizer."""

    def __init__(self, model: UniMedVL, tokenizer: Tokenizer, *, name: str = "unimedvl", read_options: ImageReadOptions = ImageReadOptions()):
        if tokenizer is None:
            raise ValueError("the pipeline needs the checkpoint's tokenizer (vocab.json and merges.txt)")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.engine = Engine(model, tokenizer.special)
        self.name = name
        self.read_options = read_options

    def _transform(self, which: str) -> ImageTransform:
        """The model's inference resize rule ``which`` (``understanding_vit``, ``generation_vit``, ``generation_vae``)."""
        return ImageTransform(*getattr(self.model.config.transforms, which))

    def generation_size(self, width: int, height: int) -> tuple[int, int]:
        """``(width, height)`` at which an image of ``width x height`` is encoded and regenerated
        (the model's generation resize rule: multiples of 16 within its size limits)."""
        return self._transform("generation_vae").target_size(width, height)

    @property
    def default_image_size(self) -> int:
        """The generated side used when none is given: the official 1024, or the scale a model was trained at."""
        return self.model.config.transforms.image_size

    @classmethod
    def from_pretrained(
        cls,
        directory: str | Path,
        *,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "auto",
        visual_gen: bool = True,
        weights: str = "ema",
        read_options: ImageReadOptions = ImageReadOptions(),
    ) -> "UniMedVLPipeline":
        """Load a checkpoint directory in the official layout.  ``dtype`` ``auto`` (the default) is
        bfloat16 on CUDA, as the official scripts run, and float32 on CPUs (:mod:`unimedvl.precision`).
        ``visual_gen=False`` loads an understanding-only model (no autoencoder, no generation adapters)."""
        model, tokenizer = load_pretrained(directory, device=device, dtype=dtype, weights=weights, visual_gen=visual_gen)
        if tokenizer is None:
            raise CheckpointError(f"{directory}: no tokenizer files (vocab.json and merges.txt are needed)")
        return cls(model, tokenizer, name=Path(directory).name, read_options=read_options)

    # ---- helpers ------------------------------------------------------------------------------
    @property
    def context_window(self) -> int:
        return self.model.config.llm.max_position_embeddings

    def _check_room(self, ctx: KVCache, positions: int, what: str) -> None:
        if ctx.rope + positions > self.context_window:
            raise PromptTooLongError(
                f"{what} needs {positions} positions after {ctx.rope} already used, but the context window is "
                f"{self.context_window}; shorten the text, use fewer images or start a new conversation"
            )

    def _add_text(self, ctx: KVCache, text: str) -> list[int]:
        ids = self.tokenizer.encode(text)
        self._check_room(ctx, len(ids) + 2, f"a text of {len(ids)} tokens")
        self.engine.add_text(ctx, ids)
        return ids

    def _load(self, image: ImageInput) -> tuple[Image.Image, dict]:
        return load_image_with_meta(image, self.read_options)

    def _images(self, images: ImageInput | Sequence[ImageInput] | None) -> list[tuple[Image.Image, dict]]:
        if images is None:
            return []
        if isinstance(images, (str, Path, Image.Image, MedicalImage)) or hasattr(images, "shape"):
            images = [images]
        return [self._load(im) for im in images]

    def _require_generation(self) -> None:
        if not self.model.config.visual_gen:
            raise RuntimeError("this model was loaded without generation components (visual_gen=False)")

    def _answer_budget(self, ctx: KVCache, max_new_tokens: int) -> int:
        """``max_new_tokens`` capped by the room left in the context window (at least one position)."""
        self._check_room(ctx, 1, "the answer")
        return min(max_new_tokens, self.context_window - ctx.rope)

    def _decode(self, ctx: KVCache, max_new_tokens: int, sampler: Sampler) -> TextStream:
        return self.engine.stream_text(ctx, self._answer_budget(ctx, max_new_tokens), sampler=sampler)

    def _greedy_text(self, ctx: KVCache, max_new_tokens: int) -> tuple[str, TextStream]:
        stream = self._decode(ctx, max_new_tokens, Sampler())
        for _ in stream:
            pass
        return _raw_text(self.tokenizer, stream.ids), stream

    # ---- understanding ------------------------------------------------------------------------
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
        _require_text(question, "question")
        conv = history if history is not None else Conversation(self, think=think)
        if history is not None and think and not history.think:
            raise ValueError("this conversation was started without think mode; start a new one with think=True")
        ctx = self._user_turn(conv, images, question)
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        text_stream = self._decode(ctx, max_new_tokens, Sampler(temperature, top_p, generator))
        if stream:
            return AnswerStream(self, conv, text_stream, question)
        for _ in text_stream:
            pass
        return self._finish_answer(conv, text_stream, question, self.engine.close_answer(text_stream))

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
            _require_text(question, "question")
        answers: list[Answer] = []
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            convs = [Conversation(self) for _ in chunk]
            contexts = [self._user_turn(conv, images, question) for conv, (images, question) in zip(convs, chunk)]
            budgets = [self._answer_budget(ctx, max_new_tokens) for ctx in contexts]
            generations = self.engine.generate_text_batch(contexts, budgets)
            closed = self.engine.close_answers(generations)
            answers.extend(
                self._finish_answer(conv, gen, question, ctx)
                for conv, gen, ctx, (_, question) in zip(convs, generations, closed, chunk)
            )
        return answers

    def _user_turn(self, conv: Conversation, images: ImageInput | Sequence[ImageInput] | None, question: str) -> KVCache:
        """Append ``images`` (ViT blocks) and ``question`` to the conversation's context and record
        the user turn; returns the context to answer from."""
        loaded = self._images(images)
        ctx = conv.context
        for pil, _ in loaded:
            pixels = self._transform('understanding_vit')(pil, img_num=len(loaded))
            n = (pixels.shape[1] // self.model.config.vit.patch_size) * (pixels.shape[2] // self.model.config.vit.patch_size)
            self._check_room(ctx, 1, f"an image of {n} patches")
            self.engine.add_vit_image(ctx, pixels)
        self._add_text(ctx, question)
        conv.turns.append({"role": "user", "text": question, "images": len(loaded)})
        return ctx

    def _finish_answer(self, conv: Conversation, stream: TextStream | TextGeneration, question: str, closed: KVCache) -> Answer:
        """Record the answer; ``closed`` is the stream's decoding fork closed with ``<|im_end|>``
        (:meth:`Engine.close_answer`), i.e. the context plus the answer as a text item like any other."""
        raw = _raw_text(self.tokenizer, stream.ids)
        thinking, text = prompts.split_thinking(raw) if conv.think else (None, raw)
        conv.context = closed
        conv.turns.append({"role": "assistant", "text": raw})
        return Answer(text, thinking, list(stream.ids), stream.finished, conv)

    def chat(self, think: bool = False) -> Conversation:
        """A new empty conversation; ``conversation.ask(question, images)`` adds turns."""
        return Conversation(self, think=think)

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
        pil, meta = self._images(image)[0]
        modality = modality or meta.get("modality")
        answer = self.ask(
            [pil], prompts.report_prompt(modality), max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, think=think
        )
        sections = prompts.parse_report(answer.text)
        return Report(sections.findings, sections.impression, answer.text, modality, answer)

    # ---- generation ---------------------------------------------------------------------------
    def _sample(
        self, ctx, ctx_text, ctx_img, grid, noise, generator, sampler: "_SamplerSettings", progress: Progress | None
    ):
        n = grid[0] * grid[1]
        if noise is None:
            noise = torch.randn(n, self.model.config.patch_latent_dim, generator=generator)
        elif tuple(noise.shape) != (n, self.model.config.patch_latent_dim):
            raise ValueError(f"noise must have shape ({n}, {self.model.config.patch_latent_dim}), got {tuple(noise.shape)}")
        sample = self.engine.sample_image(
            ctx, ctx_text, ctx_img, noise, grid,
            num_timesteps=sampler.steps, timestep_shift=sampler.timestep_shift, guidance=sampler.guidance, progress=progress,
        )
        image = Image.fromarray(to_uint8_image(self.engine.decode_latents(sample.latents, grid)))
        return sample, image

    def generate_image(
        self,
        prompt: str,
        *,
        height: int | None = None,
        width: int | None = None,
        steps: int = 50,
        cfg_text_scale: float = 3.0,
        cfg_img_scale: float = 1.5,
        cfg_interval: tuple[float, float] = (0.4, 1.0),
        cfg_renorm_type: str = "global",
        cfg_renorm_min: float = 0.0,
        timestep_shift: float = 3.0,
        seed: int = 42,
        think: bool = False,
        max_think_tokens: int = 1000,
        noise: torch.Tensor | None = None,
        progress: Progress | None = None,
    ) -> GeneratedImage:
        """Text-to-image.  The text-unconditional context is empty (or the system prompt in think
        mode); the image-unconditional one equals the conditional one, so ``cfg_img_scale`` only
        rescales text guidance (as in the reference driver).  ``steps`` is the official
        ``num_timesteps``: the schedule's length, ``steps - 1`` model evaluations.  ``think`` first writes a plan that
        conditions the image.  ``noise [h*w, 64]`` overrides the seeded initial noise.  ``height`` and
        ``width`` default to :attr:`default_image_size` (1024 for the official weights)."""
        self._require_generation()
        _require_text(prompt, "prompt")
        sampler = _SamplerSettings.build(steps, cfg_text_scale, cfg_img_scale, cfg_interval, cfg_renorm_type, cfg_renorm_min, timestep_shift)
        height, width = height or self.default_image_size, width or self.default_image_size
        grid = self.engine.latent_grid(height, width)
        generator = torch.Generator().manual_seed(seed)
        ctx = self.engine.new_context()
        if think:
            self._add_text(ctx, prompts.GENERATION_SYSTEM_PROMPT)
        ctx_text = ctx.fork()
        self._add_text(ctx, prompt)
        ctx_img = ctx
        thinking = None
        if think:
            thinking, stream = self._greedy_text(ctx, max_think_tokens)
            ctx = self.engine.close_answer(stream)  # c gets the plan; c_T and c_I do not
        sample, image = self._sample(ctx, ctx_text, ctx_img, grid, noise, generator, sampler, progress)
        record = generation_record(
            model=self.name, task="text-to-image", prompt=prompt, seed=seed, sampler=sampler.record(height, width), thinking=thinking
        )
        return GeneratedImage(image, sample.latents, record, thinking=thinking, velocities=sample.velocities)

    def edit(
        self,
        images: ImageInput | Sequence[ImageInput],
        instruction: str,
        *,
        height: int | None = None,
        width: int | None = None,
        steps: int = 50,
        cfg_text_scale: float = 4.0,
        cfg_img_scale: float = 2.0,
        cfg_interval: tuple[float, float] = (0.0, 1.0),
        cfg_renorm_type: str = "text_channel",
        cfg_renorm_min: float = 0.0,
        timestep_shift: float = 3.0,
        seed: int = 42,
        analyze: bool = True,
        think: bool = False,
        explain: bool = False,
        max_analysis_tokens: int = 800,
        max_explanation_tokens: int = 512,
        noise: torch.Tensor | None = None,
        posterior_noise: Sequence[torch.Tensor] | None = None,
        progress: Progress | None = None,
    ) -> GeneratedImage:
        """Image-conditioned generation: staining, super-resolution, contrast translation,
        counterfactuals.

        ``analyze`` (the official default) first answers the instruction about the image and
        appends that answer to it; ``think`` uses the think-mode variant of that pre-pass.
        ``explain`` adds the generated image to the context and returns the model's text about
        it (e.g. a counterfactual's explanation).  The output size defaults to the input's size
        after the generation resize rule.  ``posterior_noise`` (one ``[z, h/8, w/8]`` per image)
        and ``noise`` override the seeded draws (taken in that order).
        """
        self._require_generation()
        _require_text(instruction, "instruction")
        sampler = _SamplerSettings.build(steps, cfg_text_scale, cfg_img_scale, cfg_interval, cfg_renorm_type, cfg_renorm_min, timestep_shift)
        loaded = [pil for pil, _ in self._images(images)]
        if not loaded:
            raise ValueError("edit needs at least one input image")
        gen_vae, gen_vit = self._transform("generation_vae"), self._transform("generation_vit")
        vae_images = [gen_vae.resize(im) for im in loaded]
        vit_pixels = [gen_vit(im, img_num=len(loaded)) for im in vae_images]
        out_w, out_h = vae_images[0].size
        height, width = height or out_h, width or out_w
        grid = self.engine.latent_grid(height, width)
        generator = torch.Generator().manual_seed(seed)
        z = self.model.config.ae.z_channels
        down = self.model.config.ae.downsample
        if posterior_noise is None:
            posterior_noise = [torch.randn(z, im.size[1] // down, im.size[0] // down, generator=generator) for im in vae_images]
        elif len(posterior_noise) != len(vae_images):
            raise ValueError(f"posterior_noise needs one tensor per image ({len(vae_images)}), got {len(posterior_noise)}")

        analysis = thinking = None
        final_instruction = instruction
        if analyze or think:
            ctx_a = self.engine.new_context()
            if think:
                self._add_text(ctx_a, prompts.UNDERSTANDING_SYSTEM_PROMPT)
            for px in vit_pixels:
                self.engine.add_vit_image(ctx_a, px)
            question = prompts.EDIT_ANALYSIS_THINK_TEMPLATE.format(instruction=instruction) if think else instruction
            self._add_text(ctx_a, question)
            raw, _ = self._greedy_text(ctx_a, max_analysis_tokens)
            if think:
                thinking, analysis = prompts.split_thinking(raw)
                final_instruction = instruction + prompts.EDIT_ANALYSIS_THINK_SEPARATOR + raw
            else:
                analysis = raw
                final_instruction = instruction + prompts.EDIT_ANALYSIS_SEPARATOR + raw

        # c_T: the image blocks (VAE then ViT per image); c: c_T + instruction; c_I: the instruction only.
        ctx_text = self.engine.new_context()
        for im, px, eps in zip(vae_images, vit_pixels, posterior_noise):
            self.engine.add_vae_image(ctx_text, normalize_u8(np.asarray(im)), eps)
            self.engine.add_vit_image(ctx_text, px)
        ctx = ctx_text.fork()
        self._add_text(ctx, final_instruction)
        ctx_img = self.engine.new_context()
        self._add_text(ctx_img, final_instruction)

        sample, image = self._sample(ctx, ctx_text, ctx_img, grid, noise, generator, sampler, progress)

        explanation = None
        if explain:
            ctx_e = ctx.fork()
            self.engine.add_latent_tokens(ctx_e, sample.latents, grid)
            self.engine.add_vit_image(ctx_e, gen_vit(image))
            explanation, _ = self._greedy_text(ctx_e, max_explanation_tokens)
        record = generation_record(
            model=self.name, task="image-to-image", prompt=instruction, conditioning_text=final_instruction, seed=seed,
            sampler=sampler.record(height, width), input_images=len(loaded), thinking=thinking, explanation=explanation,
        )
        return GeneratedImage(
            image, sample.latents, record, thinking=thinking, analysis=analysis, explanation=explanation, velocities=sample.velocities
        )


@dataclass(frozen=True)
class _SamplerSettings:
    """Image sampler settings, checked before any work starts."""

    steps: int
    timestep_shift: float
    guidance: GuidanceConfig

    @classmethod
    def build(cls, steps, cfg_text_scale, cfg_img_scale, cfg_interval, cfg_renorm_type, cfg_renorm_min, timestep_shift) -> "_SamplerSettings":
        if steps < 2:
            raise ValueError(f"steps must be >= 2 (the schedule's length, steps - 1 model evaluations), got {steps}")
        guidance = GuidanceConfig(cfg_text_scale, cfg_img_scale, tuple(cfg_interval), cfg_renorm_type, cfg_renorm_min)
        return cls(steps, timestep_shift, guidance)

    def record(self, height: int, width: int) -> dict:
        """The settings as recorded in generated files (official names: num_timesteps...)."""
        g = self.guidance
        return dict(
            num_timesteps=self.steps, cfg_text_scale=g.cfg_text_scale, cfg_img_scale=g.cfg_img_scale, cfg_interval=list(g.cfg_interval),
            cfg_renorm_type=g.cfg_renorm_type, cfg_renorm_min=g.cfg_renorm_min, timestep_shift=self.timestep_shift, height=height, width=width,
        )
