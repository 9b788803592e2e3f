"""Augmentation of understanding images: seeded, bounded, never mirrored, never applied to pixels
that are the answer (generation targets, editing pairs)."""

import numpy as np
import pytest

from unimedvl.training.augment import augment_image, augment_understanding
from unimedvl.training.sequence import PlanItem


def test_augmented_images_keep_laterality_and_are_reproducible():
    img = np.zeros((64, 64, 3), np.uint8)
    img[:, :20] = 220  # a bright left side
    img[:, 20:] = 40
    for seed in range(20):
        out = augment_image(img, np.random.default_rng(seed))
        h, w = out.shape[:2]
        assert 44 <= h <= 64 and 44 <= w <= 64
        assert out[:, : w // 4].mean() > out[:, -(w // 4):].mean() + 60  # never flipped
        np.testing.assert_array_equal(out, augment_image(img, np.random.default_rng(seed)))
    variants = {augment_image(img, np.random.default_rng(s)).tobytes() for s in range(10)}
    assert len(variants) == 10


def test_only_the_images_read_are_augmented():
    rng = np.random.default_rng(0)
    px = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
    plan = [PlanItem("vit", pixels=px), PlanItem("text", ids=[1, 2], loss=True), PlanItem("vae", pixels=px, loss=True)]
    out = augment_understanding(plan, np.random.default_rng(1))
    assert out[1] is plan[1] and out[2] is plan[2]
    assert not np.array_equal(out[0].pixels, px) and plan[0].pixels is px  # the record's own plan is untouched


def test_plan_checks_the_augment_flag():
    from unimedvl.training.plan import PlanError, parse_plan

    doc = {"name": "t", "stages": [{"name": "s", "steps": 1, "mixture": {"understanding": 1}, "augment": "yes"}]}
    with pytest.raises(PlanError, match="augment must be bool"):
        parse_plan(doc)
    doc["stages"][0]["augment"] = True
    assert parse_plan(doc).stages[0].augment
