"""How `guidekit eval-apg` picks and checks the recommended APG setting (small synthetic grid results)."""

import json

import numpy as np
import pytest

from guidekit.toy import apg_grid
from guidekit.toy.apg_grid import Rule, check_set, largest_clean_scale, pick_recommended, rank_settings, selection_set

WORLD_SATURATION = 0.72
# the small tables below hold w = 3 and 15 only; the rule reads the saturation at both
RULE = Rule(saturation_scales=(3.0, 15.0))


def _row(r, b, e, scale, all3, saturation, texture=0.9, invented=0.0, fidelity=0.8):
    return {"method": "apg", "scale": scale, "norm_threshold": r, "momentum": b, "eta": e, "all3": all3,
            "saturation": saturation, "fidelity": fidelity, "texture": texture, "invented": invented, "clipped": 0.0}


def _cfg(scale, texture=0.9, invented=0.0):
    return {"method": "cfg", "scale": scale, "all3": 0.5, "saturation": 0.93, "fidelity": 0.7, "texture": texture,
            "invented": invented, "clipped": 0.4}


def _result(rows, cfg_texture=0.9, scales=(3.0, 15.0)):
    return {"world": {"saturation": WORLD_SATURATION}, "scales": list(scales),
            "rows": [_cfg(s, cfg_texture) for s in scales] + rows}


def _setting(r, b, e):
    return {"eta": e, "norm_threshold": r, "momentum": b}


# Three settings at w = 3 and 15: A most accurate but 0.05 below the world at w = 15; B keeps the saturation within
# 0.02 and its texture within 3 points of CFG's; C keeps the saturation too, but is less accurate.
ROWS = [
    _row(1.0, -0.5, 0.0, 3.0, 1.00, 0.72), _row(1.0, -0.5, 0.0, 15.0, 0.98, 0.67),
    _row(4.0, -0.5, 0.0, 3.0, 0.95, 0.73, texture=0.87), _row(4.0, -0.5, 0.0, 15.0, 0.92, 0.70),
    _row(8.0, 0.0, 0.0, 3.0, 0.90, 0.72), _row(8.0, 0.0, 0.0, 15.0, 0.85, 0.74),
]


def test_the_most_accurate_setting_that_meets_the_rule_wins():
    assert pick_recommended(_result(ROWS), RULE) == _setting(4.0, -0.5, 0.0)
    # a tolerance wide enough for A's 0.05 gap lets the most accurate one in
    assert pick_recommended(_result(ROWS), Rule(0.06, (3.0, 15.0))) == _setting(1.0, -0.5, 0.0)


def test_a_texture_more_than_the_margin_below_cfg_is_refused():
    # CFG reads 94% of the textures: B's 87% is 7 points below, C's 90% only 4
    assert pick_recommended(_result(ROWS, cfg_texture=0.94), RULE) == _setting(8.0, 0.0, 0.0)
    assert pick_recommended(_result(ROWS, cfg_texture=0.94), Rule(saturation_scales=(3.0, 15.0), texture_margin=0.08)) \
        == _setting(4.0, -0.5, 0.0)


def test_the_saturation_condition_covers_only_the_scales_named():
    # only w = 3 counted: A's drift at w = 15 no longer counts against it
    assert pick_recommended(_result(ROWS), Rule(saturation_scales=(3.0,))) == _setting(1.0, -0.5, 0.0)


def test_by_default_the_saturation_is_read_at_the_high_scales_only():
    # 0.04 below the world's at w = 3, where every setting is alike, and close to it at 10, 15 and 20
    rows = [_row(4.0, -0.5, 0.0, w, 0.9, 0.68 if w == 3.0 else 0.71) for w in (3.0, 10.0, 15.0, 20.0)]
    result = _result(rows, scales=(3.0, 10.0, 15.0, 20.0))
    assert Rule().scales() == [3.0, 10.0, 15.0, 20.0]
    assert rank_settings(result)[0]["meets_rule"]
    assert not rank_settings(result, Rule(saturation_scales=(3.0, 10.0, 15.0, 20.0)))[0]["meets_rule"]


def test_a_setting_missing_a_scale_of_the_rule_does_not_meet_it():
    rows = [_row(4.0, -0.5, 0.0, 3.0, 0.99, 0.72), _row(8.0, 0.0, 0.0, 3.0, 0.90, 0.72),
            _row(8.0, 0.0, 0.0, 15.0, 0.85, 0.73)]
    assert pick_recommended(_result(rows), RULE) == _setting(8.0, 0.0, 0.0)


def test_without_a_setting_that_meets_the_rule_the_smallest_gap_among_texture_keepers_wins():
    rows = [
        # closest saturation, but its texture is 20 points below CFG's
        _row(2.0, 0.0, 0.0, 3.0, 0.99, 0.72, texture=0.70), _row(2.0, 0.0, 0.0, 15.0, 0.99, 0.76),
        # keeps the texture, 0.06 off at w = 15
        _row(4.0, 0.0, 0.0, 3.0, 0.80, 0.72), _row(4.0, 0.0, 0.0, 15.0, 0.80, 0.66),
        # keeps the texture, 0.10 off, most accurate
        _row(1.0, 0.0, 0.0, 3.0, 1.00, 0.72), _row(1.0, 0.0, 0.0, 15.0, 1.00, 0.62),
    ]
    ranked = rank_settings(_result(rows), RULE)
    assert not any(v["meets_rule"] for v in ranked)
    assert [v["norm_threshold"] for v in ranked] == [4.0, 1.0, 2.0]
    assert ranked[0]["worst_gap"] == pytest.approx(0.06, abs=1e-9)


def test_the_rule_needs_a_cfg_row_at_its_texture_scale():
    result = _result(ROWS)
    result["rows"] = [r for r in result["rows"] if not (r["method"] == "cfg" and r["scale"] == 3.0)]
    with pytest.raises(ValueError, match="no CFG row at w = 3"):
        pick_recommended(result, RULE)


def test_largest_clean_scale_stops_at_the_first_invented_texture():
    rows = [_row(4.0, -0.5, 0.0, w, 0.9, 0.72, invented=inv) for w, inv in
            ((3.0, 0.0), (5.0, 0.0), (7.5, 0.0), (10.0, 0.06), (15.0, 0.0), (20.0, 0.3))]
    result = {"rows": [_cfg(3.0, invented=0.05)] + rows}
    assert largest_clean_scale(result, _setting(4.0, -0.5, 0.0)) == 7.5
    assert largest_clean_scale(result, _setting(4.0, -0.5, 0.0), allowed=0.1) == 15.0
    assert largest_clean_scale(result, None) is None  # CFG invents one already at its smallest scale


def test_the_check_set_shares_no_caption_or_seed_with_the_selection_or_the_accuracy_table():
    from guidekit.toy.evaluate import PROMPT_SEED, eval_prompts

    sel, chk = selection_set(48), check_set(96, exclude=selection_set(48).prompts)
    assert len(chk.prompts) == len(set(chk.prompts)) == 96
    assert not set(sel.prompts) & set(chk.prompts)
    seeds = [set(range(s.seed, s.seed + len(s.prompts))) for s in (sel, chk)]
    table = set(range(PROMPT_SEED, PROMPT_SEED + len(eval_prompts())))
    assert not seeds[0] & seeds[1] and not (seeds[0] | seeds[1]) & table
    with pytest.raises(ValueError, match="n: got 230"):
        check_set(230, exclude=sel.prompts)


def test_rows_in_the_checkpoint_are_read_back_not_measured_again(tmp_path, monkeypatch):
    calls = []

    def fake_render(pipe, prompts, scale, hooks, seed, steps=25, batch=48):
        calls.append(scale)
        return np.full((len(prompts), 64, 64, 3), 0.5)

    monkeypatch.setattr(apg_grid, "render", fake_render)
    prompts = selection_set(2)
    settings = [None, dict(norm_threshold=4.0, momentum=-0.5, eta=0.0)]
    path = tmp_path / "rows.jsonl"
    first = apg_grid.run_grid(None, prompts, settings, (3.0, 10.0), checkpoint=path, log=lambda s: None)
    assert len(calls) == 4 and len(path.read_text().splitlines()) == 4
    # a wider run measures only what is new; the other steps count is another run altogether
    again = apg_grid.run_grid(None, prompts, settings, (3.0, 10.0, 15.0), checkpoint=path, log=lambda s: None)
    assert calls[4:] == [15.0, 15.0]
    assert json.dumps(again["rows"][:2]) == json.dumps(first["rows"][:2])  # as text: nan != nan
    apg_grid.run_grid(None, prompts, settings[:1], (3.0,), steps=10, checkpoint=path, log=lambda s: None)
    assert len(calls) == 7
    assert all(json.loads(line)["set"] == "selection" for line in path.read_text().splitlines())
