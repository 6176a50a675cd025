"""FreeNoise where diffusers' `enable_free_noise` fails (FREENOISE.md §3.5), each against an independent
expectation: user latents of exactly W frames with the shuffle, F < W, `context_length=None`, a motion
model without a mid-block motion module, and an odd window with the delayed reverse sawtooth.

(The tail scaling, "repeat" and a list of generators are covered in test_freenoise_pipeline.py.)
"""

import copy

import pytest
import torch
from diffusers import AnimateDiffPipeline, MotionAdapter

import guidekit
from guidekit.attention.freenoise import motion_blocks, windowed_block_forward
from guidekit.hooks import SamplerState
from guidekit.pipelines import GuidedAnimateDiffPipeline
from guidekit.testing.animatediff import make_tiny_animatediff
from animatediff_calls import load, video
from tolerance import assert_close_to_scale


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_animatediff(tmp_path_factory.mktemp("tiny-animatediff-regressions"), max_length=16)


@pytest.fixture(scope="module")
def ours(tiny_dir):
    return load(GuidedAnimateDiffPipeline, tiny_dir)


def official_shuffle(noise, window, stride, generator):
    """The official rescheduling loop (VideoCrafter inference_freenoise.py; diffusers' `shuffle_context`),
    written out: block [k, k+S) becomes a permutation of the already rescheduled block [k−W, k−W+S)."""
    noise = noise.clone()
    frames = noise.shape[2]
    for k in range(window, frames, stride):
        source = list(range(k - window, k - window + stride))
        permutation = torch.randperm(stride, generator=generator).tolist()
        count = min(stride, frames - k)
        noise[:, :, k:k + count] = noise[:, :, [source[p] for p in permutation[:count]]]
    return noise


# ---------------------------------------------------------------- 3: user latents of exactly W frames


def test_user_latents_of_one_window_are_extended_by_the_shuffle():
    # diffusers: RuntimeError "expanded size (0)" (writes past the end of the W-frame tensor)
    shape = (1, 4, 27, 2, 2)
    full = torch.randn(shape, generator=torch.Generator().manual_seed(7))
    expected = official_shuffle(full, 16, 4, torch.Generator().manual_seed(8))
    state = SamplerState(num_steps=1, scheduler=None, generator=torch.Generator().manual_seed(8),
                         extras={"user_latents": True, "num_frames": 27})
    result = guidekit.FreeNoise().init_latents(state, full[:, :, :16])
    torch.testing.assert_close(result, expected, rtol=0, atol=0)
    # the user's latents of all F frames, or of W frames for a W-frame video, are kept as they are
    torch.testing.assert_close(guidekit.FreeNoise().init_latents(state, full), full, rtol=0, atol=0)
    state.extras["num_frames"] = 16
    torch.testing.assert_close(guidekit.FreeNoise().init_latents(state, full[:, :, :16]), full[:, :, :16], rtol=0, atol=0)


def test_user_latents_of_one_window_give_the_video_of_their_shuffle(ours):
    first = torch.randn(1, 4, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    filler = torch.randn(1, 4, 4, 8, 8)  # frames 16–19 are overwritten by the shuffle
    extended = official_shuffle(torch.cat([first, filler], dim=2), 16, 4, torch.Generator().manual_seed(2))
    hook = guidekit.FreeNoise()
    result = video(ours, 20, latents=first, hooks=[hook], generator=torch.Generator().manual_seed(2))
    expected = video(ours, 20, latents=extended, hooks=[hook], generator=torch.Generator().manual_seed(2))
    assert result.shape == (1, 4, 20, 8, 8)
    assert_close_to_scale(result, expected, rel=1e-6)


# ---------------------------------------------------------------- 4: F < W


@pytest.mark.parametrize("noise", ["shuffle", "repeat", "random"])
def test_fewer_frames_than_the_window_is_the_stock_pipeline(ours, tiny_dir, noise):
    # diffusers: IndexError (its window list is empty); here one window covers every frame: the plain model
    stock = load(AnimateDiffPipeline, tiny_dir)
    hook = guidekit.FreeNoise(noise=noise, norm_scope="window", spatial_chunk=3)
    assert_close_to_scale(video(ours, 8, hooks=[hook]), video(stock, 8), rel=1e-5)
    torch.testing.assert_close(video(ours, 1, hooks=[guidekit.FreeNoise(noise=noise)]), video(stock, 1), rtol=0, atol=0)


# ---------------------------------------------------------------- 5: context_length=None


@pytest.fixture(scope="module")
def ours24(tmp_path_factory):
    folder = make_tiny_animatediff(tmp_path_factory.mktemp("tiny-animatediff-24"), max_length=24)
    return load(GuidedAnimateDiffPipeline, folder)


def test_context_length_none_is_the_motion_models_length(ours24):
    # diffusers: TypeError (it compares None before applying the default); documented: motion_max_seq_length
    auto = video(ours24, 28, hooks=[guidekit.FreeNoise(context_length=None)])
    torch.testing.assert_close(auto, video(ours24, 28, hooks=[guidekit.FreeNoise(context_length=24)]), rtol=0, atol=0)
    assert (auto - video(ours24, 28, hooks=[guidekit.FreeNoise(context_length=16)])).abs().max() > 1e-4


def test_context_length_none_checks_the_stride_at_the_call(ours):
    hook = guidekit.FreeNoise(context_length=None, context_stride=20)  # 20 > motion_max_seq_length 16
    with pytest.raises(ValueError, match="context_stride"):
        video(ours, 24, hooks=[hook])
    with pytest.raises(ValueError, match="context_stride"):
        guidekit.FreeNoise(context_length=None, context_stride=0)


# ---------------------------------------------------------------- 6: no mid-block motion module


@pytest.fixture(scope="module")
def no_mid_dir(tiny_dir, tmp_path_factory):
    torch.manual_seed(0)
    adapter = MotionAdapter(block_out_channels=(16, 32), motion_layers_per_block=1, motion_num_attention_heads=2,
                            motion_norm_num_groups=8, motion_max_seq_length=16, use_motion_mid_block=False)
    folder = tmp_path_factory.mktemp("tiny-animatediff-no-mid")
    AnimateDiffPipeline.from_pretrained(str(tiny_dir / "_image"), motion_adapter=adapter).save_pretrained(str(folder))
    return folder


def test_no_mid_motion_block(no_mid_dir):
    # diffusers: disable_free_noise() raises AttributeError on such a model. Here: diffusers' own result where
    # it is right (no tail window), and the model exactly as before after the call
    ours = load(GuidedAnimateDiffPipeline, no_mid_dir)
    assert motion_blocks(ours.unet) and not any(name.startswith("mid_block") for name, _ in motion_blocks(ours.unet))
    before = video(ours, 8)
    result = video(ours, 20, hooks=[guidekit.FreeNoise(norm_scope="window", spatial_chunk=8)])
    plain_norm = video(ours, 20, hooks=[guidekit.FreeNoise(fusion="block")])
    stock = load(AnimateDiffPipeline, no_mid_dir)
    stock.enable_free_noise(context_length=16, context_stride=4, weighting_scheme="pyramid", noise_type="shuffle_context")
    assert_close_to_scale(plain_norm, video(stock, 20), rel=1e-5)
    assert torch.isfinite(result).all() and result.shape == (1, 4, 20, 8, 8)
    torch.testing.assert_close(video(ours, 8), before, rtol=0, atol=0)


# ---------------------------------------------------------------- 8: odd windows and the sawtooth


def test_odd_window_sawtooth_fusion_is_exact(ours):
    # diffusers: a shape error (its odd sawtooth has W + 1 weights). Zero attention outputs make every window's
    # residual stream its input, so any correctly normalised fusion is the identity before the feed-forward
    block = copy.deepcopy(motion_blocks(ours.unet)[0][1])
    for attn in (block.attn1, block.attn2):
        torch.nn.init.zeros_(attn.to_out[0].weight)
        torch.nn.init.zeros_(attn.to_out[0].bias)
    hidden = torch.randn(3, 12, block.dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = hidden + block.ff(block.norm3(hidden))
        for fusion in ("block", "attention"):
            result = windowed_block_forward(block, hidden, 5, 2, "delayed_reverse_sawtooth", fusion=fusion)
            assert_close_to_scale(result, expected, rel=1e-6)


class _Zero(torch.nn.Module):
    def forward(self, x):
        return torch.zeros_like(x)


def test_odd_window_sawtooth_weights_per_frame(ours):
    # identity attention on a block whose residual stream is a per-window constant: the fused value of each
    # frame is the literal weighted mean of its windows' constants, weights [0.01, 0.01, 3, 2, 1] (W = 5)
    block = copy.deepcopy(motion_blocks(ours.unet)[0][1])
    for attn in (block.attn1, block.attn2):
        torch.nn.init.zeros_(attn.to_out[0].weight)
        torch.nn.init.zeros_(attn.to_out[0].bias)
    block.ff = _Zero()  # the block's output is then its fused residual stream
    hidden = torch.zeros(1, 9, block.dim)
    plan = [(0, 5), (2, 7), (4, 9)]  # F = 9, W = 5, S = 2, worked by hand
    weights = [0.01, 0.01, 3.0, 2.0, 1.0]
    original = block.attn1.forward
    calls = []

    def tagged(norm_hidden_states, *args, **kwargs):
        # the residual stream of window v becomes x + v (its index), through attn1's output
        calls.append(None)
        out = original(norm_hidden_states, *args, **kwargs)
        return out + float(len(calls) - 1)

    block.attn1.forward = tagged
    with torch.no_grad():
        result = windowed_block_forward(block, hidden, 5, 2, "delayed_reverse_sawtooth")[0, :, 0]
    expected = []
    for f in range(9):
        terms = [(weights[f - s], v) for v, (s, e) in enumerate(plan) if s <= f < e]
        expected.append(sum(w * v for w, v in terms) / sum(w for w, _ in terms))
    assert len(calls) == len(plan)
    torch.testing.assert_close(result, torch.tensor(expected, dtype=result.dtype), rtol=1e-6, atol=1e-6)


def test_odd_window_sawtooth_pipeline(ours):
    hook = guidekit.FreeNoise(context_length=5, context_stride=2, weighting="delayed_reverse_sawtooth")
    long = video(ours, 13, hooks=[hook])
    assert torch.isfinite(long).all() and long.shape[2] == 13
    pyramid = video(ours, 13, hooks=[guidekit.FreeNoise(context_length=5, context_stride=2)])
    assert (long - pyramid).abs().max() > 1e-5
    torch.testing.assert_close(video(ours, 5, hooks=[hook]), video(ours, 5), rtol=0, atol=0)


def test_context_length_none_with_explicit_weights(ours):
    # W weights for W = None are checked against the motion model's length at the call
    flat = video(ours, 20, hooks=[guidekit.FreeNoise(weighting="flat")])
    given = video(ours, 20, hooks=[guidekit.FreeNoise(context_length=None, weighting=[2.0] * 16)])
    torch.testing.assert_close(given, flat, rtol=0, atol=0)
    with pytest.raises(ValueError, match="weighting"):
        video(ours, 20, hooks=[guidekit.FreeNoise(context_length=None, weighting=[1.0] * 5)])
