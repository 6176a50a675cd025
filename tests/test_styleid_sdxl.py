"""StyleID on SDXL (tiny random SDXL components): the layer rule on SDXL's layout, the pipeline against a literal
re-derivation of StyleID with SDXL's conditioning written out (zero "" embeddings, pooled embeddings, time ids,
per-channel VAE latent statistics), the recorded features, StyleSSP's negative-guided inversion in one batched
UNet call, the style cache, from_pipe, the fp32 VAE upcast and input errors."""

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel

from guidekit.attention import StyleIDControl, attention_layers, replaced_processors, styleid_layers
from guidekit.guidance import APG
from guidekit.inversion import ddim_invert, ddim_levels, ddim_step
from guidekit.latents import StyleSSP, frequency_start_point
from guidekit.pipelines import StyleIDStableDiffusionXLPipeline
from guidekit.pipelines.styleid_sd import adain_latents
from test_styleid import _Counter, _ddim, _explicit, _LiteralStyleID, _Recorder, _same_processors

from tolerance import assert_close_to_scale

torch.set_num_threads(1)

STEPS = 3
ATTN1 = "transformer_blocks.{}.attn1.processor"
LATENTS_MEAN = (0.3, -0.2, 0.1, 0.05)  # per-channel statistics as in Playground v2.5's SDXL VAE config
LATENTS_STD = (0.5, 2.0, 1.5, 0.8)


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def pipe(tiny_sdxl_dir):
    p = StyleIDStableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def stats_pipe(tiny_sdxl_dir):
    """The same checkpoint with a VAE whose config sets latents_mean / latents_std."""
    vae = AutoencoderKL.from_pretrained(
        tiny_sdxl_dir, subfolder="vae", latents_mean=LATENTS_MEAN, latents_std=LATENTS_STD
    )
    p = StyleIDStableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir, vae=vae)
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(0)
    return tuple(torch.rand(1, 3, 32, 32, generator=g) for _ in range(3))


@pytest.fixture
def counter(pipe):
    c = _Counter(pipe.unet)
    yield c
    c.remove()


class _Batches:
    """The batch size of every UNet call while installed."""

    def __init__(self, unet):
        self.sizes = []
        self.handle = unet.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        self.sizes.append((args[0] if args else kwargs["sample"]).shape[0])


# ---------------------------------------------------------------------------- SDXL written out


def _null_rows(pipe, height, width):
    """Stock SDXL's unconditional input with `force_zeros_for_empty_prompt`: zero text and pooled embeddings,
    time ids (H, W, 0, 0, H, W) (original size, crop corner, target size)."""
    assert pipe.config.force_zeros_for_empty_prompt
    return {
        "encoder_hidden_states": torch.zeros(1, 77, pipe.unet.config.cross_attention_dim),
        "added_cond_kwargs": {
            "text_embeds": torch.zeros(1, pipe.text_encoder_2.config.projection_dim),
            "time_ids": torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32),
        },
    }


def _prompt_rows(pipe, prompt, height, width):
    """Stock SDXL's conditional input for `prompt` (its own encode_prompt)."""
    embeds, _, pooled, _ = StableDiffusionXLPipeline.encode_prompt(
        pipe, prompt, device="cpu", do_classifier_free_guidance=False
    )
    rows = _null_rows(pipe, height, width)
    rows["encoder_hidden_states"] = embeds
    rows["added_cond_kwargs"]["text_embeds"] = pooled
    return rows


def _eps(pipe, x, t, rows):
    return pipe.unet(x, t, encoder_hidden_states=rows["encoder_hidden_states"],
                     added_cond_kwargs=rows["added_cond_kwargs"]).sample


def _stats(pipe):
    cfg = pipe.vae.config
    if getattr(cfg, "latents_mean", None) is None:
        return torch.zeros(1, 4, 1, 1), torch.ones(1, 4, 1, 1)
    return torch.tensor(cfg.latents_mean).view(1, 4, 1, 1), torch.tensor(cfg.latents_std).view(1, 4, 1, 1)


def _encode(pipe, image):
    mean, std = _stats(pipe)
    return (pipe.vae.encode(image * 2 - 1).latent_dist.mean - mean) * pipe.vae.config.scaling_factor / std


def _decode(pipe, z):
    mean, std = _stats(pipe)
    return (pipe.vae.decode(z * std / pipe.vae.config.scaling_factor + mean).sample / 2 + 0.5).clamp(0, 1)


def _adain(z_c, z_s):
    mu_c, sd_c = z_c.mean(dim=(2, 3), keepdim=True), z_c.std(dim=(2, 3), keepdim=True)
    mu_s, sd_s = z_s.mean(dim=(2, 3), keepdim=True), z_s.std(dim=(2, 3), keepdim=True)
    return (z_c - mu_c) / sd_c * sd_s + mu_s


def _reference_transfer(pipe, content, style, gamma, temperature, steps):
    """StyleID on SDXL with the test's own processors and conditioning: invert both images with the empty
    prompt (recording Q/K/V), AdaIN of the content's z_T to the style's, DDIM sampling with the empty prompt and
    no CFG, injecting with the literal formula. Returns (image, start latent)."""
    state = {"mode": "off", "t": None, "gamma": gamma, "temperature": temperature}
    null = _null_rows(pipe, *content.shape[-2:])
    levels = ddim_levels(_ddim(pipe, steps))
    kind = pipe.scheduler.config.prediction_type

    def model(x, t):
        state["t"] = int(t)
        return _eps(pipe, x, t, null)

    def invert(image):
        state.update(mode="record", store={})
        return ddim_invert(model, _encode(pipe, image), levels, kind).latents, state["store"]

    procs = {n: _LiteralStyleID(n, state) for n in styleid_layers(pipe.unet)}
    with torch.no_grad(), replaced_processors(pipe.unet, procs):
        z_s, style_feats = invert(style)
        z_c, content_feats = invert(content)
        x = start = _adain(z_c, z_s)
        state.update(mode="inject", content=content_feats, style=style_feats)
        for i, t in enumerate(levels.timesteps):
            x = ddim_step(x, model(x, t), levels.alpha_bar[i], levels.alpha_bar_prev[i], kind)
        return _decode(pipe, x), start


def _plain_ddim(pipe, start, steps, height, width):
    """DDIM sampling (η = 0) from `start` with SDXL's empty-prompt input and the UNet's own attention, decoded."""
    null = _null_rows(pipe, height, width)
    levels = ddim_levels(_ddim(pipe, steps))
    x = start
    with torch.no_grad():
        for i, t in enumerate(levels.timesteps):
            x = ddim_step(x, _eps(pipe, x, t, null), levels.alpha_bar[i], levels.alpha_bar_prev[i], "epsilon")
        return _decode(pipe, x)


# ---------------------------------------------------------------------------- layers


SDXL_BASE_UNET = dict(  # stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (the layout-defining keys)
    addition_embed_type="text_time", addition_embed_type_num_heads=64, addition_time_embed_dim=256,
    attention_head_dim=[5, 10, 20], block_out_channels=[320, 640, 1280], cross_attention_dim=2048,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], layers_per_block=2,
    projection_class_embeddings_input_dim=2816, sample_size=128, transformer_layers_per_block=[1, 2, 10],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], use_linear_projection=True,
)


def test_layer_rule_on_sdxl_base_and_the_tiny_unet(pipe):
    with torch.device("meta"):  # SDXL base's layout without allocating its 2.6 B weights
        unet = UNet2DConditionModel(**SDXL_BASE_UNET)
    assert len(attention_layers(unet, "self")) == 70
    six = tuple(f"up_blocks.1.attentions.{a}.{ATTN1.format(b)}" for a in (0, 1, 2) for b in (0, 1))
    assert styleid_layers(unet) == six  # up_blocks.2 (full resolution) has no attention
    # the diffusers port leaves out the first decoder layer, a whole attention module: both its transformer blocks
    assert styleid_layers(unet, "diffusers") == six[2:]
    # the tiny SDXL UNet has two up blocks, only the first with attention
    tiny = tuple(f"up_blocks.0.attentions.{a}.{ATTN1.format(0)}" for a in (0, 1))
    assert styleid_layers(pipe.unet) == tiny
    assert attention_layers(pipe.unet, "self")[-2:] == list(tiny)


# ---------------------------------------------------------------------------- against StyleID's equations


def test_transfer_matches_literal_styleid_with_latent_stats(stats_pipe, images):
    content, style, _ = images
    out = stats_pipe.transfer(content, style, num_inference_steps=STEPS, gamma=0.6, temperature=1.7, output_type="pt")
    ref, start = _reference_transfer(stats_pipe, content, style, 0.6, 1.7, STEPS)
    assert out.images.shape == (1, 3, 32, 32) and out.layers == list(styleid_layers(stats_pipe.unet))
    assert_close_to_scale(out.start_latents, start, 1e-5)
    assert (out.images - ref).abs().max() < 1e-4
    # the parameters matter: another gamma gives another image
    other = stats_pipe.transfer(content, style, num_inference_steps=STEPS, gamma=0.1, temperature=1.7, output_type="pt")
    assert (other.images - out.images).abs().max() > 1e-3


def test_no_injection_gamma1_t1_is_plain_ddim_from_the_adain_start(pipe, images):
    content, style, _ = images
    out = pipe.transfer(content, style, num_inference_steps=STEPS, gamma=1.0, temperature=1.0, attn_injection=False,
                        output_type="pt")
    levels = ddim_levels(_ddim(pipe, STEPS))
    null = _null_rows(pipe, 32, 32)
    with torch.no_grad():
        z_c = ddim_invert(lambda x, t: _eps(pipe, x, t, null), _encode(pipe, content), levels, "epsilon").latents
        z_s = ddim_invert(lambda x, t: _eps(pipe, x, t, null), _encode(pipe, style), levels, "epsilon").latents
    assert_close_to_scale(out.start_latents, _adain(z_c, z_s), 1e-5)
    expected = _plain_ddim(pipe, out.start_latents, STEPS, 32, 32)
    assert (out.images - expected).abs().max() < 1e-5
    # with the injection on (same γ = 1, T = 1) the content's queries attend to the style's keys: another image
    injected = pipe.transfer(content, style, num_inference_steps=STEPS, gamma=1.0, temperature=1.0, output_type="pt")
    assert torch.equal(injected.start_latents, out.start_latents)
    assert (injected.images - out.images).abs().max() > 1e-3


def test_recorded_features_are_the_projections_the_attention_saw(pipe, images, monkeypatch):
    """The stores filled during the two inversions hold, per (layer, timestep), to_q / to_k / to_v of the
    tokens attn1 received in that UNet call, and the recording does not change the layer's output."""
    content, style, _ = images
    stores, seen, t_now = [], {}, {"calls": 0}
    record = StyleIDControl.record

    def keep_store(self, store, keys):
        stores.append((store, tuple(keys)))
        return record(self, store, keys)

    monkeypatch.setattr(StyleIDControl, "record", keep_store)
    layers = styleid_layers(pipe.unet)
    modules = {n: pipe.unet.get_submodule(n[: -len(".processor")]) for n in layers}

    def unet_call(module, args, kwargs):  # phase 0: the style's inversion, 1: the content's, 2: sampling
        t_now.update(t=int(args[1] if len(args) > 1 else kwargs["timestep"]), phase=t_now["calls"] // STEPS)
        t_now["calls"] += 1

    def attn_call(module, args, output, name):
        seen.setdefault(t_now["phase"], {})[(name, t_now["t"])] = (args[0], output)

    handles = [pipe.unet.register_forward_pre_hook(unet_call, with_kwargs=True)]
    for name, module in modules.items():
        handles.append(module.register_forward_hook(lambda m, a, out, name=name: attn_call(m, a, out, name)))
    try:
        pipe.transfer(content, style, num_inference_steps=STEPS, cache_style=False, output_type="pt")
    finally:
        for h in handles:
            h.remove()
    (style_store, style_keys), (content_store, content_keys) = stores
    assert (style_keys, content_keys) == (("k", "v"), ("q",))
    timesteps = [int(t) for t in _ddim(pipe, STEPS).timesteps]
    expected_keys = {(n, t) for n in layers for t in timesteps}
    assert set(style_store) == expected_keys and set(content_store) == expected_keys
    assert set(seen[0]) == expected_keys and set(seen[1]) == expected_keys
    for store, calls, keys in ((style_store, seen[0], "kv"), (content_store, seen[1], "q")):
        for (name, t), (x, output) in calls.items():
            attn = modules[name]
            for k in keys:
                assert torch.equal(store[(name, t)][k], getattr(attn, f"to_{k}")(x))
            # the layer's output while recording is its stock attention
            q, k, v = (getattr(attn, f"to_{p}")(x) for p in "qkv")
            assert_close_to_scale(output.double(), _explicit(attn, x, q, k, v, 1.0, 1.0), 1e-5)


# ---------------------------------------------------------------------------- StyleSSP, negative-guided inversion


def test_stylessp_runs_with_one_batched_call_per_guided_step(pipe, images):
    """StyleSSP's negative-guided inversion on SDXL: each step is one UNet call of 2 rows (c⁺, c⁻), equal to
    ε(c⁺) + s·(ε(c⁺) − ε(c⁻)) from two separate calls with stock SDXL's prompt embeddings; the start point
    is freq(AdaIN(z_T^{c,NG}, z_T^s))."""
    content, style, _ = images
    batches, rec = _Batches(pipe.unet), _Recorder()
    try:
        out = pipe.transfer(content, style, num_inference_steps=STEPS, hooks=[StyleSSP(), rec], content_prompt="a cat",
                            style_prompt="a dog", cache_style=False, generator=torch.Generator().manual_seed(3),
                            output_type="pt")
    finally:
        batches.handle.remove()
    # style inversion, content inversion, guided inversion (2 rows a call), sampling
    assert batches.sizes == [1] * (2 * STEPS) + [2] * STEPS + [1] * STEPS
    ex = rec.extras
    levels = ddim_levels(_ddim(pipe, STEPS))
    pos_rows, neg_rows = _prompt_rows(pipe, "a cat", 32, 32), _prompt_rows(pipe, "a dog", 32, 32)

    def separate(x, t):
        pos, neg = _eps(pipe, x, t, pos_rows), _eps(pipe, x, t, neg_rows)
        return pos + 0.5 * (pos - neg)

    with torch.no_grad():
        guided = ddim_invert(separate, ex["content_z0"], levels, "epsilon").latents
    assert_close_to_scale(ex["content_start_zT"], guided, 1e-5)
    assert (ex["content_start_zT"] - ex["content_zT"]).abs().max() > 1e-3  # the guidance did something
    noise = torch.randn(ex["content_zT"].shape, generator=torch.Generator().manual_seed(3))
    expected = frequency_start_point(adain_latents(ex["content_start_zT"], ex["style_zT"]), noise)
    assert torch.equal(out.start_latents, expected) and torch.equal(rec.seen, expected)
    assert torch.isfinite(out.images).all()


def test_empty_content_prompt_is_the_zero_embedding(pipe, images):
    """c⁺ = "" (no content_prompt) is SDXL's zero unconditional input, like the plain inversion's."""
    content, style, _ = images
    rec = _Recorder()
    pipe.transfer(content, style, num_inference_steps=1, negative_inversion_scale=0.5, style_prompt="a dog",
                  hooks=[rec], output_type="pt")
    ex = rec.extras
    levels = ddim_levels(_ddim(pipe, 1))
    t = levels.timesteps[0]
    with torch.no_grad():
        pos = _eps(pipe, ex["content_z0"], t, _null_rows(pipe, 32, 32))
        neg = _eps(pipe, ex["content_z0"], t, _prompt_rows(pipe, "a dog", 32, 32))
        expected = ddim_invert(lambda x, t: pos + 0.5 * (pos - neg), ex["content_z0"], levels, "epsilon").latents
    assert_close_to_scale(ex["content_start_zT"], expected, 1e-5)


# ---------------------------------------------------------------------------- cache, loading, precision


def test_style_is_inverted_once_for_many_contents(pipe, images, counter):
    content, style, other = images
    pipe.clear_style_cache()
    first = pipe.transfer(content, style, num_inference_steps=STEPS, output_type="pt").images
    assert counter.calls == 3 * STEPS
    counter.calls = 0
    pipe.transfer(other, style.clone(), num_inference_steps=STEPS, output_type="pt")  # same pixels, new object
    assert counter.calls == 2 * STEPS
    counter.calls = 0
    again = pipe.transfer(content, style, num_inference_steps=STEPS, output_type="pt").images
    assert counter.calls == 2 * STEPS and torch.equal(again, first)
    counter.calls = 0
    pipe.transfer(content, style, num_inference_steps=STEPS, layers="diffusers", output_type="pt")  # other layers
    assert counter.calls == 3 * STEPS
    counter.calls = 0
    wide = torch.rand(1, 3, 24, 40, generator=torch.Generator().manual_seed(5))  # a style of another size
    out = pipe.transfer(content, wide, num_inference_steps=STEPS, output_type="pt")
    assert counter.calls == 3 * STEPS and out.images.shape == (1, 3, 32, 32)
    counter.calls = 0
    pipe.clear_style_cache()
    fresh = pipe.transfer(content, style, num_inference_steps=STEPS, output_type="pt").images
    assert counter.calls == 3 * STEPS and torch.equal(fresh, first)


def test_from_pipe_of_a_stock_sdxl_pipeline(tiny_sdxl_dir, pipe, images):
    stock = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    stock.set_progress_bar_config(disable=True)
    ours = StyleIDStableDiffusionXLPipeline.from_pipe(stock)
    assert ours.unet is stock.unet and ours.vae is stock.vae and ours.text_encoder_2 is stock.text_encoder_2
    kwargs = dict(num_inference_steps=2, height=32, width=32, output_type="np")
    a = stock("a cat", generator=torch.Generator().manual_seed(0), **kwargs).images
    b = ours("a cat", generator=torch.Generator().manual_seed(0), **kwargs).images
    assert np.array_equal(a, b)
    before = dict(stock.unet.attn_processors)
    content, style, _ = images
    out = ours.transfer(content, style, num_inference_steps=2, output_type="pt").images
    assert torch.equal(out, pipe.transfer(content, style, num_inference_steps=2, output_type="pt").images)
    assert _same_processors(ours, before)


def test_half_precision_vae_is_upcast_and_put_back(tiny_sdxl_dir, pipe, images):
    vae16 = AutoencoderKL.from_pretrained(tiny_sdxl_dir, subfolder="vae", torch_dtype=torch.float16)
    assert vae16.config.force_upcast
    half = StyleIDStableDiffusionXLPipeline.from_pipe(pipe, vae=vae16)
    dtypes = []
    coders = (vae16.encoder, vae16.decoder)
    handles = [m.register_forward_pre_hook(lambda m, args: dtypes.append(args[0].dtype)) for m in coders]
    try:
        out = half.transfer(images[0], images[1], num_inference_steps=2, output_type="pt")
    finally:
        for h in handles:
            h.remove()
    assert dtypes == [torch.float32] * 3 and vae16.dtype == torch.float16  # 2 encodes, 1 decode
    full = pipe.transfer(images[0], images[1], num_inference_steps=2, output_type="pt")
    assert (out.images - full.images).abs().max() < 2e-2  # only the fp16 rounding of the VAE weights differs


# ---------------------------------------------------------------------------- errors


def test_errors_before_any_model_call(pipe, images, counter):
    content, style, _ = images
    cases = [
        (dict(gamma=1.2), "gamma"),
        (dict(temperature=0), "temperature"),
        (dict(num_inference_steps=0), "num_inference_steps"),
        (dict(output_type="jpg"), "output_type"),
        (dict(layers="all"), "layers"),
        (dict(layers=["up_blocks.0.attentions.0.transformer_blocks.0.attn2"]), "cross-attention"),
        (dict(layers=["up_blocks.1.attentions.0.transformer_blocks.0.attn1"]), "not an attention layer"),
        (dict(hooks=[APG()]), "guidance slot"),
        (dict(hooks=[StyleSSP()]), "style_prompt: None"),
        (dict(negative_inversion_scale=-1.0, style_prompt="a dog"), "negative_inversion_scale"),
        (dict(style_prompt=["a dog"]), "style_prompt"),
        (dict(attn_injection="yes"), "attn_injection"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            pipe.transfer(content, style, **{"num_inference_steps": 2, **kwargs})
    with pytest.raises(ValueError, match=r"content_image: size 31x32 is not divisible by the VAE factor 2"):
        pipe.transfer(torch.rand(1, 3, 32, 31), style, num_inference_steps=2)
    with pytest.raises(ValueError, match="style_image: PIL mode 'L'"):
        pipe.transfer(content, PIL.Image.new("L", (32, 32)), num_inference_steps=2)
    with pytest.raises(ValueError, match="style_image: 2 images"):
        pipe.transfer(content, torch.cat([style, style]), num_inference_steps=2)
    assert counter.calls == 0
