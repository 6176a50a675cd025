"""`guidekit eval-video`: the switch prompts and schedule, the required checks, and one tiny end-to-end run."""

import json

import numpy as np
import pytest

from guidekit.toy import eval_video as ev
from guidekit.toy.world import COLOURS, parse_caption


@pytest.mark.parametrize("index", range(6))
def test_switch_prompts_change_the_background_only(index):
    a = "a red circle on a blue striped background"
    first, second = ev.switch_prompts(a, index)
    assert first == a
    attrs_a, attrs_b = parse_caption(first), parse_caption(second)
    assert attrs_b["background"] in COLOURS and attrs_b["background"] not in ("red", "blue")
    assert {k: v for k, v in attrs_b.items() if k != "background"} == {
        k: v for k, v in attrs_a.items() if k != "background"}


@pytest.mark.parametrize("frames", [32, 64, 96])
def test_switch_schedule_is_the_official_two_prompt_schedule(frames):
    # the key frames eval-video passes as a {frame: prompt} dict blend exactly as the official 3/8 - 1/4 - 3/8
    # schedule does (A held, a linear blend with both ends included, B held)
    from guidekit.video import interpolate_prompt_schedule, official_two_prompt_schedule

    def weight_of_b(blend):
        return (1 - blend.t) * (blend.key_a == "B") + blend.t * (blend.key_b == "B")

    ours = interpolate_prompt_schedule(ev._switch_schedule("A", "B", frames), frames)
    official = official_two_prompt_schedule(frames, "A", "B")
    np.testing.assert_allclose([weight_of_b(b) for b in ours], [weight_of_b(b) for b in official], rtol=0,
                               atol=1e-12)


def _result(fn_without_teleport, fn_teleports, windows_teleports, jump_injection, jump_interpolation):
    return {
        "rows": [
            {"row": "freenoise", "frames_correct": 0.97, "videos_without_teleport": fn_without_teleport,
             "teleports_per_video": fn_teleports},
            {"row": "chunks", "teleports_per_video": 3.0},
            {"row": "windows", "teleports_per_video": windows_teleports},
        ],
        "switch": [
            {"row": "interpolation only", "switch_jump": jump_interpolation},
            {"row": "motion injection", "switch_jump": jump_injection},
        ],
    }


def test_required_checks_follow_the_targets():
    checks = ev.required_checks(_result(0.9, 0.1, 0.5, 2.0, 2.0))
    assert all(checks.values()) and len(checks) == 5
    checks = ev.required_checks(_result(0.875, 0.6, 0.5, 2.5, 2.0))
    assert checks == {
        "freenoise keeps >= 95% of frames correct": True,
        "freenoise: no teleport in >= 90% of videos": False,
        "freenoise has fewer teleports than chunks": True,
        "freenoise has fewer teleports than windows": False,
        "motion injection is at least as continuous through the switch": False,
    }
    assert ev.required_checks({"rows": [], "switch": []}) == {}


def test_arguments_are_checked_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="rows: got 'tiles'; accepted: world, direct-16"):
        ev.run_video_evaluation(tmp_path / "out", model=tmp_path / "absent", rows=("world", "tiles"))
    with pytest.raises(ValueError, match="first_video: got -1; accepted: an integer >= 0"):
        ev.run_video_evaluation(tmp_path / "out", model=tmp_path / "absent", first_video=-1)
    assert not (tmp_path / "out").exists()


def test_a_tiny_run_writes_its_tables_and_per_video_records(tmp_path):
    from guidekit.testing.animatediff import make_tiny_animatediff

    model = make_tiny_animatediff(tmp_path / "model", max_length=32)
    lines = []
    result = ev.run_video_evaluation(tmp_path / "out", model=model, num_videos=2, frames=32, steps=1,
                                     rows=("world", "direct-16", "freenoise"), log=lines.append)
    assert [r["row"] for r in result["rows"]] == ["world", "direct-16", "freenoise"]
    assert [r["row"] for r in result["switch"]] == ["interpolation only", "motion injection"]
    world = result["rows"][0]
    # the world's own clips are the ground truth: every frame reads right, and the shape never jumps
    assert world["frames_correct"] == 1.0 and world["teleports_per_video"] == 0.0
    for row in result["rows"] + result["switch"]:
        assert len(row["per_video"]) == 2
    assert [v["prompt"] for v in world["per_video"]] == [v["prompt"] for v in result["rows"][2]["per_video"]]
    written = json.loads((tmp_path / "out" / "eval_video.json").read_text())
    assert written["settings"]["frames"] == 32 and "checks" in written
    table = (tmp_path / "out" / "table.md").read_text()
    assert "| freenoise | 2 |" in table and "| interpolation only | 2 |" in table
    assert all("\"per_video\"" not in line for line in lines)  # the log prints the summaries only
    assert sorted(p.name for p in (tmp_path / "out").glob("*.gif")) == [
        "sample-direct-16.gif", "sample-freenoise.gif", "sample-world.gif"]

    # a run that starts at the second video makes that video exactly as the longer run did
    later = ev.run_video_evaluation(tmp_path / "later", model=model, num_videos=1, frames=32, steps=1,
                                    rows=("world", "freenoise"), log=lines.append, first_video=1)
    assert later["settings"]["first_video"] == 1
    earlier = {r["row"]: r["per_video"][1] for r in result["rows"] + result["switch"]}
    for row in later["rows"] + later["switch"]:
        # compared as JSON text, where NaN (no shape found on the random model) equals itself
        assert json.dumps(row["per_video"]) == json.dumps([earlier[row["row"]]]), row["row"]
