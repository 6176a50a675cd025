"""`guidekit eval-style`: the content/style pairs, their ideal images and the measures (no model runs here)."""

import json

import numpy as np
import pytest

from guidekit.toy import MODEL_WORLD_VERSION, eval_style as ev
from guidekit.toy.judge import judge
from guidekit.toy.world import render

N = 8


@pytest.fixture(scope="module")
def pairs():
    return ev.make_pairs(N)


def test_pairs_are_fixed_and_shapes_differ_in_even_pairs(pairs):
    again = ev.make_pairs(N)
    for i, (p, q) in enumerate(zip(pairs, again)):
        assert p.content == q.content and p.style == q.style
        assert p.shapes_differ == (i % 2 == 0)
        # every style attribute differs from the content's, so adoption is never free
        assert p.style.colour != p.content.colour
        assert p.style.background != p.content.background
        assert p.style.texture != p.content.texture
        assert p.content.fg_tone is None if MODEL_WORLD_VERSION == 1 else p.content.fg_tone is not None
        assert p.style_prompt == f"a {p.style.colour} {p.style.shape}"
    assert sum(p.shapes_differ for p in pairs) == N // 2


def test_ideal_has_the_contents_layout_and_the_styles_look(pairs):
    for p in pairs:
        assert np.array_equal(p.ideal_mask, p.content_mask)
        assert np.array_equal(render(p.content)[0], p.content_image)
        j = judge(p.ideal_image)
        assert (j.colour, j.background, j.texture) == (p.style.colour, p.style.background, p.style.texture)
        assert j.shape == p.content.shape
        assert j.colour != j.background
        assert ev.layout_iou(j, p.content_mask) > 0.99


def test_ideal_scene_refuses_a_style_without_two_colours(pairs):
    from dataclasses import replace

    bad = replace(pairs[0].style, background=pairs[0].style.colour)
    with pytest.raises(ValueError, match="style"):
        ev.ideal_scene(pairs[0].content, bad)


def test_measure_on_the_ideal_content_and_style_images(pairs):
    ideal = ev.measure([p.ideal_image for p in pairs], pairs)
    assert ideal["layout_iou"] > 0.99
    assert ideal["style_all"] == 1.0 and ideal["content_shape_kept"] == 1.0 and ideal["leakage"] == 0.0
    assert ideal["leakage_pairs"] == N // 2 and ideal["psnr"] > 60 and ideal["ssim"] > 0.99
    # floats in [0, 1] read the same as uint8
    assert ev.measure([p.ideal_image / 255.0 for p in pairs], pairs)["style_all"] == 1.0

    content = ev.measure([p.content_image for p in pairs], pairs)
    assert content["layout_iou"] == 1.0 and content["style_all"] == 0.0 and content["leakage"] == 0.0
    style = ev.measure([p.style_image for p in pairs], pairs)
    assert style["style_all"] == 1.0 and style["leakage"] == 1.0 and style["layout_iou"] < 0.6
    assert style["psnr"] < ideal["psnr"]


def test_layout_iou_of_hand_made_masks():
    from guidekit.toy.judge import Judgement

    want = np.zeros((64, 64), bool)
    want[10:30, 10:30] = True  # 400 pixels
    got = np.zeros((64, 64), bool)
    got[20:40, 10:30] = True  # overlaps 200, union 600
    j = Judgement("red", "blue", "square", None, 1.0, 0.0, 1.0, got)
    assert ev.layout_iou(j, want) == pytest.approx(1 / 3)
    assert ev.layout_iou(Judgement(None, "blue", None, None, 0.0, 0.0), want) == 0.0


def test_measure_refuses_a_count_mismatch(pairs):
    with pytest.raises(ValueError, match="images"):
        ev.measure([pairs[0].ideal_image], pairs)


def test_methods_ask_for_the_right_hooks(pairs):
    import guidekit

    p = pairs[0]
    assert ev.transfer_kwargs("StyleID", p) == {"hooks": []}
    full = ev.transfer_kwargs("StyleID + StyleSSP", p)
    (h,) = full["hooks"]
    assert isinstance(h, guidekit.StyleSSP) and h.frequency and h.negative_inversion_scale > 0
    assert full["style_prompt"] == p.style_prompt
    (h,) = ev.transfer_kwargs("StyleSSP, frequency only", p)["hooks"]
    assert h.frequency and h.negative_inversion_scale == 0
    neg = ev.transfer_kwargs("StyleSSP, negative inversion only", p)
    assert not neg["hooks"][0].frequency and neg["hooks"][0].negative_inversion_scale > 0 and neg["style_prompt"]
    with pytest.raises(ValueError, match="method"):
        ev.transfer_kwargs("nope", p)


def test_markdown_and_save(pairs, tmp_path):
    row = {"method": "StyleID", **ev.measure([p.content_image for p in pairs], pairs), "seconds": 1.0}
    result = {"pairs": N, "pairs_shapes_differ": N // 2, "steps": 2, "rows": [row]}
    table = ev.markdown(result)
    assert "| StyleID | 1.000 |" in table and f"leakage ({N // 2} pairs)" in table
    ev.save(result, tmp_path)
    assert json.loads((tmp_path / "eval_style.json").read_text())["rows"][0]["method"] == "StyleID"


def test_cli_registers_eval_style():
    from click.testing import CliRunner

    from guidekit.apps.cli import SUBCOMMANDS, main

    assert SUBCOMMANDS["eval-style"] == "guidekit.apps.eval_style:eval_style"
    res = CliRunner().invoke(main, ["eval-style", "--help"])
    assert res.exit_code == 0 and "--pairs" in res.output
    res = CliRunner().invoke(main, ["eval-style", "--out", "x", "--pairs", "0"])
    assert res.exit_code != 0
