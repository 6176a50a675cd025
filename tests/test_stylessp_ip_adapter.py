"""`StyleSSP.start_point` in its image-embedding form (IP-Adapters loaded), on tiny random SD and SDXL pipelines
with two tiny random IP-Adapters (the same weights loaded twice, one scaled to style blocks, one to layout blocks)
and a tiny CLIP image encoder: the start point against an independent DDIM inversion that calls the UNet itself
with each side's per-row image embeddings, ε(c⁻) + w·(ε(c⁺) − ε(c⁻)); the style-transfer default
(c⁺ = (style, content), c⁻ = (content, style)) against the explicit per-adapter images; swapping the sides;
w_inv = 1; per-row embeddings; errors."""

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import DDIMScheduler

from guidekit import StyleSSP
from guidekit.testing import TINY_IP_ADAPTER_WEIGHTS, save_tiny_ip_adapter, tiny_sd_pipeline, tiny_sdxl_pipeline

from tolerance import assert_close_to_scale

torch.set_num_threads(1)

STEPS = 2
SIZE = 32  # pixels; the tiny VAE's factor is 2, so latents are 16 x 16
POSITIVE = "a red square"
EMBED_DIM = 8  # the tiny adapter's image-embedding width

# InstantStyle's per-block split, on the tiny UNets' blocks: [style blocks, layout blocks] (on SDXL base the
# style blocks are {"up": {"block_0": [0.0, 1.0, 0.0]}} and the layout ones {"down": {"block_2": [0.0, 1.0]}}).
SCALES = {
    "sd": [{"up": {"block_1": [0.0, 1.0]}}, {"down": {"block_0": 1.0}}],
    "sdxl": [{"up": {"block_0": [0.0, 1.0]}}, {"down": {"block_1": 1.0}}],
}


# ---------------------------------------------------------------------------- fixtures


def _pil(seed, size=SIZE):
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def _with_adapters(pipe, folder, family, count=2, image_encoder_folder="image_encoder"):
    save_tiny_ip_adapter(pipe.unet, folder, image_embed_dim=EMBED_DIM)
    pipe.load_ip_adapter(str(folder), subfolder="", weight_name=[TINY_IP_ADAPTER_WEIGHTS] * count,
                         image_encoder_folder=image_encoder_folder)
    if count == 2:
        pipe.set_ip_adapter_scale(SCALES[family])
    return pipe


@pytest.fixture(scope="module")
def sdxl(tiny_sdxl_dir, tmp_path_factory):
    return _with_adapters(tiny_sdxl_pipeline(tiny_sdxl_dir), tmp_path_factory.mktemp("ip-sdxl"), "sdxl")


@pytest.fixture(scope="module")
def sd(tiny_sd_dir, tmp_path_factory):
    return _with_adapters(tiny_sd_pipeline(tiny_sd_dir), tmp_path_factory.mktemp("ip-sd"), "sd")


@pytest.fixture(scope="module")
def contents():
    return [_pil(0), _pil(1)]


@pytest.fixture(scope="module")
def style():
    return _pil(2, size=40)  # any size: only the image encoder sees it


class _Counter:
    """UNet calls and image-encoder calls of one pipeline."""

    def __init__(self, pipe):
        self.unet, self.encoder = 0, 0
        self.handles = [pipe.unet.register_forward_pre_hook(self._unet),
                        pipe.image_encoder.register_forward_pre_hook(self._encoder)]

    def _unet(self, module, args):
        self.unet += 1

    def _encoder(self, module, args):
        self.encoder += 1

    def remove(self):
        for h in self.handles:
            h.remove()


# ---------------------------------------------------------------------------- the reference, from the equations


def _tokens(tokenizer, prompt):
    return tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def _text(pipe, prompt):
    """(encoder_hidden_states, SDXL's added text kwargs or {}) of one prompt. On SDXL, "" is all zeros (token and
    pooled embeddings; `force_zeros_for_empty_prompt`): the official zero text of c⁻."""
    if getattr(pipe, "text_encoder_2", None) is None:
        return pipe.text_encoder(_tokens(pipe.tokenizer, prompt))[0], {}
    first = pipe.text_encoder(_tokens(pipe.tokenizer, prompt), output_hidden_states=True)
    second = pipe.text_encoder_2(_tokens(pipe.tokenizer_2, prompt), output_hidden_states=True)
    states = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
    pooled = second.text_embeds
    if prompt == "":
        states, pooled = torch.zeros_like(states), torch.zeros_like(pooled)
    time_ids = torch.tensor([[SIZE, SIZE, 0, 0, SIZE, SIZE]], dtype=states.dtype)
    return states, {"text_embeds": pooled, "time_ids": time_ids}


def _clip(pipe, image):
    """The pooled, projected CLIP embedding of one PIL image, (1, 1, dim): one image for one adapter."""
    pixels = pipe.feature_extractor(image, return_tensors="pt").pixel_values
    return pipe.image_encoder(pixels).image_embeds[:, None]


def _encode(pipe, image):
    """z_0 of one PIL image: the VAE posterior mean times the scaling factor (no latent statistics here)."""
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)[None]
    return pipe.vae.encode(x * 2 - 1).latent_dist.mean * pipe.vae.config.scaling_factor


def _invert(pipe, z0, sides, scale):
    """DDIM inversion (η = 0) in float64 of one latent, each side one UNet call with its own text and per-adapter
    image embeddings: ε̃ = ε(c⁻) + w·(ε(c⁺) − ε(c⁻)) for sides (c⁺, c⁻), ε(c⁺) for (c⁺,) alone."""
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(STEPS)
    alpha_bar = scheduler.alphas_cumprod.double()
    stride = scheduler.config.num_train_timesteps // STEPS
    x = z0.double()
    for t in reversed([int(t) for t in scheduler.timesteps]):
        ab_t = alpha_bar[t]
        ab_p = alpha_bar[t - stride] if t - stride >= 0 else torch.tensor(float(scheduler.final_alpha_cumprod)).double()
        eps = []
        for prompt, image_embeds in sides:
            states, added = _text(pipe, prompt)
            eps.append(pipe.unet(x.float(), t, encoder_hidden_states=states,
                                 added_cond_kwargs={**added, "image_embeds": image_embeds}).sample.double())
        guided = eps[0] if len(eps) == 1 else eps[1] + scale * (eps[0] - eps[1])
        x0 = (x - (1 - ab_p).sqrt() * guided) / ab_p.sqrt()
        x = ab_t.sqrt() * x0 + (1 - ab_t).sqrt() * guided
    return x


def _start(pipe, content, hook=None, **kwargs):
    hook = hook or StyleSSP(frequency=False)  # the inverted latent itself: the frequency step is tested elsewhere
    return hook.start_point(pipe, content, prompt=POSITIVE, num_inference_steps=STEPS, **kwargs)


# ---------------------------------------------------------------------------- the start point


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_style_image_matches_the_equations(family, request, contents, style):
    """The default: c⁺ = [style image → style adapter, content b → layout adapter ; caption],
    c⁻ = [content b → style adapter, style image → layout adapter ; ""], row b for content image b."""
    pipe = request.getfixturevalue(family)
    z = _start(pipe, contents, style_image=style)
    assert z.shape == (2, 4, SIZE // 2, SIZE // 2) and z.dtype == pipe.unet.dtype
    with torch.no_grad():
        s = _clip(pipe, style)
        expected, swapped = [], []
        for content in contents:
            c = _clip(pipe, content)
            z0 = _encode(pipe, content)
            expected.append(_invert(pipe, z0, [(POSITIVE, [s, c]), ("", [c, s])], 1.5))
            swapped.append(_invert(pipe, z0, [(POSITIVE, [c, s]), ("", [s, c])], 1.5))
        expected, swapped = torch.cat(expected), torch.cat(swapped)
    assert_close_to_scale(z.double(), expected, rel=1e-4)
    # the check can fail: the sides' images exchanged give another start point
    assert float((z.double() - swapped).abs().max()) > 100 * 1e-4 * float(expected.abs().max())


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_explicit_images_and_embeddings(family, request, contents, style):
    pipe = request.getfixturevalue(family)
    content = contents[0]
    default = _start(pipe, content, style_image=style)
    # the default is exactly these per-adapter images
    explicit = _start(pipe, content, ip_adapter_image=[style, content], negative_ip_adapter_image=[content, style])
    assert torch.equal(default, explicit)
    # precomputed embeddings, and the negative text when given, reach the UNet
    with torch.no_grad():
        s, c = _clip(pipe, style), _clip(pipe, content)
    embeds = _start(pipe, content, ip_adapter_image_embeds=[s, c], negative_ip_adapter_image_embeds=[c, s])
    assert_close_to_scale(embeds, default, rel=1e-5)
    hook = StyleSSP(frequency=False, inversion_guidance_scale=2.5)
    z = _start(pipe, content, hook, style_prompt="a blue circle", ip_adapter_image_embeds=[s, c],
               negative_ip_adapter_image_embeds=[c, s])
    with torch.no_grad():
        z0 = _encode(pipe, content)
        expected = _invert(pipe, z0, [(POSITIVE, [s, c]), ("a blue circle", [c, s])], 2.5)
    assert_close_to_scale(z.double(), expected, rel=1e-4)


def test_swapping_the_sides_changes_the_start_point(sdxl, contents, style):
    content = contents[0]
    z = _start(sdxl, content, ip_adapter_image=[style, content], negative_ip_adapter_image=[content, style])
    swapped = _start(sdxl, content, ip_adapter_image=[content, style], negative_ip_adapter_image=[style, content])
    scale = float(z.abs().max())
    assert float((z - swapped).abs().max()) > 1e-2 * scale
    # only the c⁻ images changed: still another start point
    negative_only = _start(sdxl, content, ip_adapter_image=[style, content], negative_ip_adapter_image=[style, style])
    assert float((z - negative_only).abs().max()) > 1e-2 * scale


def test_scale_one_ignores_the_negative_side(sdxl, contents, style):
    """w_inv = 1: ε(c⁻) + 1·(ε(c⁺) − ε(c⁻)) = ε(c⁺), so c⁻ is neither encoded nor run."""
    content = contents[0]
    hook = StyleSSP(frequency=False, inversion_guidance_scale=1.0)
    counter = _Counter(sdxl)
    try:
        a = _start(sdxl, content, hook, ip_adapter_image=[style, content], negative_ip_adapter_image=[content, style])
        assert (counter.unet, counter.encoder) == (STEPS, 2)
    finally:
        counter.remove()
    b = _start(sdxl, content, hook, ip_adapter_image=[style, content], negative_ip_adapter_image=[style, style])
    c = _start(sdxl, content, hook, ip_adapter_image=[style, content])  # c⁻ is not needed
    d = _start(sdxl, content, hook, style_image=style)
    assert torch.equal(a, b) and torch.equal(a, c) and torch.equal(a, d)
    with torch.no_grad():
        expected = _invert(sdxl, _encode(sdxl, content), [(POSITIVE, [_clip(sdxl, style), _clip(sdxl, content)])], None)
    assert_close_to_scale(a.double(), expected, rel=1e-4)
    off = _start(sdxl, content, StyleSSP(frequency=False, negative_inversion=False), style_image=style)
    assert torch.equal(a, off)


def test_per_row_embeddings_and_costs(sdxl, contents, style):
    """Embeddings of 2 rows give row b to content image b; a 1-row tensor is shared; each image is encoded once."""
    with torch.no_grad():
        s, c0, c1 = _clip(sdxl, style), _clip(sdxl, contents[0]), _clip(sdxl, contents[1])
    both = _start(sdxl, contents, ip_adapter_image_embeds=[s, torch.cat([c0, c1])],
                  negative_ip_adapter_image_embeds=[torch.cat([c0, c1]), s])
    for b, c in enumerate((c0, c1)):
        alone = _start(sdxl, contents[b], ip_adapter_image_embeds=[s, c], negative_ip_adapter_image_embeds=[c, s])
        assert_close_to_scale(both[b : b + 1], alone, rel=1e-5)
    counter = _Counter(sdxl)
    try:
        _start(sdxl, contents, style_image=style)
        # one UNet call of 2 × 2 rows per step; the style image and the two contents encoded once each
        assert (counter.unet, counter.encoder) == (STEPS, 2)
    finally:
        counter.remove()


def test_sampling_after_the_start_point(sdxl, contents, style):
    """The start point goes into the pipeline's own call with the same adapters (the style image on the style
    adapter, the content on the layout adapter)."""
    pipe = type(sdxl)(**{**sdxl.components, "scheduler": DDIMScheduler.from_config(sdxl.scheduler.config)})
    z = StyleSSP().start_point(pipe, contents[0], prompt=POSITIVE, style_image=style, num_inference_steps=STEPS,
                               generator=torch.Generator().manual_seed(0))
    out = pipe(POSITIVE, latents=z, num_inference_steps=STEPS, height=SIZE, width=SIZE, output_type="pt",
               ip_adapter_image=[style, contents[0]])
    assert out.images.shape == (1, 3, SIZE, SIZE) and bool(torch.isfinite(out.images).all())


def test_text_only_path_is_unchanged_by_unloading(tiny_sd_dir, tmp_path, contents, style):
    pipe = tiny_sd_pipeline(tiny_sd_dir)  # its own copy: adapters are loaded and unloaded
    text = StyleSSP(frequency=False).start_point(pipe, contents[0], prompt=POSITIVE, style_prompt="a blue circle",
                                                 num_inference_steps=STEPS)
    _with_adapters(pipe, tmp_path, "sd")
    image_form = _start(pipe, contents[0], style_image=style)
    assert not torch.allclose(image_form, text, atol=1e-3)
    pipe.unload_ip_adapter()
    again = StyleSSP(frequency=False).start_point(pipe, contents[0], prompt=POSITIVE, style_prompt="a blue circle",
                                                  num_inference_steps=STEPS)
    assert torch.equal(again, text)


# ---------------------------------------------------------------------------- errors


def test_errors_before_any_model_call(sdxl, contents, style):
    content = contents[0]
    e = torch.zeros(1, 1, EMBED_DIM)
    cases = [
        (dict(), r"ip_adapter_image: None is not accepted: an IP-Adapter is loaded on pipe's UNet \(2 adapter\(s\)\).*"
                 r"accepted: style_image=.*before pipe.load_ip_adapter"),
        (dict(ip_adapter_image=[style]), "ip_adapter_image: 1 entries for 2 loaded IP-Adapter"),
        (dict(ip_adapter_image=style), "ip_adapter_image: 1 entries for 2"),
        (dict(ip_adapter_image=[style, content, style]), "ip_adapter_image: 3 entries for 2"),
        (dict(ip_adapter_image=[style, content]), "negative_ip_adapter_image: None is not accepted with StyleSSP's "
                                                  "negative-guided inversion"),
        (dict(ip_adapter_image=[style, content], negative_ip_adapter_image=[content]),
         "negative_ip_adapter_image: 1 entries for 2"),
        (dict(ip_adapter_image=[style, content], negative_ip_adapter_image=[[content, style], style]),
         r"negative_ip_adapter_image: adapter 0 gets 2 image\(s\) for c⁻ and 1 for c⁺"),
        (dict(negative_ip_adapter_image=[content, style]), "ip_adapter_image: None is not accepted with "
                                                          "negative_ip_adapter_image given"),
        (dict(ip_adapter_image=[style, content], ip_adapter_image_embeds=[e, e]),
         "ip_adapter_image: given together with ip_adapter_image_embeds"),
        (dict(ip_adapter_image_embeds=e, negative_ip_adapter_image_embeds=[e, e]),
         "ip_adapter_image_embeds: a Tensor is not accepted with 2 loaded IP-Adapter"),
        (dict(ip_adapter_image_embeds=[e], negative_ip_adapter_image_embeds=[e, e]),
         "ip_adapter_image_embeds: a list of 1 is not accepted"),
        (dict(ip_adapter_image_embeds=[e, torch.zeros(3, 1, EMBED_DIM)], negative_ip_adapter_image_embeds=[e, e]),
         r"ip_adapter_image_embeds\[1\]: shape \(3, 1, 8\) is not accepted.*1 row \(shared by every content image\) "
         "or 1"),
        (dict(ip_adapter_image_embeds=[e, e[0]], negative_ip_adapter_image_embeds=[e, e]),
         r"ip_adapter_image_embeds\[1\]: shape \(1, 8\)"),
        (dict(ip_adapter_image_embeds=[e, e], negative_ip_adapter_image_embeds=[e, "x"]),
         r"negative_ip_adapter_image_embeds\[1\]: str"),
        (dict(ip_adapter_image_embeds=[e, e], negative_ip_adapter_image_embeds=[e, torch.zeros(1, 2, EMBED_DIM)]),
         r"negative_ip_adapter_image_embeds: adapter 1 gets 2 image\(s\) for c⁻ and 1"),
        (dict(style_image=style, ip_adapter_image=[style, content]),
         "style_image: given together with ip_adapter_image"),
        (dict(style_image=[style, style]), "style_image: 2 images are not accepted; accepted: one style image"),
        (dict(style_image="style.png"), "style_image: str is not accepted"),
        (dict(style_image=style, style_prompt=3), "style_prompt: 3 is not accepted; accepted: a string"),
    ]
    counter = _Counter(sdxl)
    try:
        for kwargs, match in cases:
            with pytest.raises(ValueError, match=match):
                _start(sdxl, content, StyleSSP(), **kwargs)
        assert (counter.unet, counter.encoder) == (0, 0)
    finally:
        counter.remove()


def test_adapter_count_encoder_and_no_adapter_errors(tiny_sdxl_dir, tmp_path, contents, style):
    content = contents[0]
    pipe = tiny_sdxl_pipeline(tiny_sdxl_dir)
    # IP-Adapter inputs without an adapter loaded
    for name in ("style_image", "ip_adapter_image", "negative_ip_adapter_image_embeds"):
        with pytest.raises(ValueError, match=f"{name}: given, but no IP-Adapter is loaded on pipe's UNet"):
            _start(pipe, content, style_prompt="a blue circle", **{name: [style]})
    # one adapter: the style_image default needs two; explicit images work
    _with_adapters(pipe, tmp_path / "one", "sdxl", count=1)
    with pytest.raises(ValueError, match="style_image: needs two IP-Adapters loaded.*pipe's UNet has 1"):
        _start(pipe, content, style_image=style)
    z = _start(pipe, content, ip_adapter_image=style, negative_ip_adapter_image=content)
    assert z.shape == (1, 4, SIZE // 2, SIZE // 2)
    pipe.unload_ip_adapter()
    # adapters without an image encoder: images are refused, embeddings work
    _with_adapters(pipe, tmp_path / "two", "sdxl", image_encoder_folder=None)
    assert pipe.image_encoder is None
    for kwargs, name in ((dict(style_image=style), "style_image"),
                         (dict(ip_adapter_image=[style, content], negative_ip_adapter_image=[content, style]),
                          "ip_adapter_image")):
        with pytest.raises(ValueError, match=f"{name}: pipe has no image_encoder.*accepted: .*ip_adapter_image_embeds"):
            _start(pipe, content, **kwargs)
    e = [torch.randn(1, 1, EMBED_DIM, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    z = _start(pipe, content, ip_adapter_image_embeds=e, negative_ip_adapter_image_embeds=e[::-1])
    assert bool(torch.isfinite(z).all())


def test_styleid_transfer_refuses_a_loaded_ip_adapter(tiny_sd_dir, tmp_path):
    from guidekit.pipelines import StyleIDStableDiffusionPipeline

    pipe = StyleIDStableDiffusionPipeline.from_pretrained(tiny_sd_dir)
    _with_adapters(pipe, tmp_path / "ip", "sd", count=1)
    calls = []
    handle = pipe.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    with pytest.raises(ValueError, match=r"pipe: an IP-Adapter.*unload_ip_adapter.*start_point"):
        pipe.transfer(_pil(0), _pil(1), num_inference_steps=2)
    handle.remove()
    assert not calls  # refused before any model call
