"""How `guidekit eval-apg` picks the recommended APG setting from its grid (synthetic grid results)."""

from guidekit.toy.apg_grid import pick_recommended


def _row(r, b, e, scale, all3, saturation, fidelity=0.8):
    return {"method": "apg", "scale": scale, "norm_threshold": r, "momentum": b, "eta": e, "all3": all3,
            "saturation": saturation, "fidelity": fidelity, "texture": 1.0, "clipped": 0.0}


def _result(rows, world_saturation=0.70):
    cfg = [{"method": "cfg", "scale": w, "all3": 0.5, "saturation": 0.95, "fidelity": 0.7} for w in (10, 15)]
    return {"world": {"saturation": world_saturation}, "rows": cfg + rows}


def test_the_most_accurate_setting_that_keeps_the_saturation_wins():
    rows = [
        # most accurate, but drifts 0.05 below the world's saturation at w = 15
        _row(1.0, -0.5, 0.0, 10, 1.00, 0.69), _row(1.0, -0.5, 0.0, 15, 0.98, 0.65),
        # keeps the saturation within 0.02 at both scales
        _row(4.0, -0.5, 0.0, 10, 0.95, 0.71), _row(4.0, -0.5, 0.0, 15, 0.92, 0.69),
        # keeps it too, less accurate
        _row(8.0, 0.0, 0.0, 10, 0.90, 0.70), _row(8.0, 0.0, 0.0, 15, 0.85, 0.70),
    ]
    assert pick_recommended(_result(rows)) == {"eta": 0.0, "norm_threshold": 4.0, "momentum": -0.5}
    # a looser tolerance lets the most accurate one in
    assert pick_recommended(_result(rows), saturation_tolerance=0.06)["norm_threshold"] == 1.0


def test_without_a_setting_that_keeps_the_saturation_accuracy_decides():
    rows = [_row(1.0, 0.0, 0.0, 10, 0.90, 0.50), _row(2.0, 0.0, 0.0, 10, 0.95, 0.90)]
    assert pick_recommended(_result(rows))["norm_threshold"] == 2.0
