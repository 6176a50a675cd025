"""The toy judge's shape mask and shape fidelity; its accuracy on the v1 world (the shipped model's data)."""

import dataclasses

import numpy as np
import pytest

from guidekit.toy import world
from guidekit.toy.judge import FILL_BANDS, MIN_FIDELITY, fidelity_summary, judge, judge_batch, mask_fidelity, score, shape_fidelity


@pytest.fixture(scope="module")
def world_batch():
    images, captions, masks = world.generate_batch(range(910_000, 910_300))
    return images, captions, masks, judge_batch(images)


def test_judge_mask_is_the_worlds_mask(world_batch):
    """The judge's mask (pixels at least half the shape's colour, largest connected part) is the world's own
    mask of pixels the shape covers at least half."""
    _, _, masks, judgements = world_batch
    iou = [(j.mask & m).sum() / (j.mask | m).sum() for j, m in zip(judgements, masks)]
    assert np.mean(iou) > 0.995 and np.min(iou) > 0.9


def test_world_shapes_have_high_fidelity(world_batch):
    _, captions, masks, judgements = world_batch
    summary = fidelity_summary(judgements)
    assert summary["fidelity"] >= 0.95, summary
    # pixel quantisation costs thin triangle tips most; squares are nearly exact
    for shape, floor in (("circle", 0.94), ("square", 0.98), ("triangle", 0.92)):
        assert summary[f"fidelity_{shape}"] >= floor, summary
    assert all(0 < j.fidelity <= 1 for j in judgements)
    # the world's own mask scores the same as the judged one
    shapes = [world.parse_caption(c)["shape"] for c in captions]
    own = np.mean([mask_fidelity(m, s) for m, s in zip(masks, shapes)])
    assert own == pytest.approx(summary["fidelity"], abs=0.005)


def _canvas(mask, fg=(200, 60, 50), bg=(40, 80, 200)):
    return np.where(mask[..., None], np.array(fg, np.uint8), np.array(bg, np.uint8))


def _polar_mask(radius_of_angle, cx=32.0, cy=32.0):
    """A star-like shape drawn by hand: pixels whose centre lies within radius(angle) of the centre."""
    y, x = np.mgrid[0:64, 0:64] + 0.5
    return np.hypot(x - cx, y - cy) <= radius_of_angle(np.arctan2(y - cy, x - cx))


def test_deformed_shapes_score_clearly_lower():
    ideal = world.render(world.scene_from_caption("a red circle on a blue background", seed=1))[0]
    assert shape_fidelity(ideal) > 0.95
    star = _canvas(_polar_mask(lambda a: 16 * (0.6 + 0.4 * np.cos(5 * a))))
    lumpy = _canvas(_polar_mask(lambda a: 16 * (1 + 0.12 * np.cos(3 * a))))
    # a square with a bite out of the middle of each side (concave sides)
    y, x = np.mgrid[0:64, 0:64] + 0.5
    square = (np.abs(x - 32) <= 15) & (np.abs(y - 32) <= 15)
    bites = np.min([np.hypot(x - 32 - dx, y - 32 - dy) for dx, dy in ((19, 0), (-19, 0), (0, 19), (0, -19))], 0) < 8
    concave = _canvas(square & ~bites)
    assert shape_fidelity(_canvas(square)) > 0.99
    for name, image, kind in (("star", star, "circle"), ("lumpy circle", lumpy, "circle"),
                              ("concave square", concave, "square")):
        f = shape_fidelity(image, shape=kind)
        assert f < 0.9, (name, f)
    assert shape_fidelity(star, "circle") < 0.75


def test_fidelity_fits_position_size_and_aspect():
    """The ideal is fitted to the mask's bounding box: a wide rectangle or an ellipse is still ideal."""
    y, x = np.mgrid[0:64, 0:64] + 0.5
    assert mask_fidelity((np.abs(x - 20) <= 12) & (np.abs(y - 40) <= 6), "square") == 1.0
    ellipse = world.shape_coverage("circle", 30.3, 33.7, 20.0, 11.0) >= 0.5
    assert mask_fidelity(ellipse, "circle") > 0.95
    assert np.isnan(mask_fidelity(np.zeros((64, 64), bool), "circle"))
    with pytest.raises(ValueError, match="shape: .*circle"):
        mask_fidelity(ellipse, "hexagon")
    with pytest.raises(ValueError, match="mask"):
        mask_fidelity(np.zeros((64, 32), bool), "circle")


def test_judge_still_reads_the_v1_world():
    """The shipped weights were trained on the v1 world (fixed PALETTE colours); the judge reads it as before."""
    seeds = range(920_000, 920_300)
    scenes = [dataclasses.replace(world.sample_scene(s), fg_tone=None, bg_tone=None, shade=(0.0, 0.0)) for s in seeds]
    images = np.stack([world.render(sc)[0] for sc in scenes])
    acc = score(images, [sc.caption for sc in scenes])
    assert min(acc.values()) >= 0.99, acc


def test_no_shape_means_no_fidelity():
    flat = np.full((64, 64, 3), (90, 200, 120), dtype=np.uint8)
    j = judge(flat)
    assert j.shape is None and j.mask is None and np.isnan(j.fidelity) and np.isnan(shape_fidelity(flat))


def _blob():
    """An irregular blob: a few discs of varied size joined by thin bridges, as a model draws when it fails."""
    y, x = np.mgrid[0:64, 0:64] + 0.5
    blob = np.zeros((64, 64), bool)
    for cx, cy, r in ((20, 20, 5), (44, 26, 4), (30, 46, 6), (26, 33, 2)):
        blob |= np.hypot(x - cx, y - cy) <= r
    blob |= (np.abs(y - 20) <= 1) & (x > 20) & (x < 44)
    blob |= (np.abs(x - 25) <= 1) & (y > 20) & (y < 46)
    return _canvas(blob, fg=(190, 170, 40), bg=(200, 40, 40))


def test_strict_judge_reads_no_shape_into_a_blob():
    lenient, strict = judge(_blob(), strict=False), judge(_blob())
    assert lenient.shape is not None  # the corners alone read some kind into it
    assert strict.shape is None and strict.outline == lenient.shape
    assert strict.colour == "yellow" and strict.fidelity == lenient.fidelity < MIN_FIDELITY
    acc = score([_blob()], ["a yellow circle on a red background"], [strict])
    assert acc["colour"] == 1.0 and acc["shape"] == 0.0 and acc["all3"] == 0.0


def test_strict_judge_refuses_a_fill_outside_the_kinds_band():
    """A thin ring has corners like a circle and a fair outline IoU with nothing, but only a sixth of its box."""
    y, x = np.mgrid[0:64, 0:64] + 0.5
    d = np.hypot(x - 32, y - 32)
    ring = _canvas((d <= 16) & (d >= 13))
    j = judge(ring)
    assert j.shape is None and j.fill < FILL_BANDS["circle"][0]


def test_strict_limits_keep_the_world_right(world_batch):
    """The limits are set on the world: its own images never come near them."""
    images, captions, _, judgements = world_batch
    assert score(images, captions, judgements)["all3"] == 1.0
    for j in judgements:
        low, high = FILL_BANDS[j.shape]
        assert j.fidelity >= MIN_FIDELITY + 0.08 and low + 0.06 <= j.fill <= high
