"""Uniform maps and MasaCtrl wrappers on IP-Adapter layers, and cross_attention_kwargs reaching wrapped processors.

diffusers' IP-Adapter processors receive (text tokens, [image-prompt tokens]) as `encoder_hidden_states` and
compute to_out(attn(Q, text) + Σ_k s_k attn(Q, image_k)); uniform maps replace only the text map. diffusers'
`Attention.forward` passes a processor only the cross_attention_kwargs its `__call__` names, so a wrapping
processor must name what the wrapped one accepts (e.g. `ip_adapter_masks`).
"""

import inspect

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention, AttnProcessor2_0, IPAdapterAttnProcessor2_0

from guidekit.attention import (
    MutualControl,
    MutualSelfAttnProcessor,
    SwitchedUniformProcessor,
    UniformControl,
    UniformCrossAttnProcessor,
    attention_layers,
    replaced_processors,
)

torch.set_num_threads(1)

CROSS_DIM, IMAGE_EMBED_DIM, IP_TOKENS = 12, 6, 4


def _ip_layer(seed=0, scale=0.7):
    """An Attention cross-attention layer with an IP-Adapter processor (random weights, non-trivial biases)."""
    torch.manual_seed(seed)
    attn = Attention(query_dim=16, cross_attention_dim=CROSS_DIM, heads=2, dim_head=8, bias=True)
    proc = IPAdapterAttnProcessor2_0(hidden_size=16, cross_attention_dim=CROSS_DIM, num_tokens=(IP_TOKENS,), scale=scale)
    for p in list(attn.parameters()) + list(proc.parameters()):
        torch.nn.init.normal_(p, std=0.3)
    attn.set_processor(proc)
    return attn.eval(), proc


def _inputs(batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(batch, 10, 16, generator=g)
    text = torch.randn(batch, 7, CROSS_DIM, generator=g)
    image = [torch.randn(batch, 1, IP_TOKENS, CROSS_DIM, generator=g)]  # (B, images, tokens, dim)
    return h, text, image


def _explicit_uniform_ip(attn, proc, h, text, image):
    """Slow reference: ones/N over the text tokens, softmax over the image tokens, summed before to_out."""
    b, heads = h.shape[0], attn.heads
    d = attn.inner_dim // heads
    text_part = attn.to_v(text).mean(dim=1, keepdim=True).expand(b, h.shape[1], -1)
    q = attn.to_q(h).view(b, -1, heads, d).transpose(1, 2)
    k = proc.to_k_ip[0](image[0][:, 0]).view(b, -1, heads, d).transpose(1, 2)
    v = proc.to_v_ip[0](image[0][:, 0]).view(b, -1, heads, d).transpose(1, 2)
    probs = (q @ k.transpose(-1, -2) * d**-0.5).softmax(-1)
    image_part = (probs @ v).transpose(1, 2).reshape(b, -1, heads * d)
    return attn.to_out[0](text_part + proc.scale[0] * image_part)


# ---------------------------------------------------------------------------------------------- one layer


def test_uniform_maps_on_ip_adapter_layer_keep_the_image_branch():
    attn, proc = _ip_layer()
    h, text, image = _inputs()
    switched = SwitchedUniformProcessor(proc, UniformControl(enabled=True))
    with torch.no_grad():
        out = switched(attn, h, (text, image))
        ref = _explicit_uniform_ip(attn, proc, h, text, image)
        plain = proc(attn, h, (text, image))
    assert torch.allclose(out, ref, atol=1e-5)
    assert not torch.allclose(out, plain, atol=1e-3)
    # with the image prompt's scale at 0 only the text branch is left: plain uniform maps on the text
    proc.scale = [0.0]
    with torch.no_grad():
        assert torch.allclose(switched(attn, h, (text, image)), UniformCrossAttnProcessor()(attn, h, text), atol=1e-6)


def test_uniform_on_ip_adapter_layer_with_concatenated_tokens():
    # the older layout, image-prompt tokens appended to the text tokens: the same split as diffusers'
    attn, proc = _ip_layer()
    h, text, image = _inputs()
    switched = SwitchedUniformProcessor(proc, UniformControl(enabled=True))
    with torch.no_grad():
        out = switched(attn, h, torch.cat([text, image[0][:, 0]], dim=1))
        assert torch.allclose(out, switched(attn, h, (text, image)), atol=1e-6)


def test_uniform_rows_on_ip_adapter_layer():
    attn, proc = _ip_layer()
    h, text, image = _inputs(batch=3)
    control = UniformControl(enabled=True, rows=torch.tensor([True, False, True]))
    switched = SwitchedUniformProcessor(proc, control)
    with torch.no_grad():
        out = switched(attn, h, (text, image))
        ref = _explicit_uniform_ip(attn, proc, h, text, image)
        plain = proc(attn, h, (text, image))
    assert torch.allclose(out[[0, 2]], ref[[0, 2]], atol=1e-5)
    assert torch.allclose(out[1], plain[1], atol=1e-5)


def test_uniform_without_ip_weights_refuses_the_tuple_layout():
    attn, _ = _ip_layer()
    h, text, image = _inputs()
    with pytest.raises(ValueError, match="encoder_hidden_states: a \\(text, image-prompt\\) tuple.*IP-Adapter"):
        UniformCrossAttnProcessor()(attn, h, (text, image))
    with pytest.raises(ValueError, match="IP-Adapter.*AttnProcessor2_0"):
        SwitchedUniformProcessor(AttnProcessor2_0(), UniformControl(enabled=True))(attn, h, (text, image))


# ---------------------------------------------------------------------------------------------- kwargs


def _masks(batch):
    mask = torch.zeros(1, 1, 4, 4)  # IPAdapterMaskProcessor layout: (1, images, H, W); image prompt on the left half
    mask[..., :2] = 1
    return [mask]


def test_wrappers_present_the_wrapped_processors_parameters():
    _, proc = _ip_layer()
    expected = list(inspect.signature(proc.__call__).parameters)
    assert "ip_adapter_masks" in expected
    for wrapper in (SwitchedUniformProcessor(proc, UniformControl(False)), MutualSelfAttnProcessor(proc, MutualControl())):
        assert list(inspect.signature(wrapper.__call__).parameters) == expected
    nested = SwitchedUniformProcessor(SwitchedUniformProcessor(proc, UniformControl(False)), UniformControl(False))
    assert list(inspect.signature(nested.__call__).parameters) == expected


def test_switched_off_wrapper_passes_ip_adapter_masks_like_the_wrapped_processor():
    # through Attention.forward, which filters cross_attention_kwargs by the processor's signature
    attn, proc = _ip_layer()
    h, text, image = _inputs()
    h = torch.randn(2, 16, 16, generator=torch.Generator().manual_seed(4))  # a 4x4 map, as the masks expect
    kwargs = {"ip_adapter_masks": _masks(2)}
    with torch.no_grad():
        attn.set_processor(proc)
        plain = attn(h, encoder_hidden_states=(text, image), **kwargs)
        unmasked = attn(h, encoder_hidden_states=(text, image))
        assert not torch.allclose(plain, unmasked, atol=1e-4)  # the masks matter
        for wrapper in (SwitchedUniformProcessor(proc, UniformControl(False)), MutualSelfAttnProcessor(proc, MutualControl())):
            attn.set_processor(wrapper)
            assert torch.equal(attn(h, encoder_hidden_states=(text, image), **kwargs), plain), type(wrapper).__name__
        # switched on, the masks still shape the image branch
        attn.set_processor(SwitchedUniformProcessor(proc, UniformControl(True)))
        on_masked = attn(h, encoder_hidden_states=(text, image), **kwargs)
        on_unmasked = attn(h, encoder_hidden_states=(text, image))
    assert not torch.allclose(on_masked, on_unmasked, atol=1e-4)


class _FlaggedProcessor(AttnProcessor2_0):
    """A user's processor with its own keyword (diffusers passes it only because __call__ names it)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, boost=1.0):
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb) * boost


def test_switched_off_wrapper_passes_a_custom_keyword():
    attn, _ = _ip_layer()
    h, text, _ = _inputs()
    with torch.no_grad():
        attn.set_processor(_FlaggedProcessor())
        plain = attn(h, encoder_hidden_states=text, boost=2.0)
        attn.set_processor(SwitchedUniformProcessor(_FlaggedProcessor(), UniformControl(False)))
        wrapped = attn(h, encoder_hidden_states=text, boost=2.0)
    assert torch.equal(wrapped, plain)


# ---------------------------------------------------------------------------------------------- a whole UNet


def _hidden_size(unet, name):
    """Channels of the block a processor name belongs to (as `unet._load_ip_adapter_weights` reads them)."""
    channels = list(unet.config.block_out_channels)
    if name.startswith("mid_block"):
        return channels[-1]
    block = int(name.split(".")[1])
    return channels[block] if name.startswith("down_blocks") else list(reversed(channels))[block]


def _ip_adapter_state_dict(unet, seed=0):
    """An IP-Adapter checkpoint in the layout `unet._load_ip_adapter_weights` reads, with random weights.

    Its attention keys count the cross-attention layers in processor order: 1, 3, 5, ...
    """
    g = torch.Generator().manual_seed(seed)
    cross = unet.config.cross_attention_dim
    image_proj = {
        "proj.weight": torch.randn(IP_TOKENS * cross, IMAGE_EMBED_DIM, generator=g) * 0.3,
        "proj.bias": torch.zeros(IP_TOKENS * cross),
        "norm.weight": torch.ones(cross),
        "norm.bias": torch.zeros(cross),
    }
    ip_adapter = {}
    cross_layers = [n for n in unet.attn_processors if n.endswith("attn2.processor")]
    for key_id, name in zip(range(1, 2 * len(cross_layers), 2), cross_layers):
        for kind in ("to_k_ip", "to_v_ip"):
            ip_adapter[f"{key_id}.{kind}.weight"] = torch.randn(_hidden_size(unet, name), cross, generator=g) * 0.3
    return {"image_proj": image_proj, "ip_adapter": ip_adapter}


@pytest.fixture(scope="module")
def ip_unet(tiny_sd_dir):
    unet = UNet2DConditionModel.from_pretrained(tiny_sd_dir, subfolder="unet").eval()
    unet._load_ip_adapter_weights([_ip_adapter_state_dict(unet)])
    return unet


def _unet_inputs(seed=2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=g)
    text = torch.randn(2, 77, 32, generator=g)
    image_embeds = [torch.randn(2, 1, IMAGE_EMBED_DIM, generator=g)]
    return x, text, {"image_embeds": image_embeds}


def test_uniform_attention_runs_on_an_ip_adapter_unet(ip_unet):
    cross = attention_layers(ip_unet, "cross")
    original = ip_unet.attn_processors
    assert all(isinstance(original[n], IPAdapterAttnProcessor2_0) for n in cross)
    x, text, added = _unet_inputs()
    control = UniformControl(enabled=True)
    with torch.no_grad():
        with replaced_processors(ip_unet, {n: SwitchedUniformProcessor(original[n], control) for n in cross}):
            uniform = ip_unet(x, 10, encoder_hidden_states=text, added_cond_kwargs=added).sample
            control.set(False)
            off = ip_unet(x, 10, encoder_hidden_states=text, added_cond_kwargs=added).sample
        plain = ip_unet(x, 10, encoder_hidden_states=text, added_cond_kwargs=added).sample
        # the image prompt still acts under uniform maps: a different image embedding, a different output
        other = {"image_embeds": [added["image_embeds"][0] * -1]}
        control.set(True)
        with replaced_processors(ip_unet, {n: SwitchedUniformProcessor(original[n], control) for n in cross}):
            uniform_other = ip_unet(x, 10, encoder_hidden_states=text, added_cond_kwargs=other).sample
    assert torch.isfinite(uniform).all()
    assert torch.equal(off, plain)
    assert not torch.allclose(uniform, plain, atol=1e-4)
    assert not torch.allclose(uniform, uniform_other, atol=1e-4)


def test_uniform_attention_hook_with_an_ip_adapter_image_prompt(tiny_sd_dir):
    from guidekit.attention import UniformAttention
    from guidekit.pipelines import GuidedStableDiffusionPipeline

    pipe = GuidedStableDiffusionPipeline.from_pretrained(tiny_sd_dir)
    pipe.set_progress_bar_config(disable=True)
    pipe.unet._load_ip_adapter_weights([_ip_adapter_state_dict(pipe.unet)])
    before = dict(pipe.unet.attn_processors)
    g = torch.Generator().manual_seed(3)
    embeds = [torch.randn(2, 1, IMAGE_EMBED_DIM, generator=g)]  # (negative, positive) image embeddings, as with CFG
    kw = dict(num_inference_steps=2, height=16, width=16, output_type="latent", ip_adapter_image_embeds=embeds)
    plain = pipe("a red circle", generator=torch.Generator().manual_seed(0), **kw).images
    uam = pipe("a red circle", generator=torch.Generator().manual_seed(0), hooks=[UniformAttention()], **kw).images
    assert torch.isfinite(uam).all() and not torch.allclose(plain, uam, atol=1e-4)
    assert all(pipe.unet.attn_processors[k] is v for k, v in before.items())
