"""Reading and writing the official UniMedVL / BAGEL checkpoint layout.  The one place that knows it.

A model directory holds (ARCHITECTURE 1):

==========================  =================================================================
``llm_config.json``          Qwen2 fields (:meth:`LLMConfig.from_official_json`)
``vit_config.json``          SigLIP fields; one layer more than is instantiated
``ema.safetensors``          all network weights except the autoencoder (EMA weights; default)
``model.safetensors``        the same keys, raw (non-EMA) weights
``ema_bf16.safetensors`` /   bf16 copies that the UniMedVL scripts prefer when present
``model_bf16.safetensors``
``ae.safetensors``           autoencoder ``encoder.*`` / ``decoder.*`` (``module.`` stripped anywhere)
Qwen2 tokenizer files        ``vocab.json``, ``merges.txt``, ``tokenizer_config.json`` (+ ``tokenizer.json``)
``ae_config.json``           ours, optional: autoencoder widths when they are not FLUX's
``unimedvl_config.json``     ours, optional: BAGEL-level constants when they are not the official ones,
                             and the inference image transforms of a model trained at another scale
==========================  =================================================================

Key map, official file -> our state dict:

* ``ema.safetensors``: identity (our module names are the official ones), except
  ``vae_model.*`` keys, which override the autoencoder loaded from ``ae.safetensors`` (the UniMedVL
  image path attaches the VAE before loading the main checkpoint), and ``vae_batch_norm.*``
  buffers, which only the training-time end-to-end VAE uses and which are reported and ignored;
* a SigLIP conv-shaped patch embedding ``[D, 3, P, P]`` is converted to the linear form
  ``[D, P*P*3]`` (columns ordered row-in-patch, column-in-patch, channel);
* ``ae.safetensors``: ``key.replace("module.", "")`` then the prefix ``vae_model.``.

Unlike the reference loaders (non-strict), every load checks the exact key set and shapes and
raises :class:`CheckpointError` naming the offending keys.  The model is built on the meta device
and each tensor is read from the memory-mapped file, cast and assigned once, so loading needs
about the memory of the weights.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, NamedTuple

import torch
from safetensors.torch import save_file

from .atomic import atomic_path, write_text
from .safetensors_mmap import SafetensorsFile, SafetensorsFormatError
from .safetensors_stream import DTYPE_CODES
from ..config import AutoencoderConfig, ConfigError, InferenceTransforms, LLMConfig, UniMedVLConfig, ViTConfig, json_int
from ..model.quantized import QuantScheme, QuantizationUnavailable, check_scheme, prepare_quantized, quantize_model
from ..model.unimedvl import UniMedVL
from ..precision import resolve_dtype
from ..tokenizer import Tokenizer, has_tokenizer

log = logging.getLogger(__name__)

LLM_CONFIG, VIT_CONFIG, AE_CONFIG, EXTRA_CONFIG = "llm_config.json", "vit_config.json", "ae_config.json", "unimedvl_config.json"
AE_WEIGHTS = "ae.safetensors"
WEIGHT_FILES = {
    "ema": ("ema_bf16.safetensors", "ema.safetensors"),
    "model": ("model_bf16.safetensors", "model.safetensors"),
}
AE_PREFIX = "vae_model."
PATCH_EMBED_KEY = "vit_model.vision_model.embeddings.patch_embedding.weight"
# Keys of the generation adapters and the generation expert (``*_moe_gen*``): an understanding-only
# model (visual_gen=False) has no such parameters, and loading it never reads these tensors.
GENERATION_ONLY = re.compile(r"^(?:(?:time_embedder|vae2llm|llm2vae|latent_pos_embed)\.|.*_moe_gen)")
IGNORED = re.compile(r"^vae_batch_norm\.")
# metadata key of a pre-quantised weight file (formats/quantized_checkpoint.py): its scheme
QUANTIZATION_METADATA = "unimedvl_quantization"


class CheckpointError(ValueError):
    """A model directory or weight file does not match what the model expects."""


# ---- configs ---------------------------------------------------------------------------------


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON file that must hold an object; every failure is a :class:`CheckpointError` naming the file."""
    if not path.is_file():
        raise CheckpointError(f"{path.parent}: required file {path.name} is missing")
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(doc, dict):
        raise CheckpointError(f"{path}: expected a JSON object at the top level, got {type(doc).__name__}")
    return doc


def read_config(directory: str | Path, visual_gen: bool = True) -> UniMedVLConfig:
    """The model config of a checkpoint directory, with the official load-time overrides applied."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: no such model directory (it does not exist)")
    try:
        llm = LLMConfig.from_official_json(read_json_object(directory / LLM_CONFIG), str(directory / LLM_CONFIG))
        vit = ViTConfig.from_official_json(read_json_object(directory / VIT_CONFIG), str(directory / VIT_CONFIG))
        ae = AutoencoderConfig()
        if (directory / AE_CONFIG).is_file():
            ae = AutoencoderConfig.from_json(read_json_object(directory / AE_CONFIG), str(directory / AE_CONFIG))
        cfg = UniMedVLConfig(llm=llm, vit=vit, ae=ae, visual_gen=visual_gen)
        if (directory / EXTRA_CONFIG).is_file():
            extra = read_json_object(directory / EXTRA_CONFIG)
            where = str(directory / EXTRA_CONFIG)
            cfg.latent_patch_size = json_int(extra, "latent_patch_size", where, cfg.latent_patch_size)
            cfg.max_latent_size = json_int(extra, "max_latent_size", where, cfg.max_latent_size)
            cfg.timestep_freq_size = json_int(extra, "timestep_freq_size", where, cfg.timestep_freq_size)
            if "image_transforms" in extra:
                cfg.transforms = InferenceTransforms.from_json(extra["image_transforms"], where)
            grid = json_int(extra, "vit_max_num_patch_per_side", where, cfg.vit_grid)
            if grid != cfg.vit_grid:
                raise CheckpointError(
                    f"{directory / EXTRA_CONFIG}: vit_max_num_patch_per_side={grid} disagrees with "
                    f"vit_config.json image_size/patch_size={cfg.vit_grid}"
                )
        return cfg.validate()
    except ConfigError as e:
        raise CheckpointError(str(e)) from e
    except (TypeError, ValueError, KeyError, ZeroDivisionError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{directory}: invalid model config ({type(e).__name__}: {e})") from e


def write_config(config: UniMedVLConfig, directory: Path, special_ids: tuple[int, int] | None = None) -> None:
    bos, eos = special_ids if special_ids else (None, None)
    write_text(directory / LLM_CONFIG, json.dumps(config.llm.to_official_json(eos, bos), indent=2))
    write_text(directory / VIT_CONFIG, json.dumps(config.vit.to_official_json(), indent=2))
    write_text(directory / AE_CONFIG, json.dumps(config.ae.to_json(), indent=2))
    write_text(directory / EXTRA_CONFIG, json.dumps(config.bagel_json(), indent=2))


# ---- key map ---------------------------------------------------------------------------------


def ae_key_to_model(key: str) -> str:
    return AE_PREFIX + key.replace("module.", "")


def split_official(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Our state dict -> (``ema.safetensors`` tensors, ``ae.safetensors`` tensors).  Inverse of loading."""
    main, ae = {}, {}
    for k, v in state_dict.items():
        if k.startswith(AE_PREFIX):
            ae[k[len(AE_PREFIX):]] = v
        else:
            main[k] = v
    return main, ae


def expected_shapes(config: UniMedVLConfig) -> dict[str, tuple[int, ...]]:
    """Our state-dict keys and shapes, computed on the meta device (no memory)."""
    with torch.device("meta"):
        model = UniMedVL(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def official_manifest(config: UniMedVLConfig) -> dict[str, Any]:
    """Keys and shapes of the official files (``ema.safetensors`` and ``ae.safetensors``) for ``config``."""
    shapes = expected_shapes(config)
    main, ae = split_official(shapes)  # type: ignore[arg-type]
    count = lambda d: sum(int(torch.Size(s).numel()) for s in d.values())  # noqa: E731
    return {
        "description": "state-dict keys and shapes of the official 14B checkpoint layout (ema.safetensors) and of ae.safetensors",
        "ema_params": count(main),
        "ae_params": count(ae),
        "ema": {k: list(main[k]) for k in sorted(main)},
        "ae": {k: list(ae[k]) for k in sorted(ae)},
    }


def _convert(key: str, tensor: torch.Tensor, expected: tuple[int, ...]) -> torch.Tensor:
    if key == PATCH_EMBED_KEY and tensor.ndim == 4 and len(expected) == 2:
        # SigLIP conv [D, 3, P, P] -> linear [D, P*P*3] in (row, column, channel) order.
        tensor = tensor.permute(0, 2, 3, 1).reshape(tensor.shape[0], -1)
    return tensor


def _describe(keys: Iterable[str], limit: int = 5) -> str:
    keys = sorted(keys)
    head = ", ".join(keys[:limit])
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return f"{len(keys)}: {head}{more}"


def check_keys(
    found: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]], source: str
) -> None:
    """Raise :class:`CheckpointError` listing missing, unexpected and mis-shaped keys."""
    missing = set(expected) - set(found)
    unexpected = set(found) - set(expected)
    mismatched = [
        f"{k} (checkpoint {list(found[k])}, model {list(expected[k])})"
        for k in sorted(set(found) & set(expected))
        if tuple(found[k]) != tuple(expected[k])
    ]
    problems = []
    if missing:
        problems.append(f"missing keys {_describe(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_describe(unexpected)}")
    if mismatched:
        problems.append(f"mis-shaped keys {len(mismatched)}: " + "; ".join(mismatched[:5]) + (" ..." if len(mismatched) > 5 else ""))
    if problems:
        raise CheckpointError(f"{source} does not match the model: " + " | ".join(problems))


# ---- loading ---------------------------------------------------------------------------------


def find_weights(directory: Path, weights: str = "ema") -> Path:
    if weights not in WEIGHT_FILES:
        raise CheckpointError(f"weights must be one of {sorted(WEIGHT_FILES)}, got {weights!r}")
    for name in WEIGHT_FILES[weights]:
        if (directory / name).is_file():
            return directory / name
    raise CheckpointError(f"{directory}: no weight file found (looked for {', '.join(WEIGHT_FILES[weights])})")


def open_safetensors(path: Path) -> SafetensorsFile:
    """The header of ``path``, its tensors mapped one at a time (a file larger than memory opens too)."""
    try:
        return SafetensorsFile(path)
    except SafetensorsFormatError as e:
        raise CheckpointError(f"cannot read as safetensors: {e}") from e


class FileHeader(NamedTuple):
    """What a safetensors header says (no tensor data is read)."""

    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]  # safetensors dtype codes: BF16, F32, I8, ...
    metadata: dict[str, str]

    @property
    def scheme(self) -> str | None:
        """The quantisation scheme the file declares (``None``: not quantised)."""
        return self.metadata.get(QUANTIZATION_METADATA)


def read_header(path: Path) -> FileHeader:
    handle = open_safetensors(path)
    return FileHeader({k: handle.shape(k) for k in handle.keys()}, {k: handle.dtype_code(k) for k in handle.keys()},
                      dict(handle.metadata))


def load_pretrained(
    directory: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = "auto",
    weights: str = "ema",
    visual_gen: bool = True,
    load_tokenizer: bool = True,
    quantize: str | None = None,
    device_map: Mapping[str, str] | Callable[[UniMedVL], Mapping[str, str]] | None = None,
) -> tuple[UniMedVL, Tokenizer | None]:
    """Load a model directory in the official layout: ``(model, tokenizer)``.

    ``dtype`` casts every floating-point weight (``auto``: :mod:`unimedvl.precision`'s default for
    ``device``; ``None`` keeps the stored dtype); ``weights`` picks ``ema`` (default) or the raw
    ``model`` weights; ``visual_gen=False`` loads an understanding-only model without the
    autoencoder and generation adapters.  ``quantize`` (``int8``, ``int4``, ``nf4`` or ``fp8``,
    :mod:`unimedvl.model.quantized`) quantises the linear layers of the decoder experts, the ViT and
    the connector while loading, tensor by tensor, so the unquantised model is never held in memory;
    a scheme that a target device cannot run is refused
    (:class:`~unimedvl.model.quantized.QuantizationUnavailable`) before any tensor is read.  A
    pre-quantised checkpoint (``unimedvl quantize``) loads in its own scheme.  The tokenizer is
    ``None`` when the directory has no tokenizer files (or ``load_tokenizer`` is false).

    ``device_map`` (``{state-dict prefix: device}``, or a function of the meta model returning one,
    e.g. :class:`unimedvl.inference.placement.Planner`) reads each tensor straight to the device of
    its longest prefix (``""`` matches every key); ``device`` takes the keys it does not place and
    is the device ``dtype="auto"`` follows.  Hooks that carry activations between the devices are
    installed separately (:func:`unimedvl.inference.placement.apply_placement`).
    """
    directory = Path(directory)
    dtype = resolve_dtype(dtype, device)
    scheme = check_scheme(quantize, device) if quantize is not None else None
    config = read_config(directory, visual_gen=visual_gen)
    weight_path = find_weights(directory, weights)
    header = read_header(weight_path)
    stored_scheme = header.scheme  # a pre-quantised checkpoint (unimedvl quantize)
    if stored_scheme is not None:
        if quantize not in (None, stored_scheme):
            raise CheckpointError(f"{weight_path}: the weights are stored quantised as {stored_scheme}; "
                                  f"they cannot be loaded as {quantize} (load the unquantised checkpoint for that)")
        try:
            scheme = check_scheme(stored_scheme, device)
            quantize = scheme.name
        except QuantizationUnavailable as e:
            raise QuantizationUnavailable(f"{weight_path} is stored {stored_scheme}-quantised: {e}") from e
    if visual_gen and not (directory / AE_WEIGHTS).is_file():
        raise CheckpointError(f"{directory}: required file {AE_WEIGHTS} is missing (needed for image generation; "
                              "load with visual_gen=False for understanding only)")
    expected = expected_shapes(config)

    sources: dict[str, tuple[Path, str]] = {}  # model key -> (file, key in that file)
    shapes: dict[str, tuple[int, ...]] = {}
    ignored = []
    if visual_gen:
        for k, shape in read_header(directory / AE_WEIGHTS).shapes.items():
            sources[ae_key_to_model(k)] = (directory / AE_WEIGHTS, k)
            shapes[ae_key_to_model(k)] = shape
    for k, shape in header.shapes.items():
        if IGNORED.match(k) or (not visual_gen and (GENERATION_ONLY.match(k) or k.startswith(AE_PREFIX))):
            ignored.append(k)
            continue
        if k == PATCH_EMBED_KEY and len(shape) == 4:
            shape = (shape[0], shape[1] * shape[2] * shape[3])
        sources[k] = (weight_path, k)  # vae_model.* keys override ae.safetensors
        shapes[k] = shape
    if ignored:
        log.info("%s: %d checkpoint keys not used by this model (%s)", weight_path.name, len(ignored), _describe(ignored, 3))
    source_name = f"{weight_path}" + (f" + {directory / AE_WEIGHTS}" if visual_gen else "")

    with torch.device("meta"):
        model = UniMedVL(config)
    quantized = quantize_model(model, quantize) if quantize else []  # empty quantised layers on meta
    keep: set[str] = set()  # quantised tensors of a fixed dtype (int8, uint8, fp8, float32 scales): never cast
    if stored_scheme is not None:  # the file holds the quantised layout (the scheme's tensors)
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        keep, wrong = _check_quantized_dtypes(model, quantized, scheme, header)
        if wrong:
            raise CheckpointError(f"{weight_path} ({stored_scheme}-quantised): tensors of the wrong dtype: {'; '.join(wrong[:5])}"
                                  + (f" (+{len(wrong) - 5} more)" if len(wrong) > 5 else ""))
    check_keys(shapes, expected, source_name + (f" ({stored_scheme}-quantised)" if stored_scheme else ""))
    placement = device_map(model) if callable(device_map) else device_map  # planned on the meta model (quantised sizes)
    if quantize and placement:
        for target in sorted({str(d) for d in placement.values()}):
            check_scheme(quantize, target)  # every device the plan uses runs the scheme
    state: dict[str, torch.Tensor] = {}
    for target, items in _by_device(sources, torch.device(device), placement):
        state.update(_read_tensors(
            items,
            lambda key, t: _convert(key, t, expected[key]),
            dtype,
            target,
            quantize_keys=set() if stored_scheme else {f"{name}.weight" for name in quantized},
            scheme=scheme,
            keep=keep,
        ))
    model.load_state_dict(state, strict=True, assign=True)
    del state
    prepare_quantized(model)  # e.g. int4 on CPUs: the kernel's packed layout, one layer at a time
    model.eval()
    tokenizer = None
    if load_tokenizer and has_tokenizer(directory):
        tokenizer = Tokenizer(directory)
        if len(tokenizer) > config.llm.vocab_size:
            raise CheckpointError(
                f"{directory}: the tokenizer has {len(tokenizer)} tokens but the embedding has {config.llm.vocab_size} rows"
            )
    return model, tokenizer


def _by_device(sources: dict[str, tuple[Path, str]], device: torch.device, device_map: Mapping[str, str] | None):
    """``[(device, [(model key, file, file key), ...]), ...]``: each key to the device of its longest
    prefix in ``device_map`` (else ``device``), in reading order within each device."""
    if not device_map:
        return [(device, [(key, path, file_key) for key, (path, file_key) in sources.items()])]
    prefixes = sorted(device_map, key=len, reverse=True)
    groups: dict[torch.device, list] = {}
    for key, (path, file_key) in sources.items():
        prefix = next((p for p in prefixes if p == "" or key == p or key.startswith(p + ".")), None)
        target = device if prefix is None else torch.device(device_map[prefix])
        if target.type == "cpu":
            target = torch.device("cpu")  # a plan's cpu:N placements all live in host memory
        groups.setdefault(target, []).append((key, path, file_key))
    return list(groups.items())


def _check_quantized_dtypes(model: UniMedVL, layers: list[str], scheme: QuantScheme,
                            header: FileHeader) -> tuple[set[str], list[str]]:
    """The stored tensors of the quantised ``layers`` against ``scheme``'s layout: (keys of a fixed
    dtype, problems ``"key is F32 (the int4 scheme stores it as U8)"``).  Missing keys are left to
    :func:`check_keys`."""
    keep, wrong = set(), []
    for name in layers:
        module = model.get_submodule(name)
        for suffix, (stored, _shape) in scheme.layout(module.out_features, module.in_features).items():
            key = f"{name}.{suffix}"
            found = header.dtypes.get(key)
            allowed = {DTYPE_CODES[stored]} if stored is not None else {"F32", "F16", "BF16"}
            if stored is not None:
                keep.add(key)
            if found is not None and found not in allowed:
                wrong.append(f"{key} is {found} (the {scheme.name} scheme stores it as {' or '.join(sorted(allowed))})")
    return keep, wrong


def _read_tensors(items, convert, dtype, device,
                  quantize_keys: set[str] = frozenset(), scheme: QuantScheme | None = None,
                  keep: set[str] = frozenset()) -> dict[str, torch.Tensor]:
    """Read ``(model_key, file, file_key)`` items into tensors of ``dtype`` on ``device``.

    A key in ``quantize_keys`` (a linear weight ``<name>.weight``) is replaced by the tensors that
    ``scheme`` stores for it (``<name>.<suffix>``, :meth:`~unimedvl.model.quantized.QuantScheme.quantize`;
    those of the compute dtype cast to ``dtype``): one float32 copy of that one matrix exists while
    it is quantised.  Keys in ``keep`` (the fixed-dtype tensors of a pre-quantised file, fp8
    included) are never cast.

    Every tensor is its own private mapping of its bytes in the file (:mod:`.safetensors_mmap`):
    tensors that need no cast and stay on the CPU keep pointing into the file (zero-copy); a cast,
    moved or quantised tensor is a copy, and its source mapping is dropped as soon as the copy is
    made, so the peak stays close to the size of the loaded weights plus one source tensor.
    """
    state: dict[str, torch.Tensor] = {}
    handles: dict[Path, SafetensorsFile] = {}
    for key, path, file_key in items:
        if path not in handles:
            handles[path] = open_safetensors(path)
        handle = handles[path]
        tensor = handle.get_tensor(file_key)
        if not tensor.is_floating_point() and key not in keep:
            raise CheckpointError(f"{path}: tensor {file_key!r} is {str(tensor.dtype).removeprefix('torch.')}; "
                                  "expected a floating-point dtype (float32, float16 or bfloat16)")
        tensor = convert(key, tensor)
        if key in quantize_keys:
            layout = scheme.layout(*tensor.shape)
            for suffix, stored in scheme.quantize(tensor).items():
                if layout[suffix][0] is None:  # float32 from quantize -> the compute dtype
                    stored = stored.to(dtype or tensor.dtype)
                state[key.removesuffix("weight") + suffix] = stored.to(device)
            continue
        if dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype and key not in keep:
            tensor = tensor.to(dtype)
        if tensor.device != device:
            tensor = tensor.to(device)
        state[key] = tensor
    return state


# ---- saving ----------------------------------------------------------------------------------


def save_safetensors_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` to ``path`` via a temporary file and a rename: no partial file is ever visible."""
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata or {"format": "pt"})


def save_pretrained(
    model: UniMedVL,
    directory: str | Path,
    *,
    weights: str = "ema",
    dtype: torch.dtype | None = None,
    tokenizer: Tokenizer | None = None,
) -> Path:
    """Write ``model`` in the official layout (``{weights}.safetensors``, ``ae.safetensors``, configs,
    tokenizer).  ``dtype`` casts the stored tensors (``None``: as they are)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    sd = model.state_dict()
    if dtype is not None:
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    main, ae = split_official(sd)
    save_safetensors_atomic(main, directory / f"{weights}.safetensors")
    if ae:
        save_safetensors_atomic(ae, directory / AE_WEIGHTS)
    if tokenizer is not None:
        tokenizer.save(directory)
    special = (tokenizer.special.bos, tokenizer.special.eos) if tokenizer is not None else None
    write_config(model.config, directory, special)
    return directory
