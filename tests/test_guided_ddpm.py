"""GuidedDDPMPipeline on a tiny random pixel UNet2DModel: stock equality (DDPM, DDIM), EluCD's mean shift by hand,
attach, and APG refused (the model is unconditional)."""

import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel

import guidekit
from guidekit.guidance import calibrated_log_prob, smooth_classifier
from guidekit.hooks import SamplerHook
from guidekit.pipelines import GuidedDDPMPipeline
from guidekit.testing import TinyReLUClassifier

KW = dict(num_inference_steps=4, output_type="np")


@pytest.fixture(scope="module")
def ddpm_dir(tmp_path_factory):
    """A tiny unconditional pixel checkpoint: 3 channels, 16×16 px, DDPMScheduler (clip_sample on, as default)."""
    folder = tmp_path_factory.mktemp("tiny-ddpm")
    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=16,
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    )
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=1000)).save_pretrained(folder)
    return folder


def load(cls, folder, scheduler=None):
    pipe = cls.from_pretrained(str(folder))
    if scheduler is not None:
        pipe.scheduler = scheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe, seed=0, batch_size=2, **kw):
    return pipe(batch_size=batch_size, generator=torch.Generator().manual_seed(seed), **{**KW, **kw}).images


TinyClassifier = TinyReLUClassifier  # a ReLU classifier on images in [-1, 1]


@pytest.mark.parametrize("scheduler", [None, DDIMScheduler], ids=["ddpm", "ddim"])
def test_stock_equality(ddpm_dir, scheduler):
    stock, guided = load(DDPMPipeline, ddpm_dir, scheduler), load(GuidedDDPMPipeline, ddpm_dir, scheduler)
    expected = run(stock)
    assert expected.shape == (2, 16, 16, 3)
    np.testing.assert_allclose(run(guided), expected, rtol=0, atol=1e-5)
    np.testing.assert_allclose(run(guided, hooks=[guidekit.CFG(guidance_scale=5.0)]), expected, rtol=0, atol=1e-5)
    zero = run(guided, hooks=[guidekit.EluCD(TinyClassifier(), "red", scale=0.0)])
    np.testing.assert_allclose(zero, expected, rtol=0, atol=1e-5)
    steered = run(guided, hooks=[guidekit.EluCD(TinyClassifier(), ["red", "blue"], scale=50.0)])
    assert np.isfinite(steered).all() and np.abs(steered - expected).max() > 1e-4
    pil = guided(generator=torch.Generator().manual_seed(1), num_inference_steps=2).images
    assert len(pil) == 1 and pil[0].size == (16, 16)


class Record(SamplerHook):
    def __init__(self):
        self.steps = []

    def correct(self, state, pred):
        self.steps.append((state.step_index, state.timestep, state.model_input.clone(), pred.clone()))
        return pred


@pytest.mark.parametrize("clip_sample", [False, True])
def test_elucd_moves_the_ddpm_mean_by_its_update(ddpm_dir, clip_sample):
    """Each step, EluCD's correction moves DDPMScheduler's posterior mean by u = (Σ_t + a_t)·s·g, with
    a_t = γ·max_var·sin(π·(N−1−i)/N) and g = ∇ of the calibrated log-probability of the smoothed classifier at
    x̂0 clipped to [-1, 1], re-derived here by hand. With ``clip_sample=False`` this holds exactly. With
    ``clip_sample=True`` (DDPMScheduler's default) the scheduler clips the corrected x̂0 as well, so the mean
    moves by c_t·(clip(x̂0 + u/c_t) − clip(x̂0)): u itself wherever neither is clipped."""
    pipe = load(GuidedDDPMPipeline, ddpm_dir)
    pipe.scheduler = DDPMScheduler.from_config(pipe.scheduler.config, clip_sample=clip_sample)
    scale, gamma, n = 20.0, 0.3, 4
    before, after = Record(), Record()
    hooks = [before, guidekit.EluCD(TinyClassifier(), ["red", "blue"], scale=scale, gamma=gamma), after]
    run(pipe, num_inference_steps=n, hooks=hooks)
    sched = pipe.scheduler
    clf = smooth_classifier(TinyClassifier(), 3.0).double()
    labels = torch.tensor([0, 2])
    max_var = 0.0
    checked = 0
    for (i, t, x_t, eps), (_, _, _, eps_elucd) in zip(before.steps, after.steps):
        t = int(t)
        prev = int(sched.previous_timestep(t))
        a_bar = float(sched.alphas_cumprod[t])
        a_prev = float(sched.alphas_cumprod[prev]) if prev >= 0 else 1.0
        variance = (1 - a_prev) / (1 - a_bar) * (1 - a_bar / a_prev)
        max_var = max(max_var, variance)
        weight = variance + max(gamma * max_var * math.sin(math.pi * (n - 1 - i) / n), 0.0)
        x0 = ((x_t.double() - math.sqrt(1 - a_bar) * eps.double()) / math.sqrt(a_bar)).clamp(-1, 1)
        x0.requires_grad_(True)
        with torch.enable_grad():
            calibrated_log_prob(clf(x0), labels, 1.0, 0.5).sum().backward()
        u = scale * weight * x0.grad
        c_t = math.sqrt(a_prev) * (1 - a_bar / a_prev) / (1 - a_bar)

        def mean(pred):  # the step's posterior mean: the same noise draw for both, which cancels
            return sched.step(pred, t, x_t, generator=torch.Generator().manual_seed(5)).prev_sample.double()

        moved = mean(eps_elucd) - mean(eps)
        if i < n - 1:  # the last step steps to ᾱ = 1: Σ_t = 0 and sin(0) = 0, so no shift there
            assert u.abs().max() > 1e-3  # the test is not vacuous
        if not clip_sample:
            torch.testing.assert_close(moved, u, rtol=1e-4, atol=1e-5)
        else:
            x0_raw = (x_t.double() - math.sqrt(1 - a_bar) * eps.double()) / math.sqrt(a_bar)
            expected = c_t * ((x0_raw + u / c_t).clamp(-1, 1) - x0_raw.clamp(-1, 1))
            torch.testing.assert_close(moved, expected, rtol=1e-4, atol=1e-5)
            free = (x0_raw.abs() < 1) & ((x0_raw + u / c_t).abs() < 1)
            if free.any():
                torch.testing.assert_close(moved[free], u[free], rtol=1e-4, atol=1e-5)
        checked += 1
    assert checked == n


def test_attach_maps_ddpm_pipeline(ddpm_dir):
    stock = load(DDPMPipeline, ddpm_dir)
    elucd = guidekit.EluCD(TinyClassifier(), "green", scale=50.0)
    hooked = guidekit.attach(stock, elucd)
    assert type(hooked) is GuidedDDPMPipeline and type(stock) is DDPMPipeline
    assert hooked.unet is stock.unet and hooked.scheduler is not stock.scheduler
    hooked.set_progress_bar_config(disable=True)
    np.testing.assert_allclose(run(hooked), run(hooked, hooks=[elucd]), rtol=0, atol=1e-6)
    np.testing.assert_allclose(run(hooked, hooks=[]), run(stock), rtol=0, atol=1e-5)


def test_apg_is_refused(ddpm_dir):
    pipe = load(GuidedDDPMPipeline, ddpm_dir)
    with pytest.raises(ValueError, match="unconditional") as err:
        run(pipe, hooks=[guidekit.APG(), guidekit.EluCD(TinyClassifier(), "red")])
    assert "APG(" in str(err.value) and "guidekit.EluCD" in str(err.value)
    with pytest.raises(ValueError, match="unconditional"):
        guidekit.attach(load(DDPMPipeline, ddpm_dir), guidekit.APG())
