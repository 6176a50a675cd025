"""FreeNoise's GroupNorm scope: diffusers' statistics over all frames ("all") or per window ("window")."""

import pytest
import torch
import torch.nn.functional as F
from diffusers import AnimateDiffPipeline
from torch import nn

import guidekit
from guidekit.hooks import SamplerState
from guidekit.pipelines import GuidedAnimateDiffPipeline
from guidekit.testing.animatediff import make_tiny_animatediff
from guidekit.video import plan_windows, window_group_norm, windowed_group_norms
from guidekit.video.motion import motion_modules
from animatediff_calls import load, video
from tolerance import assert_close_to_scale


# F = 11 frames, W = 4, S = 3: three windows and a tail window, worked out by hand
PLAN = [(0, 4), (3, 7), (6, 10), (7, 11)]
PYRAMID_4 = [1.0, 2.0, 2.0, 1.0]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_animatediff(tmp_path_factory.mktemp("tiny-animatediff-norm"), max_length=16)


@pytest.fixture(scope="module")
def ours(tiny_dir):
    return load(GuidedAnimateDiffPipeline, tiny_dir)


def literal_window_norm(x, groups, weight, bias, eps, plan, window_weights):
    """Per window: each sample's and group's mean and biased variance over the group's channels, the window's
    frames and all pixels; normalise, apply the affine map; then per frame the weighted mean over its windows."""
    batch, channels, frames = x.shape[:3]
    total = torch.zeros(x.shape, dtype=torch.float64)
    weight_sum = torch.zeros(frames, dtype=torch.float64)
    per_group = channels // groups
    for start, stop in plan:
        part = x[:, :, start:stop].double()
        out = torch.empty_like(part)
        for b in range(batch):
            for g in range(groups):
                cs = slice(g * per_group, (g + 1) * per_group)
                values = part[b, cs]
                mean = values.mean()
                var = ((values - mean) ** 2).mean()
                out[b, cs] = (values - mean) / torch.sqrt(var + eps)
        out = out * weight.double().view(1, -1, 1, 1, 1) + bias.double().view(1, -1, 1, 1, 1)
        w = torch.tensor(window_weights, dtype=torch.float64)
        total[:, :, start:stop] += out * w.view(1, 1, -1, 1, 1)
        weight_sum[start:stop] += w
    return total / weight_sum.view(1, 1, -1, 1, 1)


def _norm(channels, groups, seed=0):
    torch.manual_seed(seed)
    norm = nn.GroupNorm(groups, channels, eps=1e-5)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    return norm


# ---------------------------------------------------------------- the math on fixed tensors


def test_plan_of_the_fixed_case():
    assert plan_windows(11, 4, 3) == PLAN


def test_window_norm_is_the_literal_per_window_statistics():
    norm = _norm(8, 4)
    x = torch.randn(2, 8, 11, 3, 3, generator=torch.Generator().manual_seed(1)) * 3 + 1
    # frames drift, so per-window statistics differ from the all-frame ones
    x = x + torch.linspace(0, 4, 11).view(1, 1, -1, 1, 1)
    expected = literal_window_norm(x, 4, norm.weight, norm.bias, norm.eps, PLAN, PYRAMID_4)
    with torch.no_grad():
        result = window_group_norm(norm, x, PLAN, "pyramid")
        global_norm = norm(x)
    assert result.dtype == x.dtype and result.shape == x.shape
    assert_close_to_scale(result, expected.float(), rel=1e-5)
    assert (global_norm - expected.float()).abs().max() > 1e-2  # the scope matters on this input


def test_one_window_is_the_plain_group_norm():
    norm = _norm(8, 2)
    x = torch.randn(1, 8, 6, 2, 2, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert_close_to_scale(window_group_norm(norm, x, [(0, 6)]), norm(x), rel=1e-6)


def test_motion_module_norms_use_window_statistics_inside_the_block(ours):
    name, module = motion_modules(ours.unet)[0]
    norm = module.norm
    x = torch.randn(2, norm.num_channels, 11, 2, 2, generator=torch.Generator().manual_seed(3))
    x = x + torch.linspace(-3, 3, 11).view(1, 1, -1, 1, 1)
    expected = literal_window_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps, PLAN, PYRAMID_4).float()
    with torch.no_grad():
        with windowed_group_norms(ours.unet, 4, 3) as names:
            inside = norm(x)
            short = norm(x[:, :, :4])  # F <= W: one window, the module's own GroupNorm
        outside = norm(x)
    assert name in names and len(names) == len(motion_modules(ours.unet))
    assert_close_to_scale(inside, expected, rel=1e-5)
    assert_close_to_scale(short, F.group_norm(x[:, :, :4], norm.num_groups, norm.weight, norm.bias, norm.eps), rel=0)
    assert_close_to_scale(outside, F.group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps), rel=0)
    assert "forward" not in norm.__dict__


# ---------------------------------------------------------------- the hook


def test_all_keeps_parity_with_diffusers(ours, tiny_dir):
    stock = load(AnimateDiffPipeline, tiny_dir)
    stock.enable_free_noise(context_length=16, context_stride=4, weighting_scheme="pyramid", noise_type="shuffle_context")
    result = video(ours, 20, hooks=[guidekit.FreeNoise(norm_scope="all", fusion="block")])
    assert_close_to_scale(result, video(stock, 20), rel=1e-5)


@pytest.mark.parametrize("num_frames", [12, 16])
def test_window_with_one_window_is_all(ours, num_frames):
    window = video(ours, num_frames, hooks=[guidekit.FreeNoise(norm_scope="window")])
    torch.testing.assert_close(window, video(ours, num_frames, hooks=[guidekit.FreeNoise(norm_scope="all")]),
                               rtol=0, atol=0)


def _unet_output(pipe, hook, sample, embeddings):
    """One UNet call with `hook` installed for it, as the pipeline installs it."""
    state = SamplerState(num_steps=1, scheduler=pipe.scheduler, extras={"pipeline": pipe})
    hook.validate(state)
    hook.begin(state)
    try:
        with torch.no_grad():
            return pipe.unet(sample, torch.tensor(500), encoder_hidden_states=embeddings).sample
    finally:
        hook.end(state)


def test_window_scope_makes_disjoint_windows_independent(ours):
    # S = W = 8: frames 0–7 of a 16-frame video lie in the first window only. With per-window statistics
    # nothing couples them to frames 8–15, so they equal an 8-frame video (the spatial layers act per frame)
    sample = torch.randn(1, 4, 16, 8, 8, generator=torch.Generator().manual_seed(4))
    embeddings = torch.randn(16, 77, 32, generator=torch.Generator().manual_seed(5))
    short = _unet_output(ours, guidekit.FreeNoise(8, 8), sample[:, :, :8], embeddings[:8])
    window = _unet_output(ours, guidekit.FreeNoise(8, 8, norm_scope="window"), sample, embeddings)
    whole = _unet_output(ours, guidekit.FreeNoise(8, 8, norm_scope="all"), sample, embeddings)
    assert_close_to_scale(window[:, :, :8], short, rel=1e-5)
    assert (whole[:, :, :8] - short).abs().max() > 1e-3  # diffusers' GroupNorm couples every frame
    assert all("forward" not in module.norm.__dict__ for _, module in motion_modules(ours.unet))


def test_window_scope_long_video(ours):
    window = video(ours, 22, hooks=[guidekit.FreeNoise(norm_scope="window")])
    whole = video(ours, 22, hooks=[guidekit.FreeNoise()])
    assert torch.isfinite(window).all() and (window - whole).abs().max() > 1e-4


@pytest.mark.parametrize("value", ["frame", "global", None, 1])
def test_norm_scope_errors(value):
    with pytest.raises(ValueError, match=r"norm_scope: .* accepted: 'all', 'window'"):
        guidekit.FreeNoise(norm_scope=value)


def test_window_group_norm_errors():
    with pytest.raises(ValueError, match="hidden_states"):
        window_group_norm(_norm(8, 4), torch.randn(2, 8, 4, 4), [(0, 2)])
    with pytest.raises(ValueError, match="covered by no window"):
        window_group_norm(_norm(8, 4), torch.randn(1, 8, 6, 2, 2), [(0, 4)])
