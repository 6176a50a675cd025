"""The embedded model's style task (`guidekit.toy.style_task`) and `guidekit eval-style`: the pairs, their ideal
images, the measures on hand-made and reference images, the bootstrap intervals, the table (no model runs)."""

import json
from dataclasses import replace

import numpy as np
import pytest

from guidekit.toy import MODEL_WORLD_VERSION, eval_style as ev, style_task as st
from guidekit.toy.judge import Judgement, judge
from guidekit.toy.world import PALETTE, render

N = 8


@pytest.fixture(scope="module")
def pairs():
    return st.make_pairs(N)


def test_pairs_follow_the_rule_and_are_fixed(pairs):
    again = st.make_pairs(N)
    for p, q in zip(pairs, again):
        assert p.content == q.content and p.style == q.style
        c, s = p.content, p.style
        # the style's shape is drawn in the content's colour word; everything the style gives differs
        assert s.colour == c.colour and s.background not in (c.background, c.colour)
        assert s.texture != c.texture and s.shape != c.shape
        assert (p.style_mask & p.content_mask).sum() <= st.MAX_OVERLAP * p.style_mask.sum()
        assert (c.fg_tone is None) == (MODEL_WORLD_VERSION == 1)
        assert p.style_prompt == f"a {s.shape}"
        assert np.array_equal(render(c)[0], p.content_image) and np.array_equal(render(s)[0], p.style_image)
        assert p.leak_region.sum() > 0 and not (p.leak_region & p.content_mask).any()
    with pytest.raises(ValueError, match="n: got 0"):
        st.make_pairs(0)


def test_the_alternative_style_images_share_the_style_scene(pairs):
    own = st.make_pairs(N, style_shape="own colour")
    none = st.make_pairs(N, style_shape="none")
    for p, o, z in zip(pairs, own, none):
        assert o.style.colour not in (p.content.colour, o.style.background)
        assert replace(o.style, colour=p.style.colour) == p.style == z.style
        assert not z.style_mask.any()
        j = judge(z.style_image)  # a background field: no shape, the style's colour and texture
        assert (j.shape, j.background, j.texture) == (None, p.style.background, p.style.texture)
    with pytest.raises(ValueError, match="style_shape"):
        st.make_pairs(1, style_shape="blue")


def test_ideal_has_the_contents_shape_and_the_styles_background(pairs):
    for p in pairs:
        j = judge(p.ideal_image)
        assert (j.colour, j.shape) == (p.content.colour, p.content.shape)
        assert (j.background, j.texture) == (p.style.background, p.style.texture)
        assert st.layout_iou(j.mask, p.content_mask) > 0.95
    bad = replace(pairs[0].style, background=pairs[0].content.colour)
    with pytest.raises(ValueError, match="style"):
        st.ideal_scene(pairs[0].content, bad)


def test_measures_of_the_reference_images(pairs):
    def means(images):
        values = st.score_all(images, pairs)
        return {k: float(np.nanmean(v)) for k, v in values.items()}

    content = means([p.content_image for p in pairs])
    assert content["layout_iou"] == 1.0 and content["shape_kept"] == 1.0 and content["colour_kept"] == 1.0
    assert content["adopted"] == 0.0 and content["leaked"] == 0.0
    style = means([p.style_image for p in pairs])
    assert style["adopted"] == 1.0 and style["leaked"] == 1.0 and style["layout_iou"] < 0.1
    ideal = means([p.ideal_image for p in pairs])
    assert ideal["layout_iou"] > 0.95 and ideal["adopted"] == 1.0 and ideal["leaked"] == 0.0
    assert ideal["shape_kept"] == 1.0
    # floats in [0, 1] read the same as uint8
    assert st.score(pairs[0].ideal_image / 255.0, pairs[0]) == st.score(pairs[0].ideal_image, pairs[0])
    with pytest.raises(ValueError, match="images: got 1"):
        st.score_all([pairs[0].ideal_image], pairs)


def test_leak_is_the_styles_shape_not_a_flood(pairs):
    p = pairs[0]
    colour = np.array(PALETTE[p.style.colour], dtype=np.uint8)
    leaked = p.ideal_image.copy()
    leaked[p.style_mask] = colour  # the style's shape drawn into the ideal result
    s = st.score(leaked, p)
    assert s["leaked"] == 1.0 and s["leak_fraction"] > 0.95 and s["flood_fraction"] == 0.0
    flooded = np.broadcast_to(colour, p.ideal_image.shape).copy()  # all the shape's colour: no shape drawn
    s = st.score(flooded, p)
    assert s["leak_fraction"] == 1.0 and s["flood_fraction"] == 1.0 and s["leaked"] == 0.0
    none = st.make_pairs(1, style_shape="none")[0]  # no style shape: leakage is undefined
    assert np.isnan(st.score(none.ideal_image, none)["leaked"])


def test_colour_fraction_and_layout_iou_on_hand_made_inputs():
    image = np.zeros((64, 64, 3), np.uint8)
    image[:, :32] = PALETTE["red"]
    image[:, 32:] = PALETTE["blue"]
    region = np.zeros((64, 64), bool)
    region[:, 16:48] = True
    assert st.colour_fraction(image, "red", region) == pytest.approx(0.5)
    assert st.colour_fraction(np.full((64, 64, 3), 128, np.uint8), "red", region) == 0.0  # grey has no hue
    assert np.isnan(st.colour_fraction(image, "red", np.zeros((64, 64), bool)))
    with pytest.raises(ValueError, match="colour"):
        st.colour_fraction(image, "teal", region)

    want = np.zeros((64, 64), bool)
    want[10:30, 10:30] = True  # 400 pixels
    got = np.zeros((64, 64), bool)
    got[20:40, 10:30] = True  # overlaps 200, union 600
    assert st.layout_iou(got, want) == pytest.approx(1 / 3)
    assert st.layout_iou(None, want) == 0.0
    assert isinstance(judge(image), Judgement)


def test_bootstrap_intervals():
    assert ev.bootstrap_ci(np.full(20, 0.3)) == pytest.approx((0.3, 0.3))
    half = np.array([0.0, 1.0] * 16)  # 32 pairs, half of them hits: the binomial interval is about ±0.17
    low, high = ev.bootstrap_ci(half)
    assert low < 0.5 < high and 0.25 < high - low < 0.45
    assert ev.bootstrap_ci(half) == (low, high)  # seeded
    assert ev.bootstrap_ci(np.array([half, half])) == (0.0, 0.0)  # a paired difference of equal rows
    shifted = ev.bootstrap_ci(np.array([half + 0.1, half]))
    assert shifted == pytest.approx((0.1, 0.1))
    assert np.isnan(ev.bootstrap_ci(np.full(5, np.nan))).all()  # undefined everywhere: no interval, no warning
    assert ev.bootstrap_ci(np.array([1.0, np.nan, 1.0])) == (1.0, 1.0)  # undefined pairs are left out
    with pytest.raises(ValueError, match="level"):
        ev.bootstrap_ci(half, level=1.5)
    with pytest.raises(ValueError, match="values"):
        ev.bootstrap_ci(np.zeros((0,)))


def test_methods_ask_for_the_right_transfer(pairs):
    import guidekit

    p = pairs[0]
    assert ev.transfer_kwargs("reconstruction", p) == {"init_adain": False, "attn_injection": False}
    assert ev.transfer_kwargs("StyleID", p) == {"hooks": []}
    full = ev.transfer_kwargs("StyleID + StyleSSP", p)
    (h,) = full["hooks"]
    assert isinstance(h, guidekit.StyleSSP) and repr(h) == repr(guidekit.StyleSSP())  # the library's defaults
    assert full["style_prompt"] == p.style_prompt
    freq = ev.transfer_kwargs("StyleSSP, frequency only", p)
    assert freq["hooks"][0].negative_inversion_scale == 0 and "style_prompt" not in freq
    neg = ev.transfer_kwargs("StyleSSP, negative inversion only, w_inv 3", p)
    assert not neg["hooks"][0].frequency and neg["hooks"][0].negative_inversion_scale == pytest.approx(2.0)
    assert ev.transfer_kwargs("StyleID + StyleSSP, frequency then AdaIN", p)["hooks"][0].order == "frequency_first"
    assert set(ev.TABLE_METHODS) <= set(ev.METHODS)
    with pytest.raises(ValueError, match="method"):
        ev.transfer_kwargs("nope", p)


class _Echo:
    """A stand-in for the pipeline: returns the content image, and records the keyword arguments."""

    def __init__(self):
        self.calls = []

    def transfer(self, content, style, **kwargs):
        self.calls.append(kwargs)

        class Out:
            images = [np.asarray(content, dtype=np.float64) / 255.0]

        return Out()


def test_run_table_and_save(tmp_path):
    pipe = _Echo()
    result = ev.run(pipe, pairs=4, steps=2, methods=("StyleID", "StyleID + StyleSSP"), log=lambda line: None)
    assert len(pipe.calls) == 8 and all(c["num_inference_steps"] == 2 for c in pipe.calls)
    rows = {r["method"]: r for r in result["rows"]}
    assert rows["StyleID"]["layout_iou"]["mean"] == 1.0 and rows["StyleID"]["adopted"]["mean"] == 0.0
    (diff,) = result["differences"]
    assert diff["method"] == "StyleID + StyleSSP" and diff["layout_iou"] == {"mean": 0.0, "low": 0.0, "high": 0.0}
    table = ev.markdown(result)
    assert "| StyleID | 1.000 [1.000, 1.000] |" in table and "Paired differences from StyleID" in table
    ev.save(result, tmp_path)
    saved = json.loads((tmp_path / "eval_style.json").read_text())
    assert "_grid" not in saved and saved["per_pair"]["StyleID"]["layout_iou"] == [1.0] * 4
    from PIL import Image

    assert Image.open(tmp_path / "grid.png").size == (64 * 5, 64 * 4)  # content, style, ideal, 2 methods
    with pytest.raises(ValueError, match="method"):
        ev.run(pipe, pairs=1, methods=("nope",))


def test_cli_registers_eval_style_and_parses_methods():
    from click.testing import CliRunner

    from guidekit.apps.cli import SUBCOMMANDS, main
    from guidekit.apps.eval_style import _methods

    assert SUBCOMMANDS["eval-style"] == "guidekit.apps.eval_style:eval_style"
    res = CliRunner().invoke(main, ["eval-style", "--help"])
    assert res.exit_code == 0 and "--pairs" in res.output and "--style-shape" in res.output
    assert CliRunner().invoke(main, ["eval-style", "--out", "x", "--pairs", "0"]).exit_code != 0
    assert _methods(None) == ev.TABLE_METHODS and _methods("all") == tuple(ev.METHODS)
    assert _methods("StyleID,StyleSSP, frequency only, AdaIN then frequency , reconstruction") == (
        "StyleID", "StyleSSP, frequency only, AdaIN then frequency", "reconstruction")
    res = CliRunner().invoke(main, ["eval-style", "--out", "x", "--methods", "StyleID,nope"])
    assert res.exit_code == 2 and "--methods" in res.output


def test_pick_example_takes_the_first_pair_where_every_row_succeeds():
    def row(shape_kept, colour_kept, adopted, leaked):
        return {"shape_kept": shape_kept, "colour_kept": colour_kept, "adopted": adopted, "leaked": leaked}

    #                 pair:    0    1    2    3
    styleid = row(shape_kept=[1.0, 1.0, 1.0, 1.0], colour_kept=[1.0, 1.0, 1.0, 1.0],
                  adopted=[0.0, 1.0, 1.0, 1.0], leaked=[0.0, 0.0, 0.0, 0.0])
    stylessp = row(shape_kept=[1.0, 0.0, 1.0, 1.0], colour_kept=[1.0, 1.0, 1.0, 1.0],
                   adopted=[1.0, 1.0, 1.0, 1.0], leaked=[0.0, 0.0, 1.0, 0.0])
    result = {"pairs": 4, "per_pair": {"StyleID": styleid, "StyleID + StyleSSP": stylessp}}
    assert ev.pick_example(result) == 3
    assert ev.pick_example(result, ("StyleID",)) == 1
    with pytest.raises(ValueError, match="methods"):
        ev.pick_example(result, ("StyleID", "nope"))
    styleid["colour_kept"] = [0.0] * 4
    with pytest.raises(ValueError, match="no pair"):
        ev.pick_example(result)
