"""The toy video world and the measures of its videos."""

import numpy as np
import pytest

from guidekit.toy import video_world as vw
from guidekit.toy import world
from guidekit.toy.video_measures import (
    centroids,
    frames_correct,
    max_jump,
    mean_speed,
    read_video,
    seam_score,
    smoothness,
    teleports,
)


def test_first_frame_is_the_image_worlds_scene():
    clip = vw.sample_clip(3)
    sample = vw.render_clip(clip, 4)
    image, mask = world.render(clip.scene)
    np.testing.assert_array_equal(sample.frames[0], image)
    np.testing.assert_array_equal(sample.masks[0], mask)
    assert sample.caption == world.generate(3).caption


def test_longer_clip_starts_with_the_shorter_one():
    short, long = vw.generate_clip(11, 16), vw.generate_clip(11, 64)
    np.testing.assert_array_equal(long.frames[:16], short.frames)


def test_constant_speed_and_reflection_at_the_walls():
    for seed in range(20):
        clip = vw.sample_clip(seed)
        track = vw.trajectory(clip, 200)
        r = clip.scene.radius
        low, high = r + vw.WALL_MARGIN, world.SIZE - r - vw.WALL_MARGIN
        assert track.min() >= low - 1e-9 and track.max() <= high + 1e-9  # the shape stays whole in frame
        speed = np.hypot(clip.vx, clip.vy)
        assert vw.SPEED_RANGE[0] <= speed <= vw.SPEED_RANGE[1]
        # per axis, every step moves by |v| (or less on a frame that touches a wall: the fold point)
        for axis, v in ((0, clip.vx), (1, clip.vy)):
            steps = np.abs(np.diff(track[:, axis]))
            assert np.all(steps <= abs(v) + 1e-9)
            assert np.mean(np.isclose(steps, abs(v))) > 0.8


def test_reflection_matches_a_step_by_step_simulation():
    clip = vw.Clip(world.sample_scene(5), 1.7, -1.3)
    r = clip.scene.radius
    low, high = r + vw.WALL_MARGIN, world.SIZE - r - vw.WALL_MARGIN
    pos, vel, expected = [clip.scene.cx, clip.scene.cy], [clip.vx, clip.vy], []
    for _ in range(120):  # move, then fold back anything that went past a wall and flip that velocity
        expected.append(tuple(pos))
        for a in range(2):
            pos[a] += vel[a]
            if pos[a] > high:
                pos[a], vel[a] = 2 * high - pos[a], -vel[a]
            elif pos[a] < low:
                pos[a], vel[a] = 2 * low - pos[a], -vel[a]
    np.testing.assert_allclose(vw.trajectory(clip, 120), np.array(expected), atol=1e-9)


def test_background_stays_still():
    sample = vw.generate_clip(7, 24)
    outside = ~sample.masks.any(axis=0)
    outside &= ~np.any([np.abs(sample.frames[0].astype(int) - f.astype(int)).sum(-1) > 0 for f in sample.frames], 0)
    assert outside.mean() > 0.3  # a large part of the frame never changes
    diff = np.abs(sample.frames[1:].astype(int) - sample.frames[:-1].astype(int))
    assert diff.max() > 0  # and the shape does move


def test_clip_from_caption_and_bad_input():
    clip = vw.clip_from_caption("a red square on a blue striped background", seed=4)
    assert clip.caption == "a red square on a blue striped background"
    with pytest.raises(ValueError, match="frames"):
        vw.trajectory(clip, 0)
    with pytest.raises(ValueError, match="caption"):
        vw.clip_from_caption("a red blob")


def test_judge_reads_world_clips_and_tracks_the_true_centre():
    for seed in range(4):
        sample = vw.generate_clip(seed, 24)
        reading = read_video(sample.frames)
        assert frames_correct(reading.judgements, sample.caption).mean() >= 0.95
        # the mask's centre of mass is the box centre for circles and squares; triangles sit lower (1/3 height)
        err = np.linalg.norm(reading.centroids - sample.centres, axis=1)
        bias = {"circle": 0.0, "square": 0.0, "triangle": sample.clip.scene.radius / 3}[sample.clip.scene.shape]
        assert np.all(err <= bias + 1.0)
        assert teleports(reading.centroids) == 0


def test_teleports_counts_jumps_and_lost_frames():
    track = np.stack([np.arange(10.0), np.zeros(10)], 1)
    assert teleports(track) == 0
    jumped = track.copy()
    jumped[6:, 0] += 20
    assert teleports(jumped) == 1
    lost = track.copy()
    lost[4] = np.nan
    assert teleports(lost) == 2  # into and out of the frame without a shape
    still = np.zeros((10, 2)) + np.random.default_rng(0).normal(0, 0.1, (10, 2))
    assert teleports(still) == 0  # sub-pixel jitter is not a teleport (floor)


def test_smoothness_and_speed_of_a_known_track():
    t = np.arange(12.0)
    line = np.stack([1.5 * t, 0.5 * t], 1)
    assert smoothness(line) == pytest.approx({"accel": 0.0, "jerk": 0.0}, abs=1e-12)
    assert mean_speed(line) == pytest.approx(np.hypot(1.5, 0.5))
    parabola = np.stack([t**2, np.zeros(12)], 1)
    assert smoothness(parabola)["accel"] == pytest.approx(2.0) and smoothness(parabola)["jerk"] == pytest.approx(0.0)


def test_seam_score_and_max_jump():
    frames = np.zeros((8, 4, 4, 3), np.uint8)
    for i in range(8):
        frames[i] = 10 * i
    frames[4:] += 50
    assert seam_score(frames, [4]) == pytest.approx(6.0)  # a step of 60 where the others are 10
    assert seam_score(frames, [2]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="boundaries"):
        seam_score(frames, [8])
    track = np.stack([np.arange(8.0), np.zeros(8)], 1)
    track[5:, 0] += 4
    assert max_jump(track, 3, 7) == pytest.approx(5.0)


def test_centroids_of_masks():
    j = read_video(vw.generate_clip(2, 2).frames).judgements
    c = centroids(j)
    ys, xs = np.nonzero(j[0].mask)
    assert c[0] == pytest.approx([xs.mean() + 0.5, ys.mean() + 0.5])
