"""UAM pipelines (SD 1.x and SDXL) on tiny random components: API, consistency, restoration, bad input."""

import math

import numpy as np
import PIL.Image
import pytest
import torch

from guidekit.attention import UniformCrossAttnProcessor
from guidekit.guidance import APG
from guidekit.hooks import SamplerHook
from guidekit.pipelines import UAMStableDiffusionPipeline, UAMStableDiffusionXLPipeline

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def sd(tiny_sd_dir):
    pipe = UAMStableDiffusionPipeline.from_pretrained(tiny_sd_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def image():
    return torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _same_processors(pipe, before):
    now = pipe.unet.attn_processors
    return set(now) == set(before) and all(now[k] is v for k, v in before.items())


def test_invert_returns_latents_and_whole_trajectory(sd, image):
    inv = sd.invert(image, num_inference_steps=3)
    assert inv.latents.shape == (1, 4, 16, 16)
    assert len(inv.trajectory) == 4 and torch.equal(inv.trajectory[-1], inv.latents)
    z0 = sd.vae.encode(image * 2 - 1).latent_dist.mean * sd.vae.config.scaling_factor
    assert torch.allclose(inv.trajectory[0], z0, atol=1e-6)
    assert inv.timesteps == [int(t) for t in sd._uam_scheduler(3).timesteps]
    plain = sd.invert(image, prompt="a red circle", guidance_scale=7.5, uniform=False, num_inference_steps=3)
    assert not torch.allclose(plain.latents, inv.latents, atol=1e-4)


def test_reconstruct_metrics(sd, image):
    rec = sd.reconstruct(image, num_inference_steps=3, output_type="pt")
    assert rec.images.shape == (1, 3, 32, 32)
    (m,) = rec.metrics
    assert {"psnr", "ssim", "mse"} <= set(m)
    mse = float(((rec.images.double() - image.double()) ** 2).mean())
    assert math.isclose(m["mse"], mse, rel_tol=1e-5)
    assert math.isclose(m["psnr"], 10 * math.log10(1 / mse), rel_tol=1e-4)
    assert -1 <= m["ssim"] <= 1
    if "lpips" not in m:
        assert rec.notes and "LPIPS" in rec.notes[0]
    pil = sd.reconstruct(image, num_inference_steps=2).images
    assert isinstance(pil[0], PIL.Image.Image)


def test_edit_outputs_and_restores_processors(sd, image):
    before = dict(sd.unet.attn_processors)
    out = sd.edit(image, "a red circle", "a blue circle", num_inference_steps=4, start_step=1, recon_t=1000, output_type="np")
    assert out.images.shape == (1, 32, 32, 3) and out.source_images.shape == (1, 32, 32, 3)
    assert out.masks.shape == (1, 32, 32) and 0 <= out.masks.min() and out.masks.max() <= 1
    assert _same_processors(sd, before)
    plain = sd.edit(image, "a red circle", "a blue circle", num_inference_steps=4, start_step=1, adaptive_mask=False, output_type="np")
    assert plain.masks is None

    class Explode(SamplerHook):
        def step_end(self, state):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        sd.edit(image, "a red circle", "a blue circle", num_inference_steps=3, start_step=0, hooks=[Explode()])
    assert _same_processors(sd, before)


def test_edit_keeps_users_own_processors(sd, image):
    from guidekit.attention import attention_layers

    mine = {n: UniformCrossAttnProcessor() for n in attention_layers(sd.unet, "cross")}
    original = dict(sd.unet.attn_processors)
    sd.unet.set_attn_processor({**original, **mine})
    try:
        before = dict(sd.unet.attn_processors)
        sd.edit(image, "a", "b", num_inference_steps=2, start_step=0, output_type="pt")
        assert _same_processors(sd, before)
    finally:
        sd.unet.set_attn_processor(original)


def test_null_source_branch_retraces_null_prompt_reconstruction(sd, image):
    # source_conditioning="null": the source branch predicts u + w (u − u) = u, reads its own keys/values
    # under MasaCtrl and, without the mask, is exactly a null-prompt DDIM reconstruction at w = 1
    out = sd.edit(image, "a red circle", "a blue circle", num_inference_steps=3, start_step=0, adaptive_mask=False, output_type="pt")
    rec = sd.reconstruct(image, prompt="", guidance_scale=1.0, uniform=False, num_inference_steps=3, output_type="pt")
    assert torch.allclose(out.source_images, rec.images, atol=1e-4)


def test_apg_composes_in_guidance_slot(sd, image):
    kw = dict(num_inference_steps=3, start_step=0, recon_t=1000, output_type="pt")
    cfg = sd.edit(image, "a red circle", "a blue circle", guidance_scale=7.5, **kw).images
    # APG with eta=1, no rescaling and no momentum is CFG (Sadat et al., Alg. 1)
    same = sd.edit(image, "a red circle", "a blue circle", hooks=[APG(7.5, eta=1.0, norm_threshold=None, momentum=0.0)], **kw).images
    assert torch.allclose(cfg, same, atol=1e-4)
    apg = sd.edit(image, "a red circle", "a blue circle", hooks=[APG(7.5, norm_threshold=0.5)], **kw).images
    assert not torch.allclose(cfg, apg, atol=1e-4)


def test_v_prediction_and_from_pipe(tiny_sd_v_dir, image):
    from diffusers import StableDiffusionPipeline

    stock = StableDiffusionPipeline.from_pretrained(tiny_sd_v_dir)
    pipe = UAMStableDiffusionPipeline.from_pipe(stock)
    pipe.set_progress_bar_config(disable=True)
    assert pipe._prediction_type == "v_prediction"
    rec = pipe.reconstruct(image, num_inference_steps=2, output_type="pt")
    assert np.isfinite(rec.metrics[0]["psnr"])
    out = pipe.edit(image, "a", "b", num_inference_steps=2, start_step=0, recon_t=1000, output_type="pt")
    assert torch.isfinite(out.images).all()


def test_sdxl_reconstruct_and_edit(tiny_sdxl_dir):
    pipe = UAMStableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    pipe.set_progress_bar_config(disable=True)
    before = dict(pipe.unet.attn_processors)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    rec = pipe.reconstruct(images, num_inference_steps=2, output_type="pt")
    assert len(rec.metrics) == 2
    out = pipe.edit(images, ["a red circle", "a cat"], ["a blue circle", "a dog"], num_inference_steps=3, start_step=0, recon_t=1000, output_type="np")
    assert out.images.shape == (2, 32, 32, 3) and out.masks.shape == (2, 32, 32)
    assert _same_processors(pipe, before)
    assert pipe._default_start_layer() == 3  # tiny UNet: 4 self-attention layers


def test_default_start_layer_rule(sd):
    # SD 1.x (16 self-attention layers) -> 10 (the paper), SDXL (70) -> 64, others round(n * 10 / 16)
    from guidekit.attention import attention_layers

    n = len(attention_layers(sd.unet, "self"))
    assert n == 4 and sd._default_start_layer() == 3  # 4 * 10 / 16 = 2.5, rounded up
    assert sd.masactrl_start_layers == {16: 10, 70: 64}


# ---------------------------------------------------------------------------- bad input


def test_size_not_divisible_by_vae_factor(sd):
    with pytest.raises(ValueError, match="image: size 33x32 is not divisible by the VAE factor 2"):
        sd.invert(torch.rand(1, 3, 32, 33), num_inference_steps=1)


@pytest.mark.parametrize(
    "bad,match",
    [
        (PIL.Image.new("L", (32, 32)), "PIL mode 'L'"),
        (PIL.Image.new("RGBA", (32, 32)), "PIL mode 'RGBA'"),
        (np.zeros((32, 32), dtype=np.uint8), "array of shape"),
        (torch.rand(1, 1, 32, 32), "tensor of shape"),
        ([], "empty list"),
        (np.zeros((0, 32, 3), dtype=np.uint8), "empty image"),
        (torch.rand(1, 3, 32, 32) * 3, "outside \\[0, 1\\]"),
    ],
)
def test_non_rgb_or_empty_image(sd, bad, match):
    with pytest.raises(ValueError, match="image: .*" + match if not match.startswith("image") else match):
        sd.reconstruct(bad, num_inference_steps=1)


def test_prompt_lists_of_different_length(sd, image):
    with pytest.raises(ValueError, match="source_prompt/target_prompt: 2 and 3 prompts"):
        sd.edit(image, ["a", "b"], ["c", "d", "e"], num_inference_steps=2, start_step=0)


@pytest.mark.parametrize("q", [0.0, 1.0, 1.2, -0.5])
def test_quantile_outside_open_interval(sd, image, q):
    with pytest.raises(ValueError, match="quantile: .* accepted: a number in the open interval \\(0, 1\\)"):
        sd.edit(image, "a", "b", num_inference_steps=2, start_step=0, quantile=q)


def test_default_start_step_fits_few_steps(sd, image):
    # the default start_step is MasaCtrl's 4, clamped to num_inference_steps (then mutual self-attention is off)
    kw = dict(num_inference_steps=3, recon_t=1000, output_type="pt")
    default = sd.edit(image, "a red circle", "a blue circle", **kw)
    explicit = sd.edit(image, "a red circle", "a blue circle", start_step=3, **kw)
    assert torch.equal(default.images, explicit.images)
    assert torch.isfinite(sd.edit(image, "a", "b", num_inference_steps=1, output_type="pt").images).all()


def test_start_step_beyond_steps(sd, image):
    # a start_step the caller passed is checked, not clamped
    with pytest.raises(ValueError, match="start_step: 4 is not accepted with num_inference_steps=3; accepted: an integer in \\[0, 3\\]"):
        sd.edit(image, "a", "b", num_inference_steps=3, start_step=4)
    with pytest.raises(ValueError, match="start_layer: 99"):
        sd.edit(image, "a", "b", num_inference_steps=3, start_step=0, start_layer=99)
    with pytest.raises(ValueError, match="num_inference_steps: 0"):
        sd.invert(image, num_inference_steps=0)
    with pytest.raises(ValueError, match="threshold_rule"):
        sd.edit(image, "a", "b", num_inference_steps=3, start_step=0, threshold_rule="half")


def test_epsilon_model_on_zero_terminal_snr_schedule(sd, image):
    from diffusers import DDIMScheduler

    original = sd.scheduler
    sd.scheduler = DDIMScheduler.from_config(original.config, rescale_betas_zero_snr=True, timestep_spacing="trailing")
    try:
        with pytest.raises(ValueError, match="prediction_type: 'epsilon' cannot be inverted at timestep 999, where ᾱ_t = 0"):
            sd.reconstruct(image, num_inference_steps=2)
    finally:
        sd.scheduler = original


# ---------------------------------------------------------------------------- VAE latent statistics


LATENTS_MEAN = (0.3, -0.2, 0.1, 0.05)  # a per-channel normalisation as in Playground v2.5's VAE config
LATENTS_STD = (0.5, 2.0, 1.5, 0.8)


@pytest.fixture(scope="module")
def sdxl_with_latent_stats(tiny_sdxl_dir):
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline

    vae = AutoencoderKL.from_pretrained(tiny_sdxl_dir, subfolder="vae", latents_mean=LATENTS_MEAN, latents_std=LATENTS_STD)
    assert list(vae.config.latents_mean) == list(LATENTS_MEAN)
    stock = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir, vae=vae)
    stock.set_progress_bar_config(disable=True)
    pipe = UAMStableDiffusionXLPipeline.from_pipe(stock)
    pipe.set_progress_bar_config(disable=True)
    return stock, pipe


def test_sdxl_decode_applies_latent_stats_like_stock(sdxl_with_latent_stats):
    # stock SDXL's own decode path: the same seed with output_type="latent" and "pt"
    stock, pipe = sdxl_with_latent_stats
    kw = dict(prompt="a red circle", num_inference_steps=1, height=32, width=32)
    latents = stock(**kw, generator=torch.Generator().manual_seed(0), output_type="latent").images
    decoded = stock(**kw, generator=torch.Generator().manual_seed(0), output_type="pt").images
    with torch.no_grad():
        ours = pipe._decode_latents(latents)
    assert torch.allclose(ours, decoded, atol=1e-5)


def test_sdxl_encode_applies_latent_stats_like_stock_img2img(sdxl_with_latent_stats, monkeypatch, image):
    # stock SDXL img2img's encode path (its prepare_latents without noise), taking the posterior mean as UAM does
    import diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_img2img as img2img_module
    from diffusers import StableDiffusionXLImg2ImgPipeline

    _, pipe = sdxl_with_latent_stats
    real = img2img_module.retrieve_latents
    monkeypatch.setattr(img2img_module, "retrieve_latents", lambda out, generator=None: real(out, sample_mode="argmax"))
    img2img = StableDiffusionXLImg2ImgPipeline.from_pipe(pipe)
    with torch.no_grad():
        stock_z = img2img.prepare_latents(image * 2 - 1, None, 1, 1, torch.float32, torch.device("cpu"), add_noise=False)
        z = pipe._encode_image(image)
        raw = pipe.vae.encode(image * 2 - 1).latent_dist.mean
        round_trip, raw_decoded = pipe._decode_latents(z), (pipe.vae.decode(raw).sample / 2 + 0.5).clamp(0, 1)
    assert torch.allclose(z, stock_z, atol=1e-6)
    # and the normalisation is really there: the raw posterior mean is shifted and rescaled per channel
    assert not torch.allclose(z, raw * pipe.vae.config.scaling_factor, atol=1e-3)
    # encode -> decode undoes the normalisation: the same image as decoding the raw latents
    assert torch.allclose(round_trip, raw_decoded, atol=1e-5)
