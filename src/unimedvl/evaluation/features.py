"""Image feature extractors for FID/KID, loaded from local weight files only, and a per-image cache.

``inception-v3-fid`` (the default) is the FID Inception-v3 (:mod:`.inception`) with the weights of
the pytorch-fid port of the TensorFlow graph - the file ``pt_inception-2015-12-05-6726825d.pth``
that pytorch-fid and torchmetrics download; give its local path.  Images are read as 8-bit RGB
(grayscale replicated), scaled to ``[0, 1]`` and resized to 299x299 bilinear inside the network.

Other extractors plug in with :func:`register_feature_extractor`: a factory
``(weights_path, device) -> FeatureExtractor``.  Features of a file are cached by the SHA-256 of its
bytes (:class:`FeatureCache`), so re-scoring a run, or scoring the same reference images against
several models, only extracts what is new.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..formats.atomic import write_bytes


class FeatureExtractor(Protocol):
    name: str
    dim: int

    def __call__(self, images: list[Image.Image]) -> np.ndarray:
        """``[len(images), dim]`` float features."""


class FeatureWeightsError(ValueError):
    """A feature extractor's weights file is missing, unreadable or has the wrong keys/shapes."""


_EXTRACTORS: dict[str, Callable[[Path, str], FeatureExtractor]] = {}


def register_feature_extractor(name: str, factory: Callable[[Path, str], FeatureExtractor]) -> None:
    """Make ``factory(weights_path, device)`` available as ``--extractor NAME``."""
    _EXTRACTORS[name] = factory


def feature_extractors() -> list[str]:
    return sorted(_EXTRACTORS)


def load_feature_extractor(name: str, weights: str | Path, device: str = "cpu") -> FeatureExtractor:
    if name not in _EXTRACTORS:
        raise ValueError(f"unknown feature extractor {name!r}; registered: {feature_extractors()}")
    return _EXTRACTORS[name](Path(weights), device)


def load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    """A ``.pth``/``.bin`` (tensors only, no code execution) or ``.safetensors`` state dict."""
    if not path.is_file():
        raise FeatureWeightsError(f"{path}: weights file not found (nothing is downloaded; give a local file)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch/safetensors raise several types for corrupt files
        raise FeatureWeightsError(f"{path}: not a readable state dict ({type(e).__name__}: {e})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise FeatureWeightsError(f"{path}: expected a state dict, found {type(state).__name__}")
    return state


def load_checked(module: torch.nn.Module, state: dict[str, torch.Tensor], path: Path, optional_prefixes: tuple[str, ...] = ()) -> None:
    """Load ``state`` into ``module`` requiring every parameter/buffer (``num_batches_tracked`` and
    keys under ``optional_prefixes`` may be absent) with matching shapes; errors name the keys
    (:func:`unimedvl.formats.checkpoint.check_keys`)."""
    from ..formats.checkpoint import CheckpointError, check_keys

    def optional(key: str) -> bool:
        return key.endswith("num_batches_tracked") or key.startswith(optional_prefixes)

    expected = {k: tuple(v.shape) for k, v in module.state_dict().items() if not optional(k) or k in state}
    try:
        check_keys({k: tuple(v.shape) for k, v in state.items()}, expected, f"{path} ({type(module).__name__})")
    except CheckpointError as e:
        raise FeatureWeightsError(str(e)) from None
    module.load_state_dict(state, strict=False)


def rgb01(image: Image.Image) -> torch.Tensor:
    """An image as ``[3, H, W]`` float in ``[0, 1]`` (8-bit RGB; grayscale replicated)."""
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)


@dataclass
class InceptionFeatures:
    network: torch.nn.Module
    device: str = "cpu"
    name: str = "inception-v3-fid"
    dim: int = 2048

    @torch.inference_mode()
    def __call__(self, images: list[Image.Image]) -> np.ndarray:
        from .inception import resize_to_input

        # resizing one image at a time is the same arithmetic as the batched resize, and lets sizes differ
        batch = torch.cat([resize_to_input(rgb01(im)[None]) for im in images]).to(self.device)
        return self.network.pool_features(batch).double().cpu().numpy()


def _inception_factory(weights: Path, device: str) -> InceptionFeatures:
    from .inception import InceptionV3FID

    net = InceptionV3FID()
    load_checked(net, load_state_dict_file(weights), weights, optional_prefixes=("fc.",))
    return InceptionFeatures(net.eval().to(device), device)


register_feature_extractor("inception-v3-fid", _inception_factory)


@dataclass
class ImageSource:
    """An image file's bytes, read lazily (a file, a Parquet cell, base64 text); ``label`` says
    where the image is, for messages."""

    label: str
    read_bytes: Callable[[], bytes]
    _digest: str | None = field(default=None, init=False, repr=False)

    def digest(self) -> str:
        """SHA-256 of the bytes, computed once (the cache key of every extractor)."""
        if self._digest is None:
            self._digest = hashlib.sha256(self.read_bytes()).hexdigest()
        return self._digest

    @classmethod
    def from_path(cls, path: str | Path) -> "ImageSource":
        return cls(str(path), Path(path).read_bytes)

    @classmethod
    def from_bytes(cls, data: bytes, label: str) -> "ImageSource":
        return cls(label, lambda: data)

    def image(self) -> Image.Image:
        try:
            with Image.open(io.BytesIO(self.read_bytes())) as im:
                im.load()
                return im.convert("RGB")
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"{self.label}: not a readable image ({e})") from None


class FeatureCache:
    """Features of images keyed by the SHA-256 of their bytes, one ``.npy`` per image under
    ``root/<extractor name>/``; written atomically, so an interrupted run leaves only whole entries."""

    def __init__(self, root: str | Path, extractor: FeatureExtractor):
        self.root = Path(root) / extractor.name
        self.extractor = extractor

    def _entry(self, digest: str) -> Path:
        return self.root / digest[:2] / f"{digest}.npy"

    def features(self, sources: list[ImageSource], batch_size: int = 32, progress: Callable | None = None) -> np.ndarray:
        """``[len(sources), dim]`` features, extracting (in batches) only the images not cached yet."""
        digests = [s.digest() for s in sources]
        todo = [i for i, d in enumerate(digests) if not self._entry(d).is_file()]
        if progress is not None and len(todo) < len(sources):
            progress(len(sources) - len(todo))  # cached ones count as done
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            feats = self.extractor([sources[i].image() for i in chunk])
            for i, f in zip(chunk, feats):
                buf = io.BytesIO()
                np.save(buf, np.asarray(f, dtype=np.float64))
                write_bytes(self._entry(digests[i]), buf.getvalue())
            if progress is not None:
                progress(len(chunk))
        if not digests:
            return np.zeros((0, self.extractor.dim))
        return np.stack([np.load(self._entry(d)) for d in digests])
