"""StyleSSP.start_point on flow-matching pipelines (SD3, Flux): the exact flow inversion of the encoded content through
the schedule the stock pipeline samples with, so that sampling from it with the content's caption returns the
content; the negative-guided velocity; the frequency step on the unpacked latent; the layout `latents=` takes."""

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline

import guidekit
from guidekit.latents.frequency import frequency_start_point
from guidekit.latents.stylessp import draw_noise
from guidekit.pipelines.stylessp_start_flow import _encode
from guidekit.testing.flow import make_tiny_sd3
from guidekit.testing.flux import make_tiny_flux

STEPS = 6


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    pipe = StableDiffusion3Pipeline.from_pretrained(str(make_tiny_sd3(tmp_path_factory.mktemp("sd3"))))
    pipe.set_progress_bar_config(disable=True)
    return pipe, dict(height=32, width=32)


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    pipe = FluxPipeline.from_pretrained(str(make_tiny_flux(tmp_path_factory.mktemp("flux"))))
    pipe.set_progress_bar_config(disable=True)
    return pipe, dict(height=16, width=16, max_sequence_length=48)


def content(size):
    g = torch.Generator().manual_seed(0)
    return torch.rand(1, 3, size, size, generator=g)


def sample(pipe, z, call, prompt="a red circle"):
    kw = dict(call)
    scale = {"true_cfg_scale": 1.0, "guidance_scale": 3.5} if isinstance(pipe, FluxPipeline) else {"guidance_scale": 1.0}
    return pipe(prompt, latents=z, num_inference_steps=STEPS, output_type="latent", **scale, **kw).images


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_sampling_from_the_plain_inversion_returns_the_content(name, request):
    pipe, call = request.getfixturevalue(name)
    image = content(call["height"])
    hook = guidekit.StyleSSP(frequency=False, negative_inversion=False)
    z = hook.start_point(pipe, image, prompt="a red circle", num_inference_steps=STEPS,
                         max_sequence_length=call.get("max_sequence_length"))
    with torch.no_grad():
        clean = _encode(pipe, image)
    if isinstance(pipe, FluxPipeline):
        tokens = (call["height"] // (2 * pipe.vae_scale_factor)) ** 2
        assert z.shape == (1, tokens, 4 * clean.shape[1])
        out = pipe._unpack_latents(sample(pipe, z, call), call["height"], call["width"], pipe.vae_scale_factor)
    else:
        assert z.shape == clean.shape
        out = sample(pipe, z, call)
    error = float((out - clean).abs().max())
    scale = float(clean.abs().max())
    assert error < 1e-4 * scale  # float32 sampling through an exact inverse (2 refinements: ~1e-3)


def test_the_negative_guided_velocity_changes_the_start_point(sd3):
    pipe, call = sd3
    image = content(32)
    plain = guidekit.StyleSSP(frequency=False, negative_inversion=False).start_point(
        pipe, image, prompt="a red circle", num_inference_steps=STEPS)
    guided = guidekit.StyleSSP(frequency=False, inversion_guidance_scale=1.5).start_point(
        pipe, image, prompt="a red circle", style_prompt="blue stripes", num_inference_steps=STEPS)
    same = guidekit.StyleSSP(frequency=False, inversion_guidance_scale=1.0).start_point(
        pipe, image, prompt="a red circle", style_prompt="blue stripes", num_inference_steps=STEPS)
    assert (guided - plain).abs().max() > 1e-3
    torch.testing.assert_close(same, plain, rtol=1e-5, atol=1e-5)  # w_inv = 1: v(c⁻) + 1·(v(c⁺) − v(c⁻)) = v(c⁺)


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_frequency_step_filters_the_unpacked_latent(name, request):
    pipe, call = request.getfixturevalue(name)
    image = content(call["height"])
    plain = guidekit.StyleSSP(frequency=False, negative_inversion=False).start_point(
        pipe, image, prompt="a red circle", num_inference_steps=STEPS)
    hook = guidekit.StyleSSP(negative_inversion=False)
    z = hook.start_point(pipe, image, prompt="a red circle", num_inference_steps=STEPS,
                         generator=torch.Generator().manual_seed(3))
    if isinstance(pipe, FluxPipeline):
        unpack = lambda t: pipe._unpack_latents(t, call["height"], call["width"], pipe.vae_scale_factor)  # noqa: E731
        plain, z = unpack(plain), unpack(z)
    noise = draw_noise(plain.shape, torch.Generator().manual_seed(3), plain.device)
    expected = frequency_start_point(plain.float(), noise, d_s=hook.d_s, d_t=hook.d_t, d_l=hook.d_l, alpha=hook.alpha,
                                     filter_type=hook.filter_type, range_over=hook.range_over)
    torch.testing.assert_close(z, expected, rtol=1e-5, atol=1e-5)


def test_the_start_point_goes_into_the_hooked_pipeline_too(sd3, tmp_path):
    pipe, call = sd3
    hooked = guidekit.attach(pipe, guidekit.APG())
    z = guidekit.StyleSSP(negative_inversion=False).start_point(pipe, content(32), prompt="a red circle",
                                                                num_inference_steps=STEPS)
    out = hooked("a red circle", latents=z, num_inference_steps=STEPS, guidance_scale=5.0, output_type="np", **call)
    assert np.isfinite(out.images).all()


def test_what_flow_pipelines_cannot_take_is_refused(sd3):
    pipe, _ = sd3
    with pytest.raises(ValueError, match="style_image: the image-embedding form is not supported on StableDiffusion3Pipeline"):
        guidekit.StyleSSP().start_point(pipe, content(32), prompt="x", style_image=content(32))
    with pytest.raises(ValueError, match="style_prompt"):
        guidekit.StyleSSP().start_point(pipe, content(32), prompt="x")
    with pytest.raises(ValueError, match="height: 64 differs"):
        guidekit.StyleSSP(negative_inversion=False).start_point(pipe, content(32), prompt="x", height=64)
    with pytest.raises(ValueError, match="num_inference_steps"):
        guidekit.StyleSSP(negative_inversion=False).start_point(pipe, content(32), prompt="x", num_inference_steps=0)
