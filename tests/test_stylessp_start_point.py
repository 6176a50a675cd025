"""`StyleSSP.start_point` on stock diffusers pipelines (tiny random SD and SDXL components loaded with
`from_pretrained`): the start point against an independent computation from the equations (VAE encode, a
hand-written DDIM inversion with ε(c⁻) + w_inv·(ε(c⁺) − ε(c⁻)), then `frequency_start_point`), SDXL's VAE
statistics and upcast, batches, determinism, sampling from it (text-to-image, ControlNet, IP-Adapter), the
deprecated `negative_guidance`, errors."""

import copy
import os

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import (
    ControlNetModel,
    DDIMScheduler,
    EulerDiscreteScheduler,
    StableDiffusionControlNetPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLImg2ImgPipeline,
    UNet2DConditionModel,
)
from safetensors.torch import save_file

from guidekit import StyleSSP
from guidekit.latents import frequency_start_point
from guidekit.testing import tiny_sd_pipeline, tiny_sdxl_pipeline

from tolerance import assert_close_to_scale

torch.set_num_threads(1)

STEPS = 3
SIZE = 32  # pixels; the tiny VAE's factor is 2, so latents are 16 x 16
POSITIVE, NEGATIVE = "a red square", "a blue circle"


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def sd(tiny_sd_dir):
    return tiny_sd_pipeline(tiny_sd_dir)


@pytest.fixture(scope="module")
def sdxl(tiny_sdxl_dir):
    return tiny_sdxl_pipeline(tiny_sdxl_dir)


@pytest.fixture(scope="module")
def image():
    return torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))


class _Counter:
    """UNet calls and rows, and VAE encodes, of one pipeline."""

    def __init__(self, pipe):
        self.calls, self.rows, self.encodes = 0, 0, 0
        self.handles = [
            pipe.unet.register_forward_pre_hook(self._unet, with_kwargs=True),
            pipe.vae.encoder.register_forward_pre_hook(self._vae),
        ]

    def _unet(self, module, args, kwargs):
        self.calls += 1
        self.rows += (args[0] if args else kwargs["sample"]).shape[0]

    def _vae(self, module, args):
        self.encodes += 1

    def remove(self):
        for h in self.handles:
            h.remove()


@pytest.fixture
def counter(sd):
    c = _Counter(sd)
    yield c
    c.remove()


# ---------------------------------------------------------------------------- the reference, from the equations


def _tokens(tokenizer, prompt):
    return tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def _condition(pipe, prompt, height, width):
    """(encoder_hidden_states, added_cond_kwargs) of one prompt, written out: SD takes the CLIP encoder's last
    hidden state; SDXL both encoders' penultimate states side by side, the second one's pooled projection and
    the time ids (original size, crop (0, 0), target size)."""
    if getattr(pipe, "text_encoder_2", None) is None:
        return pipe.text_encoder(_tokens(pipe.tokenizer, prompt))[0], None
    first = pipe.text_encoder(_tokens(pipe.tokenizer, prompt), output_hidden_states=True)
    second = pipe.text_encoder_2(_tokens(pipe.tokenizer_2, prompt), output_hidden_states=True)
    states = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
    time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=states.dtype)
    return states, {"text_embeds": second.text_embeds, "time_ids": time_ids}


def _encode(vae, image01):
    """z_0 = (E(x) − mean) · scaling / std with the VAE's latent statistics, else E(x) · scaling (posterior mean)."""
    vae = copy.deepcopy(vae).float()  # what an upcast VAE computes
    z = vae.encode(image01 * 2 - 1).latent_dist.mean
    mean, std = vae.config.get("latents_mean"), vae.config.get("latents_std")
    if mean is not None and std is not None:
        mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in (mean, std))
        return (z - mean) * vae.config.scaling_factor / std
    return z * vae.config.scaling_factor


def _invert(pipe, z0, prompts, scale, steps=STEPS):
    """DDIM inversion (η = 0) in float64: at each step from level ᾱ_p up to ᾱ_t (timestep t),
    ε̃ = ε(c⁻) + w·(ε(c⁺) − ε(c⁻)) (or ε(c⁺) alone when `scale` is None), x̂0 = (x − √(1−ᾱ_p)·ε̃) / √ᾱ_p,
    x ← √ᾱ_t·x̂0 + √(1−ᾱ_t)·ε̃."""
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(steps)
    alpha_bar = scheduler.alphas_cumprod.double()
    stride = scheduler.config.num_train_timesteps // steps
    height, width = (s * pipe.vae_scale_factor for s in z0.shape[-2:])
    conds = [_condition(pipe, p, height, width) for p in prompts]
    x = z0.double()
    for t in reversed([int(t) for t in scheduler.timesteps]):
        ab_t = alpha_bar[t]
        ab_p = alpha_bar[t - stride] if t - stride >= 0 else torch.tensor(float(scheduler.final_alpha_cumprod)).double()
        eps = []
        for states, added in conds:
            rows = x.shape[0]
            added = None if added is None else {k: v.repeat(rows, 1) for k, v in added.items()}
            eps.append(pipe.unet(x.float(), t, encoder_hidden_states=states.repeat(rows, 1, 1),
                                 added_cond_kwargs=added).sample.double())
        guided = eps[0] if scale is None else eps[1] + scale * (eps[0] - eps[1])
        x0 = (x - (1 - ab_p).sqrt() * guided) / ab_p.sqrt()
        x = ab_t.sqrt() * x0 + (1 - ab_t).sqrt() * guided
    return x


def _noise(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _start(pipe, image, hook=None, seed=3, **kwargs):
    hook = hook or StyleSSP()
    kwargs = {"prompt": POSITIVE, "style_prompt": NEGATIVE, "num_inference_steps": STEPS,
              "generator": torch.Generator().manual_seed(seed), **kwargs}
    return hook.start_point(pipe, image, **kwargs)


# ---------------------------------------------------------------------------- the start point


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_start_point_matches_the_equations(family, request, image):
    pipe = request.getfixturevalue(family)
    z = _start(pipe, image)
    with torch.no_grad():
        z0 = _encode(pipe.vae, image)
        guided = _invert(pipe, z0, [POSITIVE, NEGATIVE], 1.5)
        swapped = _invert(pipe, z0, [NEGATIVE, POSITIVE], 1.5)  # c⁺ and c⁻ exchanged: what a sign error gives
        plain = _invert(pipe, z0, [POSITIVE], None)
    assert z.shape == (1, 4, SIZE // 2, SIZE // 2) and z.dtype == pipe.unet.dtype
    expected = frequency_start_point(guided, _noise(guided.shape, 3))
    assert_close_to_scale(z.double(), expected, rel=1e-4)
    # the check can fail: the swapped guidance, the plain inversion and the unfiltered latent are all far
    for other in (frequency_start_point(swapped, _noise(guided.shape, 3)), frequency_start_point(plain, _noise(guided.shape, 3)), guided):
        assert float((z.double() - other).abs().max()) > 100 * 1e-4 * float(expected.abs().max())

    # the parts alone: the inverted latent without the frequency step, and the plain inversion
    unfiltered = _start(pipe, image, StyleSSP(frequency=False))
    assert_close_to_scale(unfiltered.double(), guided, rel=1e-4)
    off = _start(pipe, image, StyleSSP(negative_inversion=False, frequency=False), style_prompt=None)
    assert_close_to_scale(off.double(), plain, rel=1e-4)
    # another w_inv and the hook's other frequency settings reach the computation
    params = dict(alpha=0.4, d_s=0.5, d_t=0.7, d_l=0.6, range_over="batch")
    z = _start(pipe, image, StyleSSP(inversion_guidance_scale=3.0, **params))
    with torch.no_grad():
        far = _invert(pipe, z0, [POSITIVE, NEGATIVE], 3.0)
    assert_close_to_scale(z.double(), frequency_start_point(far, _noise(far.shape, 3), **params), rel=1e-4)


def test_sdxl_vae_latent_statistics_and_upcast(tiny_sdxl_dir, image):
    pipe = tiny_sdxl_pipeline(tiny_sdxl_dir)  # its own copy: the VAE is changed below
    mean, std = [0.5, -0.25, 0.1, 0.0], [2.0, 0.5, 1.5, 1.0]
    pipe.vae.register_to_config(latents_mean=mean, latents_std=std, force_upcast=True)
    pipe.vae.half()
    hook = StyleSSP(negative_inversion=False, frequency=False)
    z = _start(pipe, image, hook, style_prompt=None)
    assert pipe.vae.dtype == torch.float16  # put back after the float32 encode
    with torch.no_grad():
        expected = _invert(pipe, _encode(pipe.vae, image), [POSITIVE], None)
        pipe.vae.register_to_config(latents_mean=None, latents_std=None)
        without = _invert(pipe, _encode(pipe.vae, image), [POSITIVE], None)
    assert_close_to_scale(z.double(), expected, rel=1e-4)
    assert float((z.double() - without).abs().max()) > 1e-2  # the statistics were applied


def test_negative_inversion_costs_one_call_of_two_rows_per_step(sd, image, counter):
    _start(sd, image)
    assert (counter.calls, counter.rows, counter.encodes) == (STEPS, 2 * STEPS, 1)
    _start(sd, torch.cat([image, image.flip(-1)]), generator=None)
    assert (counter.calls, counter.rows) == (2 * STEPS, 2 * STEPS + 4 * STEPS)
    _start(sd, image, StyleSSP(negative_inversion=False), style_prompt=None)
    assert (counter.calls, counter.rows) == (3 * STEPS, 7 * STEPS)


def test_determinism_batches_and_alpha_one(sd, image):
    a, b = _start(sd, image, seed=5), _start(sd, image, seed=5)
    assert torch.equal(a, b)
    assert not torch.allclose(a, _start(sd, image, seed=6), atol=1e-3)
    # a list of generators: one per image, so an image's start point does not depend on its batch
    pair = torch.cat([image, image.flip(-1)])
    gens = lambda *seeds: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    hook = StyleSSP()
    batch = hook.start_point(sd, pair, prompt=POSITIVE, style_prompt=NEGATIVE, num_inference_steps=STEPS,
                             generator=gens(5, 7))
    assert_close_to_scale(batch[:1], a, rel=1e-5)
    alone = hook.start_point(sd, pair[1:], prompt=POSITIVE, style_prompt=NEGATIVE, num_inference_steps=STEPS,
                             generator=gens(7))
    assert_close_to_scale(batch[1:], alone, rel=1e-5)
    # α = 1 leaves the inverted latent exactly as it is, as frequency=False does
    assert torch.equal(_start(sd, image, StyleSSP(alpha=1.0)), _start(sd, image, StyleSSP(frequency=False)))


def test_image_inputs(sd, image):
    """PIL, numpy uint8 and torch give the same start point (the inputs `pipelines/images.py` accepts)."""
    array = (image[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    pil = PIL.Image.fromarray(array)
    hook = StyleSSP(frequency=False)
    ref = _start(sd, torch.from_numpy(array).permute(2, 0, 1).float() / 255, hook)
    for value in (pil, array, [pil], array[None]):
        assert torch.equal(_start(sd, value, hook), ref)


# ---------------------------------------------------------------------------- sampling from it


class _FirstInput:
    """The UNet's first input sample in a call."""

    def __init__(self, unet):
        self.sample = None
        self.handle = unet.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        if self.sample is None:
            self.sample = (args[0] if args else kwargs["sample"]).clone()


def _ddim(pipe):
    """`pipe` with a DDIM scheduler built from its own config, sharing its modules."""
    return type(pipe)(**{**pipe.components, "scheduler": DDIMScheduler.from_config(pipe.scheduler.config)})


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_pipeline_samples_from_the_start_point(family, request, image):
    pipe = _ddim(request.getfixturevalue(family))
    z = _start(pipe, image)
    first = _FirstInput(pipe.unet)
    try:
        out = pipe(POSITIVE, latents=z, num_inference_steps=STEPS, height=SIZE, width=SIZE, guidance_scale=5.0,
                   output_type="pt")
    finally:
        first.handle.remove()
    assert out.images.shape == (1, 3, SIZE, SIZE) and bool(torch.isfinite(out.images).all())
    # DDIM's init_noise_sigma is 1: the first step sees z itself (both CFG rows)
    assert torch.equal(first.sample, torch.cat([z, z]))


def test_controlnet_pipeline(sd, image):
    """The inversion runs without the ControlNet, so the start point is the plain pipeline's; sampling runs."""
    controlnet = ControlNetModel.from_unet(sd.unet, conditioning_embedding_out_channels=(16, 32))
    pipe = StableDiffusionControlNetPipeline(**{**_ddim(sd).components, "controlnet": controlnet},
                                             requires_safety_checker=False)
    z = _start(pipe, image)
    assert torch.equal(z, _start(sd, image))
    out = pipe(POSITIVE, image=image, latents=z, num_inference_steps=STEPS, height=SIZE, width=SIZE, output_type="pt")
    assert out.images.shape == (1, 3, SIZE, SIZE)


def _tiny_ip_adapter(unet, folder):
    """A random IP-Adapter file for `unet` (8-dim image embeddings, 4 tokens), as `load_ip_adapter` reads it."""
    dim = unet.config.cross_attention_dim
    weights = {"image_proj.proj.weight": torch.randn(4 * dim, 8), "image_proj.proj.bias": torch.zeros(4 * dim),
               "image_proj.norm.weight": torch.ones(dim), "image_proj.norm.bias": torch.zeros(dim)}
    for i, (name, proc) in enumerate(unet.attn_processors.items()):
        if name.endswith("attn2.processor"):
            hidden = unet.get_submodule(name[: -len(".processor")]).to_q.out_features
            weights[f"ip_adapter.{i}.to_k_ip.weight"] = torch.randn(hidden, dim)
            weights[f"ip_adapter.{i}.to_v_ip.weight"] = torch.randn(hidden, dim)
    save_file(weights, os.path.join(folder, "ip.safetensors"))


def test_ip_adapter_start_point_first_then_load(tiny_sd_dir, image, tmp_path):
    pipe = _ddim(tiny_sd_pipeline(tiny_sd_dir))  # its own copy: an adapter is loaded into its UNet
    _tiny_ip_adapter(pipe.unet, tmp_path)
    z = _start(pipe, image)
    pipe.load_ip_adapter(str(tmp_path), subfolder="", weight_name="ip.safetensors", image_encoder_folder=None)
    with pytest.raises(ValueError, match="IP-Adapter is loaded.*before pipe.load_ip_adapter"):
        _start(pipe, image)
    out = pipe(POSITIVE, latents=z, num_inference_steps=STEPS, height=SIZE, width=SIZE, output_type="pt",
               ip_adapter_image_embeds=[torch.randn(2, 1, 8, generator=torch.Generator().manual_seed(0))])
    assert out.images.shape == (1, 3, SIZE, SIZE)
    pipe.unload_ip_adapter()
    assert torch.equal(_start(pipe, image), z)


def test_sigma_scheduler_warns(sd, image):
    pipe = type(sd)(**{**sd.components, "scheduler": EulerDiscreteScheduler.from_config(sd.scheduler.config)})
    with pytest.warns(UserWarning, match="init_noise_sigma .*DDIMScheduler"):
        z = _start(pipe, image)
    assert torch.equal(z, _start(sd, image))  # the inversion is DDIM whatever the pipeline's scheduler


# ---------------------------------------------------------------------------- the hook's arguments


def test_parameter_names_and_deprecated_alias():
    hook = StyleSSP()
    assert (hook.d_s, hook.d_t, hook.alpha, hook.inversion_guidance_scale) == (0.3, 0.9, 0.7, 1.5)
    assert hook.frequency and hook.negative_inversion and hook.negative_inversion_scale == 0.5
    assert StyleSSP(negative_inversion=False).negative_inversion_scale == 0.0
    assert StyleSSP(inversion_guidance_scale=1.0).negative_inversion_scale == 0.0
    assert StyleSSP(inversion_guidance_scale=2.5).negative_inversion_scale == 1.5
    with pytest.raises(TypeError):
        StyleSSP(0.3)  # keyword-only
    with pytest.warns(FutureWarning, match="negative_guidance.*inversion_guidance_scale"):
        old = StyleSSP(negative_guidance=0.5)
    assert (old.inversion_guidance_scale, old.negative_inversion, old.negative_inversion_scale) == (1.5, True, 0.5)
    with pytest.warns(FutureWarning):
        off = StyleSSP(negative_guidance=0)
    assert not off.negative_inversion and off.negative_inversion_scale == 0.0
    for w in (1.5, 2.0):  # the default's value passed explicitly counts as given
        with pytest.warns(FutureWarning), pytest.raises(ValueError, match="negative_guidance.*inversion_guidance_scale"):
            StyleSSP(negative_guidance=0.5, inversion_guidance_scale=w)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(alpha=1.5), r"alpha: 1.5 is not accepted; accepted: a finite number in \[0.0, 1.0\]"),
        (dict(alpha=-0.1), "alpha"),
        (dict(alpha=float("nan")), "alpha: nan"),
        (dict(d_s=0), r"d_s: 0 is not accepted; accepted: a finite number in \(0.0, 1.0\]"),
        (dict(d_t=-0.9), "d_t"),
        (dict(d_l=float("inf")), "d_l"),
        (dict(inversion_guidance_scale=0.5), r"inversion_guidance_scale: 0.5 is not accepted; accepted: a finite number in \[1.0, inf\]"),
        (dict(inversion_guidance_scale=-1.5), "inversion_guidance_scale"),
        (dict(inversion_guidance_scale=float("nan")), "inversion_guidance_scale"),
        (dict(inversion_guidance_scale=float("inf")), "inversion_guidance_scale"),
        (dict(inversion_guidance_scale="1.5x"), "inversion_guidance_scale"),
        (dict(negative_inversion=1), "negative_inversion: 1 is not accepted; accepted: True or False"),
        (dict(frequency="yes"), "frequency"),
    ],
)
def test_hook_argument_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        StyleSSP(**kwargs)


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("value", [-0.5, float("nan"), float("inf")])
def test_deprecated_alias_errors(value):
    with pytest.raises(ValueError, match="negative_guidance"):
        StyleSSP(negative_guidance=value)


# ---------------------------------------------------------------------------- start_point's errors


def _unet(in_channels):
    return UNet2DConditionModel(block_out_channels=(16, 32), layers_per_block=1, sample_size=16,
                                in_channels=in_channels, out_channels=4, cross_attention_dim=32,
                                attention_head_dim=4, norm_num_groups=8,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))


def test_start_point_errors_before_any_model_call(sd, sdxl, image, counter):
    hook = StyleSSP()
    cases = [
        (dict(style_prompt=None), "style_prompt: None is not accepted with StyleSSP's negative-guided inversion"),
        (dict(style_prompt="  "), "style_prompt: '  '"),
        (dict(style_prompt=3), "style_prompt: 3"),
        (dict(content_image=None), "content_image: None is not accepted"),
        (dict(content_image="content.png"), "content_image: str is not accepted"),
        (dict(content_image=torch.rand(1, 3, 31, 32)), "content_image: size 32x31 is not divisible by the VAE factor 2"),
        (dict(content_image=torch.rand(1, 1, 32, 32)), "content_image: tensor of shape"),
        (dict(content_image=torch.rand(1, 3, 32, 32) * 2), r"content_image: tensor values outside \[0, 1\]"),
        (dict(content_image=[PIL.Image.new("RGB", (32, 32)), PIL.Image.new("RGB", (32, 40))]), "different sizes"),
        (dict(height=64), "height: 64 is not accepted for a content image of 32x32"),
        (dict(width=32.0), "width: 32.0"),
        (dict(prompt=["a", "b"]), "prompt: "),
        (dict(num_inference_steps=0), "num_inference_steps: 0"),
        (dict(generator=[torch.Generator(), torch.Generator()]), "generator: 2 generators for a batch of 1"),
        (dict(generator="seed"), "generator: 'seed'"),
        (dict(pipe=object()), "pipe: a object is not accepted; accepted: a diffusers Stable Diffusion"),
    ]
    for kwargs, match in cases:
        call = {"pipe": sd, "content_image": image, "prompt": POSITIVE, "style_prompt": NEGATIVE,
                "num_inference_steps": STEPS, **kwargs}
        with pytest.raises(ValueError, match=match):
            hook.start_point(call.pop("pipe"), call.pop("content_image"), **call)
    # pipelines whose UNet is not a plain SD/SDXL text-to-image one
    inpaint = StableDiffusionPipeline(**{**sd.components, "unet": _unet(9)}, requires_safety_checker=False)
    refiner = StableDiffusionXLImg2ImgPipeline(**sdxl.components, requires_aesthetics_score=True)
    no_text = StableDiffusionPipeline(**{**sd.components, "text_encoder": None}, requires_safety_checker=False)
    for pipe, match in ((inpaint, "9 input channels"), (refiner, "SDXL refiner"), (no_text, "without text_encoder")):
        with pytest.raises(ValueError, match=match):
            hook.start_point(pipe, image, style_prompt=NEGATIVE, num_inference_steps=STEPS)
    assert (counter.calls, counter.encodes) == (0, 0)


def test_half_precision_pipeline_inverts_in_float32(tiny_sd_dir, image):
    """In a bfloat16 pipeline the trajectory stays float32 (only the UNet's input is cast at each call): the
    start point is the float64 reference inversion with a bfloat16 UNet, rounded to bfloat16 once at the end."""
    pipe = tiny_sd_pipeline(tiny_sd_dir).to(torch.bfloat16)  # its own copy
    steps = 10
    z = _start(pipe, image, StyleSSP(negative_inversion=False, frequency=False), style_prompt=None, num_inference_steps=steps)
    assert z.dtype == torch.bfloat16
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(steps)
    alpha_bar = scheduler.alphas_cumprod.double()
    stride = scheduler.config.num_train_timesteps // steps
    states, _ = _condition(pipe, POSITIVE, SIZE, SIZE)
    with torch.no_grad():
        x = (pipe.vae.encode((image * 2 - 1).to(torch.bfloat16)).latent_dist.mean * pipe.vae.config.scaling_factor).double()
        for t in reversed([int(t) for t in scheduler.timesteps]):
            ab_t = alpha_bar[t]
            ab_p = alpha_bar[t - stride] if t - stride >= 0 else torch.tensor(float(scheduler.final_alpha_cumprod)).double()
            eps = pipe.unet(x.to(torch.bfloat16), t, encoder_hidden_states=states).sample.double()
            x = ab_t.sqrt() * (x - (1 - ab_p).sqrt() * eps) / ab_p.sqrt() + (1 - ab_t).sqrt() * eps
    scale = float(x.abs().max())
    # one bfloat16 rounding of the result (2^-9) plus the UNet's input rounding; a bfloat16 trajectory is ~0.03 off
    assert float((z.double() - x).abs().max()) <= 2 ** -7 * scale
