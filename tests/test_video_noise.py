"""FreeNoise's noise rescheduling against a plain loop of the official block shuffle, and its properties."""

import pytest
import torch

import guidekit.video as video
from guidekit.video import NOISE_MODES, reschedule_noise, shuffle_sources


def gen(seed):
    return torch.Generator().manual_seed(seed)


def make_noise(frames, batch=2, channels=3, size=2, seed=0, dtype=torch.float32):
    return torch.randn(batch, channels, frames, size, size, generator=gen(seed)).to(dtype)


def literal_shuffle(noise, window, stride, generator):
    """The official loop (inference_freenoise.py) with diffusers' per-block torch.randperm and its last-block cut.

    for k in W, W+S, … < F: frames [k, k+S) ← a permutation of frames [k−W, k−W+S), in place, left to right.
    """
    x = noise.clone()
    frames = x.shape[2]
    for k in range(window, frames, stride):
        source = list(range(k - window, k - window + stride))
        permutation = torch.randperm(stride, generator=generator).tolist()
        shuffled = [source[p] for p in permutation]
        n = min(stride, frames - k)
        x[:, :, k:k + n] = x[:, :, shuffled[:n]]
    return x


def frame_index(tensor, frame):
    """Which frame of the first window equals `frame` (noise frames are distinct)."""
    hits = [j for j in range(tensor.shape[2]) if torch.equal(tensor[:, :, j], frame)]
    assert len(hits) == 1
    return hits[0]


@pytest.mark.parametrize("frames,window,stride", [(64, 16, 4), (22, 16, 4), (27, 16, 4), (17, 16, 4), (40, 16, 3),
                                                  (13, 4, 4), (9, 3, 1), (30, 8, 8)])
def test_shuffle_equals_the_literal_official_loop(frames, window, stride):
    noise = make_noise(frames, seed=frames)
    out = reschedule_noise(noise, window, stride, generator=gen(7))
    assert torch.equal(out, literal_shuffle(noise, window, stride, gen(7)))


def test_defaults_are_official_shuffle_16_4():
    noise = make_noise(40, batch=1)
    assert torch.equal(reschedule_noise(noise, generator=gen(3)), literal_shuffle(noise, 16, 4, gen(3)))


@pytest.mark.parametrize("frames", [20, 22, 27, 33, 64])
def test_shuffle_properties(frames):
    window, stride = 16, 4
    noise = make_noise(frames, seed=1)
    before = noise.clone()
    out = reschedule_noise(noise, window, stride, generator=gen(2))
    assert torch.equal(noise, before)  # input untouched
    assert out.shape == noise.shape and out.dtype == noise.dtype
    assert torch.equal(out[:, :, :window], noise[:, :, :window])  # the first W frames are kept
    for k in range(window, frames, stride):
        n = min(stride, frames - k)
        source = out[:, :, k - window:k - window + stride]  # of the already rescheduled sequence
        picked = [frame_index(source, out[:, :, k + j]) for j in range(n)]
        assert len(set(picked)) == n  # distinct frames of the source block
        if n == stride:
            assert sorted(picked) == list(range(stride))  # a permutation of it
    for f in range(window, frames):  # every frame is a copy of a frame of the first window
        frame_index(noise[:, :, :window], out[:, :, f])


def test_shuffle_sources_describe_the_result():
    noise = make_noise(30, seed=4)
    source = shuffle_sources(30, 16, 4, gen(5))
    assert source[:16] == list(range(16)) and all(s < 16 for s in source)
    assert torch.equal(reschedule_noise(noise, 16, 4, generator=gen(5)), noise[:, :, source])


def test_shuffle_blocks_follow_the_window_plan():
    # every full window of the plan holds a permutation of the first window's noise
    frames, window, stride = 40, 16, 4
    source = shuffle_sources(frames, window, stride, gen(6))
    for start, stop in video.plan_windows(frames, window, stride):
        assert sorted(source[start:stop]) == list(range(window))


def test_generator_determinism_and_variety():
    noise = make_noise(48)
    a = reschedule_noise(noise, generator=gen(11))
    b = reschedule_noise(noise, generator=gen(11))
    c = reschedule_noise(noise, generator=gen(12))
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.manual_seed(0)
    d = reschedule_noise(noise)  # torch's default generator
    torch.manual_seed(0)
    assert torch.equal(d, reschedule_noise(noise))


def test_one_generator_shares_the_permutations_across_the_batch():
    noise = make_noise(30, batch=3)
    out = reschedule_noise(noise, generator=gen(9))
    source = shuffle_sources(30, 16, 4, gen(9))
    for b in range(3):
        assert torch.equal(out[b], noise[b][:, source])


@pytest.mark.parametrize("mode", NOISE_MODES)
def test_per_sample_generators_do_not_depend_on_the_batch(mode):
    noise = make_noise(30, batch=3, seed=8)
    batched = reschedule_noise(noise, generator=[gen(1), gen(2), gen(3)], mode=mode)
    for b, seed in enumerate((1, 2, 3)):
        alone = reschedule_noise(noise[b:b + 1], generator=[gen(seed)], mode=mode)
        assert torch.equal(batched[b:b + 1], alone)
        assert torch.equal(alone, reschedule_noise(noise[b:b + 1], generator=gen(seed), mode=mode))
    if mode != "repeat":  # each sample's own generator matters
        assert not torch.equal(batched[:1], reschedule_noise(noise[:1], generator=[gen(2)], mode=mode))


def test_per_sample_generators_equal_the_literal_loop_per_sample():
    noise = make_noise(27, batch=2, seed=2)
    out = reschedule_noise(noise, generator=[gen(4), gen(5)])
    for b, seed in enumerate((4, 5)):
        assert torch.equal(out[b:b + 1], literal_shuffle(noise[b:b + 1], 16, 4, gen(seed)))


def test_repeat_tiles_the_first_window():
    noise = make_noise(37)
    out = reschedule_noise(noise, 16, 4, mode="repeat")
    for f in range(37):
        assert torch.equal(out[:, :, f], noise[:, :, f % 16])


def test_random_keeps_the_first_window_and_draws_the_rest_from_the_generator():
    noise = make_noise(24, batch=2, channels=3, size=2)
    out = reschedule_noise(noise, 16, 4, generator=gen(13), mode="random")
    assert torch.equal(out[:, :, :16], noise[:, :, :16])
    assert torch.equal(out[:, :, 16:], torch.randn(2, 3, 8, 2, 2, generator=gen(13)))
    per_sample = reschedule_noise(noise, 16, 4, generator=[gen(13), gen(14)], mode="random")
    assert torch.equal(per_sample[1:, :, 16:], torch.randn(1, 3, 8, 2, 2, generator=gen(14)))


@pytest.mark.parametrize("mode", NOISE_MODES)
@pytest.mark.parametrize("frames", [1, 8, 16])
def test_no_more_frames_than_the_window_is_a_copy(mode, frames):
    noise = make_noise(frames)
    out = reschedule_noise(noise, 16, 4, generator=gen(0), mode=mode)
    assert torch.equal(out, noise) and out.data_ptr() != noise.data_ptr()


@pytest.mark.parametrize("mode", ["shuffle", "repeat"])
def test_first_window_extends_to_num_frames(mode):
    full = make_noise(30, seed=3)
    out = reschedule_noise(full[:, :, :16], 16, 4, generator=gen(1), mode=mode, num_frames=30)
    assert torch.equal(out, reschedule_noise(full, 16, 4, generator=gen(1), mode=mode))
    random = reschedule_noise(full[:, :, :16], 16, 4, generator=gen(1), mode="random", num_frames=30)
    assert random.shape[2] == 30 and torch.equal(random[:, :, :16], full[:, :, :16])


def test_half_precision_is_kept_exactly():
    noise = make_noise(26, dtype=torch.float16)
    out = reschedule_noise(noise, generator=gen(2))
    assert out.dtype == torch.float16
    assert torch.equal(out, literal_shuffle(noise, 16, 4, gen(2)))


def test_exported():
    for name in ("reschedule_noise", "shuffle_sources", "NOISE_MODES"):
        assert name in video.__all__


@pytest.mark.parametrize(
    "noise,kwargs,match",
    [
        (torch.zeros(2, 3, 20, 4), {}, r"noise.*\(B, C, F, H, W\)"),
        (torch.zeros(3, 20, 4, 4, 4, 1), {}, "noise"),
        (torch.zeros(1, 3, 0, 2, 2), {}, "noise"),
        (torch.zeros(1, 3, 20, 2, 2, dtype=torch.int64), {}, "noise.*floating"),
        ([[0.0]], {}, "noise"),
        (torch.zeros(1, 1, 20, 2, 2), dict(mode="shuffle_context"), "mode.*'shuffle'"),
        (torch.zeros(1, 1, 20, 2, 2), dict(mode="repeat_context"), "mode"),
        (torch.zeros(1, 1, 20, 2, 2), dict(context_length=0), "context_length"),
        (torch.zeros(1, 1, 20, 2, 2), dict(context_length=16.0), "context_length"),
        (torch.zeros(1, 1, 40, 2, 2), dict(context_length=33, max_length=32), "context_length"),
        (torch.zeros(1, 1, 20, 2, 2), dict(context_stride=0), "context_stride"),
        (torch.zeros(1, 1, 20, 2, 2), dict(context_stride=17), "context_stride"),
        (torch.zeros(2, 1, 20, 2, 2), dict(generator=[gen(0)]), "generator.*list of 2"),
        (torch.zeros(2, 1, 20, 2, 2), dict(generator=[gen(0), 5]), "generator"),
        (torch.zeros(1, 1, 20, 2, 2), dict(generator=5), "generator"),
        (torch.zeros(1, 1, 20, 2, 2), dict(num_frames=24), "noise.*20 frames"),
        (torch.zeros(1, 1, 12, 2, 2), dict(num_frames=24), "noise"),
        (torch.zeros(1, 1, 20, 2, 2), dict(num_frames=20.0), "num_frames"),
        (torch.zeros(1, 1, 20, 2, 2), dict(num_frames=0), "num_frames"),
    ],
)
def test_errors(noise, kwargs, match):
    with pytest.raises(ValueError, match=match):
        reschedule_noise(noise, **kwargs)


def test_shuffle_sources_errors():
    with pytest.raises(ValueError, match="num_frames"):
        shuffle_sources(-1)
    with pytest.raises(ValueError, match="context_stride"):
        shuffle_sources(20, 16, 20)
