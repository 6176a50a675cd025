"""StyleID: the injection processor against a literal reference, the layer rule, AdaIN, and the pipeline on tiny
random SD components (against a literal re-derivation of StyleID's loop, identities, style cache, restoration,
hooks, shapes, errors)."""

import math

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from guidekit.attention import (
    StyleIDAttnProcessor,
    StyleIDControl,
    attention_layers,
    replaced_processors,
    styleid_attention,
    styleid_layers,
)
from guidekit.guidance import APG
from guidekit.hooks import SamplerHook
from guidekit.inversion import ddim_invert, ddim_levels, ddim_step
from guidekit.pipelines import StyleIDStableDiffusionPipeline, UAMStableDiffusionPipeline
from guidekit.pipelines.styleid_sd import adain_latents

from tolerance import assert_close_to_scale

torch.set_num_threads(1)

STEPS = 4


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def pipe(tiny_sd_dir):
    p = StyleIDStableDiffusionPipeline.from_pretrained(tiny_sd_dir)
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(0)
    return torch.rand(1, 3, 32, 32, generator=g), torch.rand(1, 3, 32, 32, generator=g), torch.rand(1, 3, 32, 32, generator=g)


class _Counter:
    """Counts UNet forward calls (batch rows) while installed."""

    def __init__(self, unet):
        self.calls = 0
        self.rows = 0
        self.handle = unet.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        self.calls += 1
        self.rows += (args[0] if args else kwargs["sample"]).shape[0]

    def remove(self):
        self.handle.remove()


@pytest.fixture
def counter(pipe):
    c = _Counter(pipe.unet)
    yield c
    c.remove()


def _same_processors(pipe, before):
    now = pipe.unet.attn_processors
    return set(now) == set(before) and all(now[k] is v for k, v in before.items())


# ---------------------------------------------------------------------------- processor math


def _attn(seed=0):
    torch.manual_seed(seed)
    attn = Attention(query_dim=8, heads=2, dim_head=4, bias=True)
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.4)
    return attn.eval().double()


def _weights(linear):
    w = linear.weight.detach().double()
    b = None if linear.bias is None else linear.bias.detach().double()
    return w, b


def _linear(x, linear):
    w, b = _weights(linear)
    return x @ w.T if b is None else x @ w.T + b


def _literal(attn, x, q_c, k_s, v_s, gamma, temperature):
    """Slow reference: every logit, softmax and weighted sum written out per batch row, head and token
    (float64; the module's weights are read, not converted)."""
    x, q_c, k_s, v_s = (z.double() for z in (x, q_c, k_s, v_s))
    batch, length, _ = x.shape
    heads = attn.heads
    q = gamma * q_c.expand(batch, -1, -1) + (1 - gamma) * _linear(x, attn.to_q)
    k, v = k_s.expand(batch, -1, -1), v_s.expand(batch, -1, -1)
    d = q.shape[-1] // heads
    out = torch.zeros(batch, length, heads * d, dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            sl = slice(h * d, (h + 1) * d)
            for i in range(length):
                logits = [temperature * float(q[b, i, sl] @ k[b, j, sl]) / math.sqrt(d) for j in range(k.shape[1])]
                top = max(logits)
                weights = [math.exp(z - top) for z in logits]
                total = sum(weights)
                out[b, i, sl] = sum(w / total * v[b, j, sl] for j, w in enumerate(weights))
    return _linear(out, attn.to_out[0])


def _explicit(attn, x, q_c, k_s, v_s, gamma, temperature):
    """The same formula with tensor ops (for the pipeline-sized reference): exp/sum softmax per head, float64."""
    x, q_c, k_s, v_s = (z.double() for z in (x, q_c, k_s, v_s))
    batch, heads = x.shape[0], attn.heads
    q = gamma * q_c + (1 - gamma) * _linear(x, attn.to_q)
    d = q.shape[-1] // heads
    split = lambda z: z.reshape(z.shape[0], -1, heads, d).permute(0, 2, 1, 3)  # noqa: E731
    logits = temperature * (split(q) @ split(k_s).transpose(-1, -2)) / math.sqrt(d)
    weights = (logits - logits.amax(-1, keepdim=True)).exp()
    probs = weights / weights.sum(-1, keepdim=True)
    out = (probs @ split(v_s)).permute(0, 2, 1, 3).reshape(batch, -1, heads * d)
    return _linear(out, attn.to_out[0])


@pytest.mark.parametrize("gamma, temperature", [(0.75, 1.5), (0.3, 0.7), (0.0, 1.0), (1.0, 2.5)])
def test_injection_matches_literal_reference(gamma, temperature):
    attn = _attn()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 6, 8, generator=g, dtype=torch.float64)
    q_c = torch.randn(1, 6, 8, generator=g, dtype=torch.float64)
    k_s = torch.randn(1, 5, 8, generator=g, dtype=torch.float64)  # a style of another size: 5 tokens
    v_s = torch.randn(1, 5, 8, generator=g, dtype=torch.float64)
    with torch.no_grad():
        out = styleid_attention(attn, x, q_c, k_s, v_s, gamma, temperature)
        ref = _literal(attn, x, q_c, k_s, v_s, gamma, temperature)
        vectorised = _explicit(attn, x, q_c, k_s, v_s, gamma, temperature)  # the pipeline reference's formula
    assert out.shape == (2, 6, 8)
    assert_close_to_scale(out, ref, 1e-12)
    assert_close_to_scale(vectorised, ref, 1e-12)


def test_injection_through_processor_and_identity_with_own_features():
    attn = _attn().float()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 6, 8, generator=g)
    control = StyleIDControl()
    proc = StyleIDAttnProcessor(AttnProcessor2_0(), "layer", control)
    store = {}
    with torch.no_grad():
        # record: the projections of the input, and the original processor's output unchanged
        control.record(store, ("q", "k", "v"))
        control.timestep = 7
        recorded_out = proc(attn, x)
        plain = AttnProcessor2_0()(attn, x)
        assert torch.equal(recorded_out, plain)
        assert set(store) == {("layer", 7)}
        for name, proj in (("q", attn.to_q), ("k", attn.to_k), ("v", attn.to_v)):
            assert torch.equal(store[("layer", 7)][name], proj(x))
        # inject with gamma = 1, T = 1 and the layer's own K/V: ordinary self-attention of the recorded input
        control.inject(store, store, gamma=1.0, temperature=1.0)
        control.timestep = 7
        other = torch.randn(1, 6, 8, generator=g)
        assert torch.allclose(proc(attn, other), plain, atol=1e-6)
        # gamma = 0.75, T = 1.5 is the literal formula
        control.inject(store, store, gamma=0.75, temperature=1.5)
        ref = _literal(attn, other, *(store[("layer", 7)][k] for k in "qkv"), 0.75, 1.5)
        assert_close_to_scale(proc(attn, other).double(), ref, 1e-5)
        # missing timestep: a clear error
        control.timestep = 8
        with pytest.raises(ValueError, match="no recorded StyleID features"):
            proc(attn, other)
        control.off()
        assert torch.equal(proc(attn, other), AttnProcessor2_0()(attn, other))


def test_processor_keeps_the_wrapped_signature():
    import inspect

    proc = StyleIDAttnProcessor(AttnProcessor2_0(), "layer", StyleIDControl())
    assert inspect.signature(proc.__call__) == inspect.signature(AttnProcessor2_0().__call__)


# ---------------------------------------------------------------------------- layers


def test_layer_rule_on_the_tiny_unet_and_an_sd1_layout(pipe):
    attn1 = "transformer_blocks.0.attn1.processor"
    assert styleid_layers(pipe.unet) == tuple(f"up_blocks.1.attentions.{i}.{attn1}" for i in (0, 1))
    assert styleid_layers(pipe.unet, "diffusers") == (f"up_blocks.1.attentions.1.{attn1}",)
    torch.manual_seed(0)
    sd1 = UNet2DConditionModel(  # SD 1.x block layout, tiny widths
        block_out_channels=(8, 8, 8, 8), layers_per_block=2, cross_attention_dim=8, attention_head_dim=2,
        norm_num_groups=4, sample_size=8,
    )
    paper = tuple(f"up_blocks.{b}.attentions.{i}.{attn1}" for b in (2, 3) for i in (0, 1, 2))
    assert styleid_layers(sd1) == paper  # LDM decoder layers 6-11
    assert styleid_layers(sd1, "diffusers") == paper[1:]  # the official diffusers port's 7-11


# ---------------------------------------------------------------------------- AdaIN


def test_adain_statistics_and_identity():
    g = torch.Generator().manual_seed(3)
    content = torch.randn(2, 4, 8, 8, generator=g) * 2 + 1
    style = torch.randn(2, 4, 6, 10, generator=g) * torch.tensor([0.5, 1, 2, 3]).view(1, 4, 1, 1) - 0.7
    out = adain_latents(content, style)
    assert out.shape == content.shape and out.dtype == content.dtype
    torch.testing.assert_close(out.mean(dim=(-2, -1)), style.mean(dim=(-2, -1)), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.std(dim=(-2, -1)), style.std(dim=(-2, -1)), atol=1e-5, rtol=1e-5)
    # per sample: the normalised content is kept
    z = (content - content.mean(dim=(-2, -1), keepdim=True)) / content.std(dim=(-2, -1), keepdim=True)
    zo = (out - out.mean(dim=(-2, -1), keepdim=True)) / out.std(dim=(-2, -1), keepdim=True)
    torch.testing.assert_close(zo, z, atol=1e-5, rtol=0)
    # one style for every content, and z onto itself gives z back
    one = adain_latents(content, style[:1])
    torch.testing.assert_close(one[1], adain_latents(content[1:], style[:1])[0])
    torch.testing.assert_close(adain_latents(content, content), content, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="constant"):
        adain_latents(torch.ones(1, 4, 4, 4), style[:1])
    with pytest.raises(ValueError, match="style"):
        adain_latents(content, torch.randn(3, 4, 4, 4))


# ---------------------------------------------------------------------------- the pipeline against StyleID's equations


class _LiteralStyleID:
    """Test-side processor: records Q/K/V with the layer's projections (and its stock output), replays that
    output, or injects with the literal formula."""

    def __init__(self, name, state):
        self.name, self.state = name, state

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        s = self.state
        key = (self.name, s["t"])
        if s["mode"] == "record":
            out = AttnProcessor2_0()(attn, hidden_states)
            s["store"][key] = {
                "q": attn.to_q(hidden_states), "k": attn.to_k(hidden_states), "v": attn.to_v(hidden_states), "out": out,
            }
            return out
        if s["mode"] == "replay":
            return s["content"][key]["out"]
        q_c, kv = s["content"][key]["q"], s["style"][key]
        return _explicit(attn, hidden_states, q_c, kv["k"], kv["v"], s["gamma"], s["temperature"]).float()


def _ddim(pipe, steps):
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(steps)
    return scheduler


def _reference_transfer(pipe, content, style, gamma, temperature, steps, mode="inject"):
    """StyleID written out with the test's own processors: invert both images with the empty prompt (record),
    AdaIN of the content's z_T to the style's, DDIM sampling with the empty prompt and no CFG (inject)."""
    state = {"mode": "off", "t": None, "gamma": gamma, "temperature": temperature}
    null, _ = pipe.encode_prompt([""], "cpu", 1, False)
    levels = ddim_levels(_ddim(pipe, steps))
    kind = pipe.scheduler.config.prediction_type

    def model(x, t):
        state["t"] = int(t)
        return pipe.unet(x, t, encoder_hidden_states=null).sample

    def invert(image):
        state.update(mode="record", store={})
        z0 = pipe.vae.encode(image * 2 - 1).latent_dist.mean * pipe.vae.config.scaling_factor
        return ddim_invert(model, z0, levels, kind).latents, state["store"]

    procs = {n: _LiteralStyleID(n, state) for n in styleid_layers(pipe.unet)}
    with torch.no_grad(), replaced_processors(pipe.unet, procs):
        z_s, style_feats = invert(style)
        z_c, content_feats = invert(content)
        mu_c, sd_c = z_c.mean(dim=(2, 3), keepdim=True), z_c.std(dim=(2, 3), keepdim=True)
        mu_s, sd_s = z_s.mean(dim=(2, 3), keepdim=True), z_s.std(dim=(2, 3), keepdim=True)
        x = (z_c - mu_c) / sd_c * sd_s + mu_s
        state.update(mode=mode, content=content_feats, style=style_feats)
        for i, t in enumerate(levels.timesteps):
            x = ddim_step(x, model(x, t), levels.alpha_bar[i], levels.alpha_bar_prev[i], kind)
        image = (pipe.vae.decode(x / pipe.vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
    return image


def test_transfer_matches_literal_styleid(pipe, images):
    content, style, _ = images
    out = pipe.transfer(content, style, num_inference_steps=STEPS, gamma=0.6, temperature=1.7, output_type="pt")
    ref = _reference_transfer(pipe, content, style, 0.6, 1.7, STEPS)
    assert out.images.shape == (1, 3, 32, 32)
    assert (out.images - ref).abs().max() < 1e-4
    # the parameters matter: another gamma or temperature gives another image
    other = pipe.transfer(content, style, num_inference_steps=STEPS, gamma=0.2, temperature=1.7, output_type="pt")
    assert (other.images - out.images).abs().max() > 1e-3


def test_self_transfer_gamma1_t1_is_the_reconstruction_with_inversion_time_attention(pipe, images):
    """With style = content, γ = 1, T = 1 the injected layers output exactly what they output during the
    content's inversion at the same timestep; the rest of the UNet sees the sampling latent. So the result is
    the reconstruction in which those layers replay their inversion outputs (checked here to float precision),
    not the plain reconstruction: DDIM inversion evaluates the model at the latent of the level below t, the
    sampling at the latent of level t, and the two differ (see the README)."""
    content = images[0]
    out = pipe.transfer(content, content, num_inference_steps=STEPS, gamma=1.0, temperature=1.0, output_type="pt")
    ref = _reference_transfer(pipe, content, content, 1.0, 1.0, STEPS, mode="replay")
    assert (out.images - ref).abs().max() < 1e-4


def test_self_transfer_without_injection_is_the_plain_reconstruction(pipe, images):
    content = images[0]
    out = pipe.transfer(content, content, num_inference_steps=STEPS, attn_injection=False, output_type="pt")
    uam = UAMStableDiffusionPipeline.from_pipe(pipe)
    rec = uam.reconstruct(content, uniform=False, num_inference_steps=STEPS, output_type="pt")
    assert torch.allclose(out.images, rec.images, atol=1e-6)


def test_v_prediction_model(tiny_sd_v_dir, images):
    p = StyleIDStableDiffusionPipeline.from_pretrained(tiny_sd_v_dir)
    content, style, _ = images
    out = p.transfer(content, style, num_inference_steps=3, output_type="pt")
    assert out.images.shape == (1, 3, 32, 32) and torch.isfinite(out.images).all()
    same = p.transfer(content, content, num_inference_steps=3, attn_injection=False, output_type="pt")
    rec = UAMStableDiffusionPipeline.from_pipe(p).reconstruct(content, uniform=False, num_inference_steps=3, output_type="pt")
    assert torch.allclose(same.images, rec.images, atol=1e-6)


# ---------------------------------------------------------------------------- cache


def test_style_is_inverted_once_for_many_contents(pipe, images, counter):
    content, style, other = images
    pipe.clear_style_cache()
    first = pipe.transfer(content, style, num_inference_steps=STEPS, output_type="pt").images
    assert counter.calls == 3 * STEPS and counter.rows == 3 * STEPS  # style inversion, content inversion, sampling
    counter.calls = 0
    pipe.transfer(other, style.clone(), num_inference_steps=STEPS, output_type="pt")  # same pixels, new object
    assert counter.calls == 2 * STEPS
    counter.calls = 0
    again = pipe.transfer(content, style, num_inference_steps=STEPS, output_type="pt").images
    assert counter.calls == 2 * STEPS and torch.equal(again, first)
    counter.calls = 0
    pipe.transfer(content, style, num_inference_steps=STEPS + 1, output_type="pt")  # other steps: inverted again
    assert counter.calls == 3 * (STEPS + 1)
    counter.calls = 0
    pipe.transfer(content, style, num_inference_steps=STEPS, layers="diffusers", output_type="pt")  # other layers
    assert counter.calls == 3 * STEPS
    counter.calls = 0
    pipe.transfer(content, style, num_inference_steps=STEPS, cache_style=False, output_type="pt")
    assert counter.calls == 3 * STEPS
    counter.calls = 0
    pipe.clear_style_cache()
    fresh = pipe.transfer(content, style, num_inference_steps=STEPS, output_type="pt").images
    assert counter.calls == 3 * STEPS and torch.equal(fresh, first)


# ---------------------------------------------------------------------------- restoration, hooks


class _Boom(SamplerHook):
    def __init__(self, at):
        self.at = at

    def step_begin(self, state):
        if state.step_index == self.at:
            raise RuntimeError("boom")


def test_processors_restored_after_every_call_and_on_errors(pipe, images):
    content, style, _ = images
    before = dict(pipe.unet.attn_processors)
    pipe.transfer(content, style, num_inference_steps=2, output_type="pt")
    assert _same_processors(pipe, before)
    with pytest.raises(RuntimeError, match="boom"):
        pipe.transfer(content, style, num_inference_steps=2, hooks=[_Boom(1)], output_type="pt")
    assert _same_processors(pipe, before)

    def fail(module, args, kwargs):  # the UNet fails during the content's inversion
        fail.n += 1
        if fail.n == 2:
            raise RuntimeError("unet failed")

    fail.n = 0
    handle = pipe.unet.register_forward_pre_hook(fail, with_kwargs=True)
    try:
        with pytest.raises(RuntimeError, match="unet failed"):
            pipe.transfer(content, style, num_inference_steps=3, cache_style=False, output_type="pt")
    finally:
        handle.remove()
    assert _same_processors(pipe, before)


class _Recorder(SamplerHook):
    def __init__(self, replace=None):
        self.replace, self.events, self.extras = replace, [], None

    def init_latents(self, state, latents):
        self.events.append("init")
        self.extras = dict(state.extras)
        self.seen = latents.clone()
        return latents if self.replace is None else self.replace(state, latents)

    def step_begin(self, state):
        self.events.append(("begin", state.step_index, int(state.timestep)))

    def step_end(self, state):
        self.events.append(("end", state.step_index))


def test_hooks_see_the_start_point_and_every_step(pipe, images):
    content, style, _ = images
    hook = _Recorder()
    out = pipe.transfer(content, style, num_inference_steps=STEPS, hooks=[hook], content_prompt="a cat",
                        style_prompt="a dog", output_type="pt")
    extras = hook.extras
    assert hook.events[0] == "init" and sum(e[0] == "begin" for e in hook.events[1:]) == STEPS
    assert [e[2] for e in hook.events if e[0] == "begin"] == [int(t) for t in _ddim(pipe, STEPS).timesteps]
    assert extras["content_prompt"] == "a cat" and extras["style_prompt"] == "a dog"
    assert torch.equal(hook.seen, adain_latents(extras["content_zT"], extras["style_zT"]))
    assert torch.equal(out.start_latents, hook.seen)
    assert torch.equal(extras["content_image"], content)

    # a start-point hook: replacing the AdaIN start by the content's z_T equals init_adain=False
    swap = _Recorder(replace=lambda state, latents: state.extras["content_zT"])
    swapped = pipe.transfer(content, style, num_inference_steps=STEPS, hooks=[swap], output_type="pt")
    plain = pipe.transfer(content, style, num_inference_steps=STEPS, init_adain=False, output_type="pt")
    assert torch.equal(swapped.images, plain.images)
    assert not torch.allclose(plain.images, out.images, atol=1e-4)


# ---------------------------------------------------------------------------- inputs, outputs, loading


def test_inputs_and_output_types(pipe, images):
    content, style, _ = images
    arr = (content[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    pil = PIL.Image.fromarray(arr)
    small_style = torch.rand(1, 3, 24, 40, generator=torch.Generator().manual_seed(5))  # another size
    out = pipe.transfer(pil, small_style, num_inference_steps=2)
    assert isinstance(out.images[0], PIL.Image.Image) and out.images[0].size == (32, 32)
    np_out = pipe.transfer(arr, style[0], num_inference_steps=2, output_type="np").images
    assert np_out.shape == (1, 32, 32, 3) and np_out.dtype == np.float32
    pt = pipe.transfer(arr, style[0], num_inference_steps=2, output_type="pt")
    assert pt.images.shape == (1, 3, 32, 32) and pt.start_latents.shape == (1, 4, 16, 16)
    assert pt.layers == list(styleid_layers(pipe.unet))
    named = pipe.transfer(arr, style[0], num_inference_steps=2, layers=[n[: -len(".processor")] for n in pt.layers],
                          output_type="pt")
    assert torch.equal(named.images, pt.images)


def test_from_pipe_shares_components_and_call_is_stock(tiny_sd_dir):
    stock = StableDiffusionPipeline.from_pretrained(tiny_sd_dir)
    stock.set_progress_bar_config(disable=True)
    ours = StyleIDStableDiffusionPipeline.from_pipe(stock)
    assert ours.unet is stock.unet and ours.vae is stock.vae
    kwargs = dict(num_inference_steps=2, height=32, width=32, output_type="np")
    a = stock("a cat", generator=torch.Generator().manual_seed(0), **kwargs).images
    b = ours("a cat", generator=torch.Generator().manual_seed(0), **kwargs).images
    assert np.array_equal(a, b)


class _OnLayer(SamplerHook):
    def __init__(self, name):
        self.attention_layers = frozenset({name})


def test_errors_before_any_model_call(pipe, images, counter):
    content, style, _ = images
    cases = [
        (dict(gamma=-0.1), "gamma"),
        (dict(gamma=1.5), "gamma"),
        (dict(gamma=float("nan")), "gamma"),
        (dict(temperature=0), "temperature"),
        (dict(temperature=-1.0), "temperature"),
        (dict(num_inference_steps=0), "num_inference_steps"),
        (dict(output_type="jpg"), "output_type"),
        (dict(layers="all"), "layers"),
        (dict(layers=[]), "layers"),
        (dict(layers=["up_blocks.9.attentions.0.transformer_blocks.0.attn1"]), "not an attention layer"),
        (dict(layers=["up_blocks.1.attentions.0.transformer_blocks.0.attn2"]), "cross-attention"),
        (dict(layers=["up_blocks.1.attentions.0.transformer_blocks.0.attn1"] * 2), "twice"),
        (dict(hooks=[APG()]), "guidance slot"),
        (dict(hooks=[_OnLayer("up_blocks.1.attentions.1.transformer_blocks.0.attn1.processor")]), "StyleID injects into"),
        (dict(content_prompt=3), "content_prompt"),
        (dict(init_adain=1), "init_adain"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            pipe.transfer(content, style, **{"num_inference_steps": 2, **kwargs})
    with pytest.raises(ValueError, match=r"content_image: size 31x32 is not divisible by the VAE factor 2"):
        pipe.transfer(torch.rand(1, 3, 32, 31), style, num_inference_steps=2)
    with pytest.raises(ValueError, match="style_image: tensor values outside"):
        pipe.transfer(content, style * 2, num_inference_steps=2)
    with pytest.raises(ValueError, match="style_image: PIL mode 'L'"):
        pipe.transfer(content, PIL.Image.new("L", (32, 32)), num_inference_steps=2)
    with pytest.raises(ValueError, match="content_image: 2 images"):
        pipe.transfer(torch.cat([content, content]), style, num_inference_steps=2)
    assert counter.calls == 0
    assert attention_layers(pipe.unet, "self")  # the UNet is untouched
