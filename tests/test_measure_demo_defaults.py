"""The measurements behind the demo's default examples: the rules that pick a default, and one tiny run of each
table through the tabs' own backends."""

from __future__ import annotations

import os

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"

import torch  # noqa: E402

torch.set_num_threads(1)


def clf_row(label, seed, unguided, naive, elucd):
    return {"label": label, "seed": seed, "unguided": unguided, "naive": naive, "elucd": elucd,
            "unguided_right": unguided == label, "naive_right": naive == label, "elucd_right": elucd == label}


def test_classifier_pick_wants_elucd_right_where_unguided_is_not():
    from guidekit.apps.demo_measure import classifier_score, pick_classifier_default

    assert classifier_score(clf_row("red circle", 0, "none", "none", "red circle")) == 2
    assert classifier_score(clf_row("red circle", 0, "none", "red circle", "red circle")) == 1
    assert classifier_score(clf_row("red circle", 0, "red circle", "none", "red circle")) == 0  # no effect to see
    assert classifier_score(clf_row("red circle", 0, "none", "red circle", "none")) == 0
    rows = [clf_row("red circle", 0, "none", "none", "yellow square"),  # the old default: EluCD misread
            clf_row("red circle", 1, "none", "none", "red circle"),
            clf_row("blue square", 0, "none", "blue square", "blue square"),  # naive works too: weaker
            clf_row("blue square", 1, "none", "none", "blue square"),
            clf_row("blue square", 2, "none", "none", "blue square")]
    # the label that works on the most seeds, and its lowest seed where naive guidance misses
    assert pick_classifier_default(rows) == {"label": "blue square", "seed": 1, "seeds_that_work": 3, "seeds": 3}
    with pytest.raises(ValueError, match="no run shows"):
        pick_classifier_default(rows[:1])
    with pytest.raises(ValueError, match="rows: got none"):
        pick_classifier_default([])


def video_row(seed, frames, windows, freenoise, cpu, correct=(10, 10)):
    return {"seed": seed, "frames": frames, "context": 16, "stride": 4, "steps": 15, "size": 64, "seconds": 3 * cpu,
            "cpu_seconds": cpu, "held": 10, "windows_correct": correct[0], "windows_teleports": windows,
            "freenoise_correct": correct[1], "freenoise_teleports": freenoise}


def test_video_pick_wants_fewer_teleports_within_the_time():
    from guidekit.apps.demo_measure import freenoise_steadier, pick_video_default

    assert freenoise_steadier(video_row(0, 48, 2, 0, 50))
    assert not freenoise_steadier(video_row(0, 48, 1, 1, 50))
    assert not freenoise_steadier(video_row(0, 48, 2, 0, 50, correct=(10, 9)))  # steadier but wrong frames
    rows = [video_row(0, 48, 0, 0, 50), video_row(1, 48, 1, 0, 50), video_row(2, 48, 3, 0, 50),
            video_row(0, 64, 2, 0, 90), video_row(1, 64, 2, 0, 90), video_row(2, 64, 2, 0, 90)]
    pick = pick_video_default(rows, max_seconds=60)  # 64 frames would show more, but take too long
    assert (pick["frames"], pick["seed"], pick["seeds_that_work"], pick["seeds"]) == (48, 2, 2, 3)
    assert pick_video_default(rows, max_seconds=100)["frames"] == 64
    with pytest.raises(ValueError, match="within 10 CPU seconds"):
        pick_video_default(rows, max_seconds=10)
    with pytest.raises(ValueError, match="no run shows"):
        pick_video_default(rows[:1], max_seconds=60)


def test_a_classifier_row_judges_the_tabs_three_images(tiny_sd_dir, monkeypatch):
    from guidekit.apps import demo_measure
    from guidekit.apps.demo import DemoBackend, Limits, embedded_classifier_path
    from guidekit.apps.jobs import load_pipeline
    from guidekit.toy.judge import judge

    if embedded_classifier_path() is None:
        pytest.skip("no embedded classifier in this install")
    backend = DemoBackend(load_pipeline(str(tiny_sd_dir))[0], "tiny", Limits(max_steps=4, max_size=64))
    shown = []
    real = backend.classifier_guidance

    def spy(*args):
        out = real(*args)
        shown.append(out[:3])
        return out

    monkeypatch.setattr(backend, "classifier_guidance", spy)
    row = demo_measure.classifier_row(backend, "green square", 2, 5.0, 2)
    assert (row["label"], row["seed"]) == ("green square", 2) and row["seconds"] > 0 and row["cpu_seconds"] > 0
    for name, image in zip(demo_measure.CLASSIFIER_RUNS, shown[0]):
        j = judge(image)
        assert row[name] == ("none" if j.colour is None or j.shape is None else f"{j.colour} {j.shape}")
        assert row[f"{name}_right"] == (row[name] == "green square")


def test_a_video_row_reads_the_videos_the_page_shows(tiny_sd_dir, tmp_path_factory):
    import numpy as np

    from guidekit.apps import demo_measure
    from guidekit.apps.demo import Limits, video_backend
    from guidekit.apps.jobs import load_pipeline
    from guidekit.testing.animatediff import make_tiny_animatediff

    pipe = load_pipeline(str(tiny_sd_dir))[0]
    folder = make_tiny_animatediff(tmp_path_factory.mktemp("tiny-animatediff"), max_length=8)
    video, _ = video_backend(pipe, str(folder), Limits(max_steps=4, max_size=64, max_frames=24))
    files = []
    real = video.long_video
    video.long_video = lambda *a, **k: files.append(real(*a, **k)) or files[-1]
    row = demo_measure.video_row(video, "0: a red circle on a blue background\n8: a yellow circle on a blue background",
                                 seed=3, frames=12, context=8, stride=4, steps=1, size=32, scale=1.0)
    # frames 0 and 8..11 are held on one prompt; 1..7 blend the two
    assert row["held"] == 5 and (row["frames"], row["context"], row["seed"]) == (12, 8, 3)
    for key in ("windows", "freenoise"):
        assert 0 <= row[f"{key}_correct"] <= 5 and row[f"{key}_teleports"] >= 0
    clip = demo_measure.read_webp(files[0][1])
    assert clip.shape == (12, 32, 32, 3) and clip.dtype == np.float32
    assert np.allclose(clip * 255.0, np.round(clip * 255.0), atol=1e-3)  # 8-bit values, exactly


def test_merge_joins_earlier_rows_and_keeps_their_commands(tmp_path, monkeypatch):
    import json

    import click

    from guidekit.apps import demo_measure

    monkeypatch.setattr(demo_measure, "MERGED", [])
    (tmp_path / "a").mkdir()
    earlier = {"command": "python -m x video --seeds 0", "rows": [{"seed": 0}]}
    (tmp_path / "a" / "video.json").write_text(json.dumps(earlier))
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "video.json").write_text(json.dumps({"rows": [{"seed": 1}], "merged_from": ["earlier"]}))
    assert demo_measure._merged([tmp_path / "a", tmp_path / "b"], "video") == [{"seed": 0}, {"seed": 1}]
    assert demo_measure.MERGED == ["python -m x video --seeds 0", "earlier"]
    with pytest.raises(click.BadParameter, match="does not exist; accepted: the --out folder"):
        demo_measure._merged([tmp_path / "c"], "video")


def _measured(name):
    import json
    from pathlib import Path

    return json.loads((Path(__file__).resolve().parent.parent / "docs" / "demo-defaults" / f"{name}.json").read_text())


def test_the_classifier_tab_default_is_the_measured_pick():
    from guidekit.apps.demo_measure import CLASSIFIER_DEFAULT, pick_classifier_default

    table = _measured("classifier")
    # the pick stored with the table is the rule's pick on its rows, and the tab's default copies it
    assert pick_classifier_default(table["rows"]) == table["pick"]
    assert CLASSIFIER_DEFAULT == {"label": table["pick"]["label"], "seed": table["pick"]["seed"]}


def test_the_video_tab_default_is_the_measured_pick_and_longer_than_one_window():
    from guidekit.apps.defaults import FREENOISE_DEFAULTS
    from guidekit.apps.demo_measure import VIDEO_DEFAULT, pick_video_default

    table = _measured("video")
    budget = float(table["command"].split("--max-seconds ")[1].split()[0])
    assert pick_video_default(table["rows"], budget) == table["pick"]
    pick = table["pick"]
    assert VIDEO_DEFAULT == {"frames": pick["frames"], "steps": pick["steps"], "seed": pick["seed"]}
    # the tab's context and stride come from FREENOISE_DEFAULTS: the table must have measured those
    assert (pick["context"], pick["stride"]) == (FREENOISE_DEFAULTS["context_length"],
                                                 FREENOISE_DEFAULTS["context_stride"])
    assert VIDEO_DEFAULT["frames"] > FREENOISE_DEFAULTS["context_length"], "the default video is one window"
