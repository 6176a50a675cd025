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
    # the switch's motion-injection row needs classifier-free guidance
    with pytest.raises(ValueError, match="scale: 1.0 turns classifier-free guidance off"):
        ev.run_video_evaluation(tmp_path / "out", model=tmp_path / "absent", scale=1.0)
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


def _run(rows, switch=False, **settings):
    """An eval_video.json as a run with these rows writes it (summaries only, as merge_results reads them)."""
    base = {"num_videos": 2, "first_video": 0, "frames": 32, "steps": 1, "guidance_scale": 3.0, "device": "cpu",
            "torch_threads": 1}
    full = _result(0.95, 0.05, 0.5, 1.0, 2.0)
    by_name = {r["row"]: r for r in full["rows"]}
    columns = dict(videos=2, frames_correct=1.0, videos_without_teleport=1.0, teleports_per_video=0.0, seam=1.0,
                   speed=1.0, accel=1.0, jerk=1.0, seconds_per_video=1.0, peak_rss_mib=None, first_correct=1.0,
                   last_correct=1.0)
    return {"settings": {**base, **settings},
            "rows": [{**columns, "row": name, **by_name.get(name, {})} for name in rows],
            "switch": [{**columns, **row} for row in full["switch"]] if switch else []}


def test_merge_puts_rows_of_parallel_runs_in_one_table():
    merged = ev.merge_results([_run(["windows", "chunks"]), _run(["freenoise"], switch=True)])
    assert [r["row"] for r in merged["rows"]] == ["chunks", "windows", "freenoise"]  # eval-video's own order
    assert [r["row"] for r in merged["switch"]] == ["interpolation only", "motion injection"]
    assert merged["settings"]["merged_runs"] == 2 and merged["settings"]["num_videos"] == 2
    # checks that need rows of both runs are recomputed on the whole
    assert merged["checks"] == ev.required_checks(_result(0.95, 0.05, 0.5, 1.0, 2.0)) and all(merged["checks"].values())
    # runs without first_video in their settings (older ones) started at the first video
    old = _run(["chunks"])
    del old["settings"]["first_video"]
    assert [r["row"] for r in ev.merge_results([old, _run(["freenoise"])])["rows"]] == ["chunks", "freenoise"]


@pytest.mark.parametrize("runs, message", [
    ([_run(["chunks"])], "got 1 run"),
    ([_run(["chunks"]), _run(["freenoise"], num_videos=3)], "run 1 has num_videos = 3, run 0 has 2"),
    ([_run(["chunks"]), _run(["freenoise"], first_video=2)], "run 1 has first_video = 2"),
    ([_run(["chunks"]), _run(["freenoise"], steps=25)], "run 1 has steps = 25"),
    ([_run(["chunks"]), _run(["chunks", "freenoise"])], "the row 'chunks' is in two runs"),
    ([_run(["chunks"], switch=True), _run(["freenoise"], switch=True)], "the switch table is in two runs"),
])
def test_merge_refuses_runs_of_other_videos_or_a_row_twice(runs, message):
    with pytest.raises(ValueError, match=message):
        ev.merge_results(runs)


def test_cli_merge_writes_one_table_and_replaces_nothing(tmp_path):
    from click.testing import CliRunner

    from guidekit.apps.eval_video import eval_video

    for name, run in (("a", _run(["chunks", "windows"])), ("b", _run(["freenoise"], switch=True))):
        (tmp_path / name).mkdir()
        (tmp_path / name / "eval_video.json").write_text(json.dumps(run))
    args = ["--out", str(tmp_path / "all"), "--merge", str(tmp_path / "a"), "--merge", str(tmp_path / "b")]
    result = CliRunner().invoke(eval_video, args)
    assert result.exit_code == 0, result.output
    assert "| freenoise |" in result.output and "PASS: freenoise has fewer teleports than windows" in result.output
    written = json.loads((tmp_path / "all" / "eval_video.json").read_text())
    assert [r["row"] for r in written["rows"]] == ["chunks", "windows", "freenoise"]
    assert (tmp_path / "all" / "table.md").read_text() == ev.markdown_tables(written) + "\n"
    again = CliRunner().invoke(eval_video, args)
    assert again.exit_code == 2 and "already holds an evaluation" in again.output
    one = CliRunner().invoke(eval_video, ["--out", str(tmp_path / "x"), "--merge", str(tmp_path / "a")])
    assert one.exit_code == 2 and "--merge" in one.output and "two or more" in one.output
    (tmp_path / "empty").mkdir()
    none = CliRunner().invoke(eval_video, ["--out", str(tmp_path / "y"), "--merge", str(tmp_path / "a"), "--merge",
                                           str(tmp_path / "empty")])
    assert none.exit_code == 2 and "has no eval_video.json" in none.output
    clash = tmp_path / "c"
    clash.mkdir()
    (clash / "eval_video.json").write_text(json.dumps(_run(["freenoise"], num_videos=5)))
    bad = CliRunner().invoke(eval_video, ["--out", str(tmp_path / "z"), "--merge", str(tmp_path / "a"), "--merge",
                                          str(clash)])
    assert bad.exit_code == 2 and "run 1 has num_videos = 5" in bad.output and not (tmp_path / "z").exists()
