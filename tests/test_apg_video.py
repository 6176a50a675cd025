"""APG on video latents (B, C, F, H, W): per frame by default, over the whole video with per_frame=False."""

import numpy as np
import pytest
import torch

import guidekit
from guidekit.guidance.apg_math import apg_step
from guidekit.guidance.diffusers_guider import APGGuider
from guidekit.hooks import SamplerState
from tolerance import assert_close_to_scale


def reference_apg_video(conds, unconds, w, eta, r, beta, per_frame):
    """Algorithm 1 re-derived with numpy float64 over several steps (momentum carried, element-wise).

    Each vector the paper normalises and projects is one frame (C, H, W) of one sample when `per_frame`,
    else one whole sample (C, F, H, W).
    """
    outs = []
    m = None
    for cond, uncond in zip(conds, unconds):
        cond = cond.numpy().astype(np.float64)
        delta = cond - uncond.numpy().astype(np.float64)
        if beta != 0:
            m = delta.copy() if m is None else delta + beta * m
            delta = m.copy()
        out = np.empty_like(cond)
        batch, _, frames = cond.shape[:3]
        pieces = [(b, f) for b in range(batch) for f in range(frames)] if per_frame else [(b, None) for b in range(batch)]
        for b, f in pieces:
            index = (b, slice(None), f) if per_frame else (b,)
            d, c = delta[index].ravel(), cond[index].ravel()
            if r is not None:
                n = np.sqrt((d * d).sum())
                if n > r:
                    d = d * (r / n)  # rescale to radius r
            c_hat = c / np.sqrt((c * c).sum())
            par = np.dot(d, c_hat) * c_hat  # projection onto the conditional prediction
            u = (d - par) + eta * par
            out[index] = (c + (w - 1) * u).reshape(cond[index].shape)
        outs.append(out)
    return outs


def video_pairs(n_steps=3, batch=2, channels=4, frames=5, side=4, seed=0):
    """Fixed (cond, uncond) video pairs whose frames have very different scales (0.1 to 8), so that r = 5
    rescales some frames and not others."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.tensor([0.1, 1.0, 8.0, 0.5, 3.0][:frames]).view(1, 1, -1, 1, 1)
    shape = (batch, channels, frames, side, side)
    conds = [torch.randn(*shape, generator=g, dtype=torch.float64) * scales for _ in range(n_steps)]
    unconds = [c + torch.randn(*shape, generator=g, dtype=torch.float64) * scales for c in conds]
    return conds, unconds


def hook_outputs(hook, conds, unconds, w):
    state = SamplerState(num_steps=len(conds), scheduler=None, guidance_scale=w)
    hook.begin(state)
    outs = []
    for i, (c, u) in enumerate(zip(conds, unconds)):
        state.step_index = i
        outs.append(hook.guide(state, c, u))
    return outs


def repeated_frames(frames, steps=2, seed=1):
    """Videos of `frames` identical frames (one fixed frame pair per step), (1, 4, F, 8, 8), float64."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        cond = torch.randn(1, 4, 1, 8, 8, generator=g, dtype=torch.float64) * 4
        uncond = cond + torch.randn(1, 4, 1, 8, 8, generator=g, dtype=torch.float64) * 4
        out.append((cond.expand(-1, -1, frames, -1, -1).clone(), uncond.expand(-1, -1, frames, -1, -1).clone()))
    return [c for c, _ in out], [u for _, u in out]


def test_same_frames_get_the_same_update_at_16_and_64_frames():
    w = 10.0
    updates = {}
    for frames in (16, 64):
        conds, unconds = repeated_frames(frames)
        outs = hook_outputs(guidekit.APG(space="model"), conds, unconds, w)  # default settings, r = 15
        updates[frames] = [(out - c)[:, :, 0] for out, c in zip(outs, conds)]
        # all frames of a video of identical frames are guided alike
        for out in outs:
            assert_close_to_scale(out, out[:, :, :1].expand_as(out), rel=1e-12)
    for short, long in zip(updates[16], updates[64]):
        assert_close_to_scale(long, short, rel=1e-12)
    # the fixture's Δ per frame is larger than r, so r binds: per frame the update has norm (w − 1)·r at most
    assert float((unconds[0] - conds[0])[:, :, 0].norm()) > 15.0
    assert float(updates[64][0].norm()) <= (w - 1) * 15.0 * (1 + 1e-12)


def test_whole_video_option_weakens_with_length():
    # per_frame=False is diffusers' guider's form: one norm over (C, F, H, W). With identical frames the
    # clipped per-frame update halves when the video is four times longer.
    norms = {}
    for frames in (16, 64):
        conds, unconds = repeated_frames(frames, steps=1)
        out = hook_outputs(guidekit.APG(space="model", momentum=0.0, per_frame=False), conds, unconds, 10.0)[0]
        norms[frames] = float((out - conds[0])[:, :, 0].norm())
    assert norms[64] == pytest.approx(norms[16] / 2, rel=1e-9)


@pytest.mark.parametrize("eta", [0.0, 0.5])
@pytest.mark.parametrize("r,beta", [(None, 0.0), (5.0, 0.0), (5.0, -0.5), (None, -0.5)])
@pytest.mark.parametrize("per_frame", [True, False])
def test_hook_matches_algorithm_1_per_frame_or_per_video(eta, r, beta, per_frame):
    conds, unconds = video_pairs()
    hook = guidekit.APG(eta=eta, norm_threshold=r, momentum=beta, space="model", per_frame=per_frame)
    expected = reference_apg_video(conds, unconds, 8.0, eta, r, beta, per_frame)
    for out, exp in zip(hook_outputs(hook, conds, unconds, 8.0), expected):
        assert_close_to_scale(out, torch.from_numpy(exp), rel=1e-12)


def test_rescaling_binds_on_some_frames_only():
    # Guard: with r = 5 the fixture clips some frames and not others, so the r cases above test per-frame r.
    conds, unconds = video_pairs()
    norms = (conds[0] - unconds[0]).transpose(1, 2).flatten(2).norm(dim=2)
    assert (norms > 5).any() and (norms < 5).any()


def test_whole_video_option_is_the_unchanged_math_core():
    # per_frame=False calls the math core exactly as before (all non-batch dims), as APGGuider does.
    conds, unconds = video_pairs()
    hook = guidekit.APG(norm_threshold=5.0, space="model", per_frame=False)
    running = None
    for out, c, u in zip(hook_outputs(hook, conds, unconds, 8.0), conds, unconds):
        expected, running = apg_step(c, u, 8.0, eta=0.0, norm_threshold=5.0, momentum=-0.5, running=running)
        assert torch.equal(out, expected)


def test_frames_do_not_affect_each_other():
    conds, unconds = video_pairs(n_steps=2)
    changed = [u.clone() for u in unconds]
    for u in changed:
        u[:, :, 2] *= 3.0
    for per_frame in (True, False):
        hook = guidekit.APG(norm_threshold=5.0, space="model", per_frame=per_frame)
        a = hook_outputs(hook, conds, unconds, 8.0)[-1]
        b = hook_outputs(hook, conds, changed, 8.0)[-1]
        others = [f for f in range(a.shape[2]) if f != 2]
        same = torch.equal(a[:, :, others], b[:, :, others])
        assert same == per_frame


@pytest.mark.parametrize("space", ["model", "x0"])
def test_images_are_guided_alike_with_either_option(space):
    from diffusers import DDIMScheduler

    g = torch.Generator().manual_seed(3)
    conds = [torch.randn(2, 4, 6, 6, generator=g) for _ in range(3)]
    unconds = [c + torch.randn(2, 4, 6, 6, generator=g) for c in conds]
    outs = {}
    for per_frame in (True, False):
        scheduler = DDIMScheduler()
        scheduler.set_timesteps(3)
        state = SamplerState(num_steps=3, scheduler=scheduler, guidance_scale=8.0)
        hook = guidekit.APG(norm_threshold=5.0, space=space, per_frame=per_frame)
        hook.begin(state)
        outs[per_frame] = []
        for i, (c, u) in enumerate(zip(conds, unconds)):
            state.update(i, scheduler.timesteps[i], c, c)
            outs[per_frame].append(hook.guide(state, c, u))
    for a, b in zip(outs[True], outs[False]):
        assert torch.equal(a, b)


def test_diffusers_guider_stays_over_the_whole_video():
    # APGGuider documents one norm over all non-batch dims of the model output, as diffusers' guider.
    conds, unconds = video_pairs()
    guider = APGGuider(guidance_scale=8.0, eta=0.0, norm_threshold=5.0, momentum=-0.5)
    expected = reference_apg_video(conds, unconds, 8.0, 0.0, 5.0, -0.5, per_frame=False)
    for i, (c, u, exp) in enumerate(zip(conds, unconds, expected)):
        guider.set_state(i, len(conds), torch.tensor(999 - i))
        assert_close_to_scale(guider.forward(c, u).pred, torch.from_numpy(exp), rel=1e-12)


def test_bad_per_frame_and_norm_dims_are_refused():
    with pytest.raises(ValueError, match="per_frame: 1 is not accepted; accepted: True or False"):
        guidekit.APG(per_frame=1)
    x = torch.randn(1, 4, 2, 3, 3)
    for dims in [(0, 1), (), (5,), "13"]:
        with pytest.raises(ValueError, match=r"norm_dims: .* is not accepted .*accepted: None"):
            apg_step(x, x + 1, 5.0, norm_dims=dims)
    with pytest.raises(ValueError, match=r"running: shape \(1, 4, 3, 3, 3\) is not accepted"):
        apg_step(x, x + 1, 5.0, running=torch.zeros(1, 4, 3, 3, 3))


class RecordingAPG(guidekit.APG):
    """APG that records the shape of the predictions it guides."""

    shapes = []

    def guide(self, state, pred_cond, pred_uncond):
        self.shapes.append(tuple(pred_cond.shape))
        return super().guide(state, pred_cond, pred_uncond)


def test_animatediff_predictions_have_frames_on_dim_2(tmp_path):
    # per_frame reads frames from dim 2: AnimateDiff's latents are (B, C, F, H, W). On a real call the two
    # options give different videos.
    from animatediff_calls import load, video
    from guidekit.pipelines import GuidedAnimateDiffPipeline
    from guidekit.testing.animatediff import make_tiny_animatediff

    pipe = load(GuidedAnimateDiffPipeline, make_tiny_animatediff(tmp_path / "tiny"))
    outs = {}
    for per_frame in (True, False):
        hook = RecordingAPG(norm_threshold=0.5, per_frame=per_frame)
        hook.shapes = []
        outs[per_frame] = video(pipe, 6, guidance_scale=9.0, hooks=[hook])
        assert hook.shapes and all(len(s) == 5 and s[2] == 6 for s in hook.shapes)
    assert (outs[True] - outs[False]).abs().max() > 1e-4
