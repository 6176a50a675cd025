"""StyleID's style cache and inversion precision on tiny random SD components: a cached style is served only
while every input of its inversion is unchanged (text encoder, FreeU, LoRA adapters and their scales, the
models), a swapped-out model is not kept alive by the cache, no K/V are recorded without injection, and the
inversion trajectory stays in float32 in a half-precision pipeline."""

import gc
import weakref

import pytest
import torch
from diffusers import UNet2DConditionModel
from transformers import CLIPTextModel

from guidekit.hooks import SamplerHook
from guidekit.inversion import ddim_invert, ddim_levels
from guidekit.pipelines import StyleIDStableDiffusionPipeline
from test_styleid import _Counter, _ddim

torch.set_num_threads(1)

STEPS = 2


@pytest.fixture
def fresh(tiny_sd_dir):
    """A pipeline of its own: these tests change its components."""
    p = StyleIDStableDiffusionPipeline.from_pretrained(tiny_sd_dir)
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(5)
    return torch.rand(1, 3, 32, 32, generator=g), torch.rand(1, 3, 32, 32, generator=g)


def _transfer(pipe, images, **kwargs):
    return pipe.transfer(*images, num_inference_steps=STEPS, output_type="pt", **kwargs).images


def _served_fresh(pipe, images):
    """The cached call's image equals an uncached call's (the reference: nothing reused)."""
    cached = _transfer(pipe, images)
    uncached = _transfer(pipe, images, cache_style=False)
    return (cached - uncached).abs().max().item()


# ---------------------------------------------------------------------------- what the cache is keyed on


def test_swapping_the_text_encoder_inverts_the_style_again(fresh, images):
    _transfer(fresh, images)  # style cached
    torch.manual_seed(11)
    fresh.text_encoder = CLIPTextModel(fresh.text_encoder.config)  # another empty-prompt embedding
    assert _served_fresh(fresh, images) == 0.0


def test_freeu_inverts_the_style_again(fresh, images):
    base = _transfer(fresh, images)
    fresh.enable_freeu(s1=0.6, s2=0.4, b1=1.8, b2=1.9)
    assert _served_fresh(fresh, images) == 0.0
    assert (_transfer(fresh, images) - base).abs().max() > 1e-3  # FreeU changes the result here
    fresh.disable_freeu()
    assert torch.equal(_transfer(fresh, images), base)


def test_lora_adapters_and_their_scales_invert_the_style_again(fresh, images):
    peft = pytest.importorskip("peft")
    base = _transfer(fresh, images)
    config = peft.LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    torch.manual_seed(3)
    fresh.unet.add_adapter(config, adapter_name="a")
    assert _served_fresh(fresh, images) == 0.0
    with_lora = _transfer(fresh, images)
    assert (with_lora - base).abs().max() > 1e-3
    fresh.unet.set_adapters(["a"], weights=[0.3])  # another scale
    assert _served_fresh(fresh, images) == 0.0
    fresh.unet.disable_adapters()
    assert _served_fresh(fresh, images) == 0.0
    fresh.unet.enable_adapters()
    fresh.unet.set_adapters(["a"], weights=[1.0])
    assert torch.equal(_transfer(fresh, images), with_lora)


# ---------------------------------------------------------------------------- what the cache keeps alive


def test_a_swapped_out_model_is_freed(fresh, images, tiny_sd_dir):
    _transfer(fresh, images)
    old_unet, old_vae = weakref.ref(fresh.unet), weakref.ref(fresh.vae)
    fresh.unet = UNet2DConditionModel.from_pretrained(tiny_sd_dir, subfolder="unet")
    fresh.vae = type(fresh.vae).from_pretrained(tiny_sd_dir, subfolder="vae")
    gc.collect()
    assert old_unet() is None and old_vae() is None
    assert len(fresh._style_cache()) == 0  # its features went with it
    assert _served_fresh(fresh, images) == 0.0


# ---------------------------------------------------------------------------- no wasted work


def test_no_style_features_are_recorded_without_injection(fresh, images):
    counter = _Counter(fresh.unet)
    try:
        _transfer(fresh, images, attn_injection=False)
        (entry,) = fresh._style_cache().values()
        assert entry.features == {}
        counter.calls = 0
        # an injecting call then needs the features: the style is inverted again, as without the cache
        assert _served_fresh(fresh, images) == 0.0
        assert counter.calls == 3 * STEPS + 3 * STEPS
    finally:
        counter.remove()


def test_half_precision_pipeline_keeps_the_inversion_in_float32(fresh, images):
    pipe = fresh.to(torch.bfloat16)
    seen = {}

    class Recorder(SamplerHook):
        def init_latents(self, state, latents):
            seen.update(state.extras)
            return latents

    out = pipe.transfer(*images, num_inference_steps=STEPS, output_type="pt", hooks=[Recorder()], attn_injection=False)
    assert out.start_latents.dtype == torch.float32 and seen["content_zT"].dtype == torch.float32
    # reference: float32 latents throughout, only the UNet (and the VAE) in bfloat16
    null, _ = pipe.encode_prompt([""], "cpu", 1, False)
    levels = ddim_levels(_ddim(pipe, STEPS))

    def model(x, t):
        return pipe.unet(x.to(torch.bfloat16), t, encoder_hidden_states=null).sample.float()

    with torch.no_grad():
        z0 = (pipe.vae.encode((images[0] * 2 - 1).to(torch.bfloat16)).latent_dist.mean * pipe.vae.config.scaling_factor).float()
        ref = ddim_invert(model, z0, levels).latents
    scale = ref.abs().max().item()
    assert (seen["content_zT"] - ref).abs().max().item() < 1e-5 * scale
