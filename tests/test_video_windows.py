"""FreeNoise's window plan, window weights and window fusion against hand-worked examples and plain loops."""

import pytest
import torch
from tolerance import assert_close_to_scale

import guidekit.video as video
from guidekit.video import (
    WEIGHTINGS,
    WindowAccumulator,
    fuse_windows,
    fusion_weights,
    plan_windows,
    window_weights,
)

# ----------------------------------------------------------------------------------------------------------
# plan_windows


@pytest.mark.parametrize(
    "frames,length,stride,expected",
    [
        (20, 16, 4, [(0, 16), (4, 20)]),
        (22, 16, 4, [(0, 16), (4, 20), (6, 22)]),
        (25, 16, 4, [(0, 16), (4, 20), (8, 24), (9, 25)]),  # diffusers' comment says (10, 26); it is (9, 25)
        (16, 16, 4, [(0, 16)]),
        (8, 16, 4, [(0, 8)]),  # F < W: one window, no IndexError
        (1, 16, 4, [(0, 1)]),
        (17, 16, 4, [(0, 16), (1, 17)]),  # tail only
        (24, 16, 8, [(0, 16), (8, 24)]),
        (10, 4, 4, [(0, 4), (4, 8), (6, 10)]),  # S = W: disjoint windows plus a tail
        (7, 3, 1, [(0, 3), (1, 4), (2, 5), (3, 6), (4, 7)]),
    ],
)
def test_plan_worked_by_hand(frames, length, stride, expected):
    assert plan_windows(frames, length, stride) == expected


def test_plan_defaults_are_the_official_16_and_4():
    assert plan_windows(64) == [(s, s + 16) for s in range(0, 49, 4)]


@pytest.mark.parametrize("frames", range(1, 48))
@pytest.mark.parametrize("length,stride", [(16, 4), (16, 3), (8, 8), (5, 2), (1, 1)])
def test_plan_properties(frames, length, stride):
    plan = plan_windows(frames, length, stride)
    width = min(frames, length)
    assert all(stop - start == width for start, stop in plan)
    covered = sorted({f for start, stop in plan for f in range(start, stop)})
    assert covered == list(range(frames))
    # the official views: starts 0, S, 2S, … while s + W <= F
    official = [(s, s + length) for s in range(0, frames - length + 1, stride)]
    if frames > length:
        assert plan[: len(official)] == official
        extra = plan[len(official):]
        if (frames - length) % stride:
            assert extra == [(frames - length, frames)]  # the exact tail window
        else:
            assert extra == []
    assert plan[-1][1] == frames


# ----------------------------------------------------------------------------------------------------------
# window_weights


def test_named_weights_worked_by_hand():
    assert window_weights(4, "pyramid").tolist() == [1, 2, 2, 1]
    assert window_weights(5, "pyramid").tolist() == [1, 2, 3, 2, 1]
    assert window_weights(16).tolist() == list(range(1, 9)) + list(range(8, 0, -1))
    assert window_weights(1, "pyramid").tolist() == [1]
    assert window_weights(3, "flat").tolist() == [1, 1, 1]
    assert window_weights(4, "delayed_reverse_sawtooth").tolist() == [0.01, 2, 2, 1]
    assert window_weights(5, "delayed_reverse_sawtooth").tolist() == [0.01, 0.01, 3, 2, 1]  # diffusers: 6 weights
    assert window_weights(16, "delayed_reverse_sawtooth").tolist() == [0.01] * 7 + [8] + list(range(8, 0, -1))
    assert window_weights(3, "delayed_reverse_sawtooth").tolist() == [0.01, 2, 1]
    assert window_weights(2, "delayed_reverse_sawtooth").tolist() == [1, 1]


@pytest.mark.parametrize("length", [1, 2, 5, 16])
def test_gaussian_weights(length):
    w = window_weights(length, "gaussian")
    centre, sigma = (length - 1) / 2, length / 6
    for j in range(length):
        assert w[j].item() == pytest.approx(torch.exp(torch.tensor(-0.5 * ((j - centre) / sigma) ** 2,
                                                                   dtype=torch.float64)).item(), rel=1e-14)
    assert torch.equal(w, w.flip(0))  # symmetric about the window's centre


@pytest.mark.parametrize("weighting", WEIGHTINGS)
@pytest.mark.parametrize("length", range(1, 18))
def test_every_named_weighting_has_one_positive_weight_per_frame(weighting, length):
    w = window_weights(length, weighting)
    assert w.shape == (length,) and w.dtype == torch.float64 and bool((w > 0).all())


def test_callable_and_sequence_weights():
    assert window_weights(3, lambda n: [n, 1, n]).tolist() == [3, 1, 3]
    assert window_weights(2, [0.5, 2.0]).tolist() == [0.5, 2.0]
    assert window_weights(2, torch.tensor([1.0, 3.0])).tolist() == [1.0, 3.0]


# ----------------------------------------------------------------------------------------------------------
# fusion


def window_outputs(plan, shape_before=(3,), shape_after=(2,), seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape_before, stop - start, *shape_after, generator=gen).to(dtype) for start, stop in plan]


def literal_fusion(outputs, plan, frames, weighting, frame_dim=1):
    """value[f] += w·O[f]; count[f] += w; value / count, one frame at a time, in float64."""
    first = outputs[0].movedim(frame_dim, 0)
    value = torch.zeros(frames, *first.shape[1:], dtype=torch.float64)
    count = [0.0] * frames
    for (start, stop), out in zip(plan, outputs):
        w = window_weights(stop - start, weighting).tolist()
        out = out.movedim(frame_dim, 0).double()
        for j, f in enumerate(range(start, stop)):
            value[f] += w[j] * out[j]
            count[f] += w[j]
    for f in range(frames):
        value[f] /= count[f]
    return value.movedim(0, frame_dim)


@pytest.mark.parametrize("frames,length,stride", [(27, 16, 4), (22, 16, 4), (30, 16, 4), (20, 16, 4), (11, 4, 3)])
@pytest.mark.parametrize("weighting", WEIGHTINGS)
def test_fusion_equals_the_literal_weighted_average(frames, length, stride, weighting):
    plan = plan_windows(frames, length, stride)
    outputs = window_outputs(plan, dtype=torch.float64)
    fused = fuse_windows(outputs, plan, frames, weighting, frame_dim=1)
    assert fused.shape == (3, frames, 2) and fused.dtype == torch.float64
    assert_close_to_scale(fused, literal_fusion(outputs, plan, frames, weighting), 1e-13)


def test_fusion_small_case_worked_by_hand():
    # F=6, W=4, S=2: windows (0,4) and (2,6), pyramid [1,2,2,1]. Window 0 outputs 1s, window 1 outputs 10s.
    plan = plan_windows(6, 4, 2)
    assert plan == [(0, 4), (2, 6)]
    outputs = [torch.ones(1, 4, dtype=torch.float64), torch.full((1, 4), 10.0, dtype=torch.float64)]
    fused = fuse_windows(outputs, plan, 6, "pyramid")
    # frame 2: window 0 weight 2, window 1 weight 1 → (2·1 + 1·10)/3 = 4; frame 3: (1·1 + 2·10)/3 = 7
    assert fused.tolist() == [[1.0, 1.0, 4.0, 7.0, 10.0, 10.0]]


def test_identical_window_outputs_come_back_exactly():
    # a per-frame signal that every window reports identically must be returned bit for bit, any weighting
    frames = 27
    signal = torch.randn(5, frames, 3, generator=torch.Generator().manual_seed(1)) * 1e3
    plan = plan_windows(frames, 16, 4)
    for weighting in (*WEIGHTINGS, lambda n: [0.1 + 0.3 * j for j in range(n)]):
        outputs = [signal[:, start:stop] for start, stop in plan]
        fused = fuse_windows(outputs, plan, frames, weighting)
        assert fused.dtype == torch.float32
        assert torch.equal(fused, signal)


def test_weights_per_frame_sum_to_one_including_the_tail():
    for frames in (20, 22, 25, 27, 30, 64, 65):
        plan = plan_windows(frames, 16, 4)
        for weighting in WEIGHTINGS:
            m = fusion_weights(plan, frames, weighting)
            assert m.shape == (len(plan), frames)
            assert_close_to_scale(m.sum(dim=0), torch.ones(frames, dtype=torch.float64), 1e-15)
            assert bool((m >= 0).all())


def test_tail_frames_are_not_scaled():
    # diffusers' bug: F=27, W=16, S=4, pyramid scales frames 25 and 26 by 2/3 and 1/3 when all windows output 1
    plan = plan_windows(27, 16, 4)
    assert plan[-1] == (11, 27)
    outputs = [torch.ones(2, stop - start, 4) for start, stop in plan]
    fused = fuse_windows(outputs, plan, 27, "pyramid")
    assert torch.equal(fused, torch.ones(2, 27, 4))


def test_tail_window_contributes_over_exactly_its_frames():
    frames = 22
    plan = plan_windows(frames, 16, 4)
    m = fusion_weights(plan, frames, "pyramid")
    tail = m[-1]
    assert plan[-1] == (frames - 16, frames)
    assert tail[: frames - 16].abs().sum() == 0 and bool((tail[frames - 16:] > 0).all())
    assert tail[20:].tolist() == [1.0, 1.0]  # frames 20, 21: only the tail covers them


def test_frame_dim_for_video_latents():
    frames = 22
    plan = plan_windows(frames, 16, 4)
    gen = torch.Generator().manual_seed(3)
    outputs = [torch.randn(2, 4, stop - start, 3, 3, generator=gen, dtype=torch.float64) for start, stop in plan]
    fused = fuse_windows(outputs, plan, frames, "pyramid", frame_dim=2)
    assert fused.shape == (2, 4, frames, 3, 3)
    assert_close_to_scale(fused, literal_fusion(outputs, plan, frames, "pyramid", frame_dim=2), 1e-13)
    negative = fuse_windows(outputs, plan, frames, "pyramid", frame_dim=-3)
    assert torch.equal(negative, fused)


def test_accumulator_incremental_equals_fuse_and_tracks_sums():
    frames = 25
    plan = plan_windows(frames, 16, 4)
    outputs = window_outputs(plan, seed=4)
    acc = WindowAccumulator(frames, frame_dim=1)
    for window, out in zip(plan, outputs):
        acc.accumulate(window, out, "pyramid")
    expected_sums = torch.zeros(frames, dtype=torch.float64)
    for start, stop in plan:
        expected_sums[start:stop] += window_weights(stop - start)
    assert torch.equal(acc.weight_sums, expected_sums)
    result = acc.normalise()
    assert torch.equal(result, fuse_windows(outputs, plan, frames, "pyramid"))
    assert_close_to_scale(result, literal_fusion(outputs, plan, frames, "pyramid").float(), 1e-6)


def test_accumulator_half_inputs_accumulate_in_float32_or_given_dtype():
    plan = plan_windows(20, 16, 4)
    outputs = window_outputs(plan, dtype=torch.float16)
    fused = fuse_windows(outputs, plan, 20)
    assert fused.dtype == torch.float16
    exact = fuse_windows(outputs, plan, 20, dtype=torch.float64)
    assert exact.dtype == torch.float16
    assert_close_to_scale(fused.float(), literal_fusion(outputs, plan, 20, "pyramid").float(), 2e-3)


def test_accumulator_sub_window_emulates_an_uncovered_only_tail():
    # a caller can let a tail window contribute to its uncovered frames only (diffusers' intent) by passing
    # the sub-window and the matching slice of weights
    frames = 22
    plan = plan_windows(frames, 16, 4)
    outputs = window_outputs(plan, seed=5, dtype=torch.float64)
    acc = WindowAccumulator(frames)
    for window, out in zip(plan[:-1], outputs[:-1]):
        acc.accumulate(window, out)
    acc.accumulate((20, 22), outputs[-1][:, -2:], window_weights(16)[-2:])
    fused = acc.normalise()
    assert torch.equal(fused[:, 20:], outputs[-1][:, -2:])
    assert_close_to_scale(fused[:, :20], literal_fusion(outputs[:-1], plan[:-1], 20, "pyramid"), 1e-13)


# ----------------------------------------------------------------------------------------------------------
# errors


def test_exported():
    for name in ("plan_windows", "window_weights", "fuse_windows", "fusion_weights", "WindowAccumulator", "WEIGHTINGS"):
        assert name in video.__all__


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(num_frames=0), "num_frames"),
        (dict(num_frames=16.0), "num_frames"),
        (dict(num_frames=True), "num_frames"),
        (dict(num_frames="16"), "num_frames"),
        (dict(num_frames=20, context_length=0), "context_length"),
        (dict(num_frames=20, context_length=2.5), "context_length"),
        (dict(num_frames=40, context_length=33, max_length=32), "context_length.*max_length"),
        (dict(num_frames=40, context_length=16, max_length=0), "max_length"),
        (dict(num_frames=20, context_stride=0), "context_stride"),
        (dict(num_frames=20, context_stride=-4), "context_stride"),
        (dict(num_frames=20, context_stride=17), "context_stride.*context_length"),
        (dict(num_frames=8, context_stride=17), "context_stride"),  # checked even when F <= W
    ],
)
def test_plan_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        plan_windows(**kwargs)


def test_plan_at_max_length_is_accepted():
    assert plan_windows(40, 32, 4, max_length=32)[0] == (0, 32)


@pytest.mark.parametrize(
    "length,weighting,match",
    [
        (0, "pyramid", "length"),
        (4, "triangle", "weighting.*'pyramid'"),
        (4, "Pyramid", "weighting"),
        (4, 3, "weighting"),
        (4, [1, 2, 3], "weighting"),
        (2, [1, 0], "weighting"),
        (2, [1, float("nan")], "weighting"),
        (2, lambda n: [-1] * n, "weighting"),
        (2, lambda n: "ab", "weighting"),
    ],
)
def test_weight_errors(length, weighting, match):
    with pytest.raises(ValueError, match=match):
        window_weights(length, weighting)


def test_fusion_errors():
    plan = plan_windows(20, 16, 4)
    outputs = window_outputs(plan)
    with pytest.raises(ValueError, match="window_outputs"):
        fuse_windows(outputs[:1], plan, 20)
    with pytest.raises(ValueError, match="plan"):
        fuse_windows([], [], 20)
    with pytest.raises(ValueError, match="output"):
        fuse_windows([outputs[0], outputs[1][:, :15]], plan, 20)  # wrong number of frames
    with pytest.raises(ValueError, match="output"):
        fuse_windows([outputs[0], outputs[1][:1]], plan, 20)  # other axes differ
    with pytest.raises(ValueError, match="output"):
        fuse_windows([outputs[0], outputs[1].long()], plan, 20)
    with pytest.raises(ValueError, match="window stop"):
        fuse_windows(outputs, [(0, 16), (4, 21)], 20)
    with pytest.raises(ValueError, match="window"):
        fuse_windows(outputs, [(0, 16), (5, 5)], 20)
    with pytest.raises(ValueError, match="frame_dim"):
        fuse_windows(outputs, plan, 20, frame_dim=3)
    with pytest.raises(ValueError, match="weighting"):
        fuse_windows(outputs, plan, 20, weighting="linear")
    with pytest.raises(ValueError, match=r"frames \[16, 17, 18, 19\]"):
        fuse_windows(outputs[:1], plan[:1], 20)  # uncovered frames are an error, never zeros
    with pytest.raises(ValueError, match="accumulate"):
        WindowAccumulator(4).normalise()
    with pytest.raises(ValueError, match="dtype"):
        WindowAccumulator(4, dtype=torch.int64)
    with pytest.raises(ValueError, match="frames"):
        fusion_weights([(0, 4)], 6)
