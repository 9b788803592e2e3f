"""BioMedCLIP score (EVALUATION.md 4.2) from a local BiomedCLIP checkpoint, without open_clip or
torchvision.

``load_biomedclip(DIR)`` reads the checkpoint as the Hugging Face hub distributes it
(``open_clip_pytorch_model.bin`` or ``open_clip_model.safetensors`` plus ``open_clip_config.json``)
into :class:`.clip_towers.ClipTowers`; the tower sizes come from the weights' shapes, attention
heads from the config (or width / 64).  The text tokenizer (BiomedBERT's ``vocab.txt`` or
``tokenizer.json``) is read from ``DIR`` or from ``tokenizer_dir``; nothing is downloaded.

Preprocessing is the checkpoint's: shortest side resized to the input size (bicubic), centre crop,
RGB, normalised with the config's mean/std (CLIP's by default).  Prompts are truncated to the text
context length (256 tokens for BiomedCLIP).  A score is the cosine similarity of the L2-normalised
image and prompt embeddings; :func:`clip_score` gives the CLIPScore form ``2.5 * max(cos, 0)``.
Which of the two the paper reports is unverified, so runs report both.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .clip_towers import ClipTowers, TextTower, Visual, VisionTransformer
from .features import FeatureWeightsError, load_checked, load_state_dict_file

WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin", "pytorch_model.bin", "model.safetensors")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
VIT_HEADS = {"vit_base_patch16_224": 12, "vit_base_patch32_224": 12, "vit_large_patch16_224": 16, "vit_small_patch16_224": 6}
IGNORED_KEYS = ("text.transformer.embeddings.position_ids", "text.transformer.pooler.")


def clip_score(cosine):
    """The CLIPScore scaling of a cosine similarity: ``2.5 * max(cos, 0)``."""
    return 2.5 * np.maximum(np.asarray(cosine, dtype=np.float64), 0.0)


@dataclass
class BiomedCLIP:
    towers: ClipTowers
    tokenizer: object
    image_size: int
    context_length: int = 256
    mean: tuple = CLIP_MEAN
    std: tuple = CLIP_STD
    device: str = "cpu"
    name: str = "biomedclip-image"
    dim: int = field(init=False)

    def __post_init__(self):
        self.dim = self.towers.visual.head.proj.out_features

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """Resize the shortest side (bicubic), centre-crop, normalise: ``[3, S, S]``."""
        s = self.image_size
        image = image.convert("RGB")
        w, h = image.size
        scale = s / min(w, h)
        nw, nh = max(s, round(w * scale)), max(s, round(h * scale))
        image = image.resize((nw, nh), Image.BICUBIC)
        left, top = int(round((nw - s) / 2.0)), int(round((nh - s) / 2.0))
        image = image.crop((left, top, left + s, top + s))
        x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
        return (x - torch.tensor(self.mean)[:, None, None]) / torch.tensor(self.std)[:, None, None]

    @torch.inference_mode()
    def __call__(self, images: list[Image.Image]) -> np.ndarray:
        """L2-normalised image embeddings ``[n, dim]`` (usable as a :class:`.features.FeatureExtractor`)."""
        pixels = torch.stack([self.preprocess(im) for im in images]).to(self.device)
        return self.towers.encode_image(pixels).double().cpu().numpy()

    @torch.inference_mode()
    def embed_texts(self, texts: list[str]) -> np.ndarray:
        enc = self.tokenizer(list(texts), max_length=self.context_length, truncation=True, padding=True, return_tensors="pt")
        return self.towers.encode_text(enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)).double().cpu().numpy()

    def cosine(self, image_embeddings: np.ndarray, texts: list[str], batch_size: int = 64) -> np.ndarray:
        """Per-pair cosine similarity of (already normalised) image embeddings and their prompts."""
        if len(image_embeddings) != len(texts):
            raise ValueError(f"{len(image_embeddings)} images for {len(texts)} prompts")
        text = np.concatenate([self.embed_texts(texts[i:i + batch_size]) for i in range(0, len(texts), batch_size)]) if texts \
            else np.zeros((0, self.dim))
        return np.sum(np.asarray(image_embeddings) * text, axis=1)


def _count(state: dict, prefix: str) -> int:
    idx = {int(k[len(prefix):].split(".")[0]) for k in state if k.startswith(prefix)}
    return max(idx) + 1 if idx else 0


def _tokenizer(dirs: list[Path]):
    from transformers import AutoTokenizer, BertTokenizerFast

    for d in dirs:
        if (d / "tokenizer.json").is_file() or (d / "tokenizer_config.json").is_file():
            return AutoTokenizer.from_pretrained(str(d), local_files_only=True)
        if (d / "vocab.txt").is_file():
            return BertTokenizerFast(vocab_file=str(d / "vocab.txt"), do_lower_case=True)
    raise FeatureWeightsError(f"no text tokenizer (vocab.txt or tokenizer.json) in {', '.join(map(str, dirs))}; "
                              "give the BiomedBERT tokenizer folder with --biomedclip-tokenizer")


def load_biomedclip(directory: str | Path, tokenizer_dir: str | Path | None = None, device: str = "cpu") -> BiomedCLIP:
    from transformers import BertConfig, BertModel

    directory = Path(directory)
    if not directory.is_dir():
        raise FeatureWeightsError(f"{directory}: BiomedCLIP folder not found")
    weights = next((directory / f for f in WEIGHT_FILES if (directory / f).is_file()), None)
    if weights is None:
        raise FeatureWeightsError(f"{directory}: none of {WEIGHT_FILES}")
    config_path = directory / "open_clip_config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    model_cfg, pre_cfg = config.get("model_cfg", config), config.get("preprocess_cfg", {})
    vision_cfg, text_cfg = model_cfg.get("vision_cfg", {}), model_cfg.get("text_cfg", {})
    state = {k: v for k, v in load_state_dict_file(weights).items() if not k.startswith(IGNORED_KEYS)}
    try:
        width = state["visual.trunk.cls_token"].shape[-1]
        patch = state["visual.trunk.patch_embed.proj.weight"].shape[-1]
        grid = math.isqrt(state["visual.trunk.pos_embed"].shape[1] - 1)
        embed_dim = state["visual.head.proj.weight"].shape[0]
        mlp_hidden = state["visual.trunk.blocks.0.mlp.fc1.weight"].shape[0]
        words = state["text.transformer.embeddings.word_embeddings.weight"]
        text_width = words.shape[1]
        bert = BertConfig(
            vocab_size=words.shape[0], hidden_size=text_width,
            num_hidden_layers=_count(state, "text.transformer.encoder.layer."),
            num_attention_heads=int(text_cfg.get("heads", text_width // 64)),
            intermediate_size=state["text.transformer.encoder.layer.0.intermediate.dense.weight"].shape[0],
            max_position_embeddings=state["text.transformer.embeddings.position_embeddings.weight"].shape[0],
            type_vocab_size=state["text.transformer.embeddings.token_type_embeddings.weight"].shape[0],
            pad_token_id=int(text_cfg.get("pad_id", 0)),
        )
    except KeyError as e:
        raise FeatureWeightsError(f"{weights}: not an open_clip ViT + BERT checkpoint (no {e.args[0]})") from None
    heads = int(vision_cfg.get("heads") or VIT_HEADS.get(vision_cfg.get("timm_model_name", ""), max(1, width // 64)))
    trunk = VisionTransformer(grid * patch, patch, width, _count(state, "visual.trunk.blocks."), heads, mlp_hidden)
    towers = ClipTowers(Visual(trunk, embed_dim, width), TextTower(BertModel(bert, add_pooling_layer=False), text_width, embed_dim))
    load_checked(towers, state, weights, optional_prefixes=("logit_scale", "text.transformer.embeddings.position_ids"))
    return BiomedCLIP(
        towers.eval().to(device), _tokenizer(([Path(tokenizer_dir)] if tokenizer_dir else []) + [directory]),
        image_size=int(vision_cfg.get("image_size", grid * patch)),
        context_length=int(text_cfg.get("context_length", 256)),
        mean=tuple(pre_cfg.get("mean", CLIP_MEAN)), std=tuple(pre_cfg.get("std", CLIP_STD)), device=device,
    )
