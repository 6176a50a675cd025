"""The toy world: generator determinism, caption grammar and its errors, judge accuracy on real data."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch

from guidekit.toy import world
from guidekit.toy.judge import judge, score

torch.set_num_threads(1)


def test_generator_is_a_pure_function_of_the_seed():
    a, b = world.generate(123), world.generate(123)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask) and a.caption == b.caption
    assert a.image.shape == (64, 64, 3) and a.image.dtype == np.uint8
    assert a.mask.shape == (64, 64) and a.mask.dtype == bool and 0 < a.mask.sum() < 64 * 64
    images, captions, masks = world.generate_batch([5, 123, 7])
    assert np.array_equal(images[1], a.image) and captions[1] == a.caption and np.array_equal(masks[1], a.mask)
    # different seeds differ
    assert not np.array_equal(world.generate(124).image, a.image)


def test_render_is_a_pure_function_of_the_scene_and_mask_marks_the_shape():
    s = world.generate(42)
    image, mask = world.render(s.scene)
    assert np.array_equal(image, s.image)
    fg = np.array(world.PALETTE[s.scene.colour], dtype=float)
    bg = np.array(world.PALETTE[s.scene.background], dtype=float)
    px = image[mask].astype(float)
    # pixels at least half covered by the shape are nearer the shape colour than either background shade
    d_fg = np.abs(px - fg).sum(-1)
    assert (d_fg <= np.abs(px - bg).sum(-1)).all() and (d_fg <= np.abs(px - bg * world.DARK_FACTOR).sum(-1)).all()
    assert (d_fg == 0).mean() > 0.5  # and most of them are exactly the shape colour
    scene = world.scene_from_caption("a blue triangle on a yellow dotted background", seed=3)
    assert (scene.colour, scene.shape, scene.background, scene.texture) == ("blue", "triangle", "yellow", "dotted")


def test_captions_follow_the_grammar():
    assert world.caption("red", "circle", "blue") == "a red circle on a blue background"
    assert world.caption("red", "circle", "blue", "striped") == "a red circle on a blue striped background"
    caps = world.all_captions()
    assert len(caps) == len(set(caps)) == 6 * 5 * 3 * 3
    for c in caps:
        p = world.parse_caption(c)
        assert world.caption(p["colour"], p["shape"], p["background"], p["texture"]) == c
    seen = {world.generate(s).caption for s in range(300)}
    assert seen <= set(caps) and len(seen) > 100
    # colours never coincide, and the palette is saturated and stays off 0/255
    for rgb in world.PALETTE.values():
        assert 0 < min(rgb) and max(rgb) < 255 and (max(rgb) - min(rgb)) / max(rgb) > 0.7


@pytest.mark.parametrize(
    "args, name, accepted",
    [
        (("purple", "circle", "blue"), "colour", "red"),
        (("red", "hexagon", "blue"), "shape", "triangle"),
        (("red", "circle", "white"), "background", "magenta"),
        (("red", "circle", "blue", "plaid"), "texture", "striped"),
        (("red", "circle", "red"), "background", "yellow"),
    ],
)
def test_caption_errors_name_the_argument_and_what_is_accepted(args, name, accepted):
    with pytest.raises(ValueError) as err:
        world.caption(*args)
    assert str(err.value).startswith(name + ":") and accepted in str(err.value)


@pytest.mark.parametrize(
    "text",
    [
        "a red circle on a red background",
        "a purple circle on a blue background",
        "red circle on a blue background",
        "a red circle over a blue background",
        "a red circle on a blue",
        "a circle red on a blue background",
        "a red circle on a blue striped dotted background",
        "a red circle on a blue plaid background",
    ],
)
def test_parse_caption_rejects_bad_captions(text):
    with pytest.raises(ValueError, match=r"\w+: .*(accepted|grammar)"):
        world.parse_caption(text)


def test_judge_reads_generated_images_back():
    images, captions, _ = world.generate_batch(range(900_000, 900_600))
    acc = score(images, captions)
    for key in ("colour", "background", "shape", "all3", "texture", "texture_asked"):
        assert acc[key] >= 0.99, (key, acc)
    # float images in [0, 1] (pipeline "np" output) give the same answers
    j = judge(images[0].astype(np.float32) / 255.0)
    p = world.parse_caption(captions[0])
    assert (j.colour, j.background, j.shape, j.texture) == (p["colour"], p["background"], p["shape"], p["texture"])


def test_judge_does_not_see_shapes_in_noise_or_flat_images():
    flat = np.full((64, 64, 3), world.PALETTE["green"], dtype=np.uint8)
    j = judge(flat)
    assert j.background == "green" and j.colour is None and j.shape is None and j.texture is None
    with pytest.raises(ValueError, match="image"):
        judge(np.zeros((64, 64)))
