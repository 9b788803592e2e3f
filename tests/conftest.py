import os
from pathlib import Path

import pytest
import torch

from unimedvl import UniMedVL, UniMedVLConfig

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("UNIMEDVL_SHARED", REPO.parent / "shared"))
FIXTURE_A = SHARED / "fixtures" / "official_tiny_a"


@pytest.fixture(scope="session")
def fixture_a() -> Path:
    if not (FIXTURE_A / "golden" / "reference_outputs.safetensors").is_file():
        pytest.fail(f"reference fixture not found at {FIXTURE_A} (set UNIMEDVL_SHARED to the shared/ directory)")
    return FIXTURE_A


@pytest.fixture(scope="module")
def pipe(fixture_a):
    """The reference fixture as a pipeline (fp32), shared by a test module."""
    from unimedvl.inference import UniMedVLPipeline

    return UniMedVLPipeline.from_pretrained(fixture_a, dtype="fp32")


@pytest.fixture(scope="module")
def image(fixture_a):
    from PIL import Image

    return Image.open(fixture_a / "test_image.png").convert("RGB")


@pytest.fixture
def forward_tokens(pipe, monkeypatch) -> list[int]:
    """The token count of every forward ``pipe``'s engine runs during the test, in order."""
    calls: list[int] = []
    original = pipe.engine.forward

    def counting(batch, *args, **kwargs):
        calls.append(batch.num_tokens)
        return original(batch, *args, **kwargs)

    monkeypatch.setattr(pipe.engine, "forward", counting)
    return calls


def tiny_config(**overrides) -> UniMedVLConfig:
    return UniMedVLConfig.from_preset("tiny", **overrides)


def random_model(config: UniMedVLConfig | None = None, seed: int = 0, dtype=torch.float32) -> UniMedVL:
    """A tiny model whose every parameter is random (experts differ, llm2vae non-zero), so tests
    can tell the experts and token kinds apart."""
    model = UniMedVL.from_config(config or tiny_config(), seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("pos_embed"):
                continue
            noise = torch.randn(p.shape, generator=g)
            if p.ndim == 1 and ("norm" in name):
                p.copy_(1.0 + 0.1 * noise)
            elif p.ndim == 1:
                p.copy_(0.02 * noise)
            else:
                fan_in = p[0].numel()
                p.copy_(noise / fan_in**0.5)
    return model.to(dtype).eval()


@pytest.fixture(scope="session")
def demo_dataset(tmp_path_factory) -> Path:
    """The demo corpus at two procedural images per label, built once per test session (read-only)."""
    from unimedvl.data.build_config import load_build_config
    from unimedvl.data.builder import build
    from unimedvl.data.demo import stage_demo

    out = tmp_path_factory.mktemp("demo-corpus")
    config, _ = stage_demo(out, per_label=2)
    build(load_build_config(config), out / "dataset")
    return out / "dataset"
