"""Uniform cross-attention and MasaCtrl processors against slow explicit references; install/restore."""

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from guidekit.hooks import SamplerHook

from guidekit.attention import (
    MutualControl,
    MutualSelfAttnProcessor,
    SwitchedUniformProcessor,
    UniformAttention,
    UniformControl,
    UniformCrossAttnProcessor,
    attention_layers,
    pair_kv_rows,
    replaced_processors,
)

torch.set_num_threads(1)


def _attn(cross_dim=None, seed=0):
    torch.manual_seed(seed)
    attn = Attention(query_dim=16, cross_attention_dim=cross_dim, heads=2, dim_head=8, bias=True)
    for p in attn.parameters():  # non-trivial biases too
        torch.nn.init.normal_(p, std=0.3)
    return attn.eval()


def _explicit(attn, h, kv_source, uniform):
    """Slow reference: per-head maps written out; `uniform` replaces the softmax by ones/N."""
    q, k, v = attn.to_q(h), attn.to_k(kv_source), attn.to_v(kv_source)
    b, heads = h.shape[0], attn.heads
    d = q.shape[-1] // heads
    q = q.view(b, -1, heads, d).permute(0, 2, 1, 3)
    k = k.view(b, -1, heads, d).permute(0, 2, 1, 3)
    v = v.view(b, -1, heads, d).permute(0, 2, 1, 3)
    scores = q @ k.transpose(-1, -2) * d**-0.5
    probs = torch.ones_like(scores) / scores.shape[-1] if uniform else scores.softmax(-1)
    out = (probs @ v).permute(0, 2, 1, 3).reshape(b, -1, heads * d)
    return attn.to_out[0](out)


class _ExplicitUniform:
    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        b, c, hh, ww = hidden_states.shape if hidden_states.ndim == 4 else (None,) * 4
        h = hidden_states if hidden_states.ndim == 3 else hidden_states.flatten(2).transpose(1, 2)
        out = _explicit(attn, h, encoder_hidden_states, uniform=True)
        if hidden_states.ndim == 4:
            out = out.transpose(1, 2).reshape(b, c, hh, ww)
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


def test_uniform_equals_explicit_reference_and_ignores_queries():
    attn = _attn(cross_dim=12)
    h = torch.randn(2, 10, 16)
    e = torch.randn(2, 7, 12)
    with torch.no_grad():
        out = UniformCrossAttnProcessor()(attn, h, e)
        ref = _explicit(attn, h, e, uniform=True)
        other = UniformCrossAttnProcessor()(attn, torch.randn(2, 10, 16) * 5, e)
    assert out.shape == ref.shape == (2, 10, 16)
    assert torch.allclose(out, ref, atol=1e-5)
    # the same vector at every spatial position, and independent of the queries
    assert torch.allclose(out, out[:, :1].expand_as(out), atol=1e-6)
    assert torch.allclose(out, other, atol=1e-6)
    # and it really is the token average of V: different text gives a different output
    with torch.no_grad():
        assert not torch.allclose(out, UniformCrossAttnProcessor()(attn, h, torch.randn(2, 7, 12)), atol=1e-3)


def test_uniform_rejects_self_attention_and_masks():
    attn = _attn(cross_dim=12)
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        UniformCrossAttnProcessor()(attn, torch.randn(1, 4, 16), None)
    with pytest.raises(ValueError, match="attention_mask"):
        UniformCrossAttnProcessor()(attn, torch.randn(1, 4, 16), torch.randn(1, 3, 12), torch.zeros(1, 3))


def test_uniform_on_whole_unet_matches_explicit_processor(tiny_sd_dir):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_sd_dir, subfolder="unet").eval()
    cross = attention_layers(unet, "cross")
    x, e = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 32)
    with torch.no_grad():
        with replaced_processors(unet, {n: UniformCrossAttnProcessor() for n in cross}):
            fast = unet(x, 10, encoder_hidden_states=e).sample
        with replaced_processors(unet, {n: _ExplicitUniform() for n in cross}):
            slow = unet(x, 10, encoder_hidden_states=e).sample
        normal = unet(x, 10, encoder_hidden_states=e).sample
    assert torch.allclose(fast, slow, atol=1e-5)
    assert not torch.allclose(fast, normal, atol=1e-4)


def test_switched_uniform_rows():
    attn = _attn(cross_dim=12)
    attn.set_processor(AttnProcessor2_0())
    h, e = torch.randn(3, 10, 16), torch.randn(3, 7, 12)
    control = UniformControl(enabled=True, rows=torch.tensor([True, False, True]))
    proc = SwitchedUniformProcessor(AttnProcessor2_0(), control)
    with torch.no_grad():
        out = proc(attn, h, e)
        assert torch.allclose(out[[0, 2]], _explicit(attn, h[[0, 2]], e[[0, 2]], uniform=True), atol=1e-5)
        assert torch.allclose(out[1], _explicit(attn, h[1:2], e[1:2], uniform=False)[0], atol=1e-5)
        control.set(False)
        assert torch.allclose(proc(attn, h, e), _explicit(attn, h, e, uniform=False), atol=1e-5)


def test_mutual_self_attention_reads_source_keys_values():
    attn = _attn()
    h = torch.randn(4, 10, 16)  # [src_u, tgt_u, src_c, tgt_c]
    kv = pair_kv_rows(num_pairs=1, num_groups=2)
    assert kv.tolist() == [0, 0, 2, 2]
    control = MutualControl()
    proc = MutualSelfAttnProcessor(AttnProcessor2_0(), control)
    with torch.no_grad():
        plain = proc(attn, h)  # disabled: the original processor
        assert torch.allclose(plain, _explicit(attn, h, h, uniform=False), atol=1e-5)
        control.set(True, kv)
        out = proc(attn, h)
        for row, src in enumerate(kv.tolist()):
            ref = _explicit(attn, h[row : row + 1], h[src : src + 1], uniform=False)
            assert torch.allclose(out[row : row + 1], ref, atol=1e-5)
        control.set(True, torch.arange(4))
        assert torch.allclose(proc(attn, h), plain, atol=1e-5)
    assert pair_kv_rows(2, 1).tolist() == [0, 1, 0, 1]


def test_attention_layers_in_call_order(tiny_sd_dir):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_sd_dir, subfolder="unet")
    cross, self_ = attention_layers(unet, "cross"), attention_layers(unet, "self")
    assert [n.split(".")[0] for n in cross] == ["down_blocks", "mid_block", "up_blocks", "up_blocks"]
    assert all(n.endswith("attn2.processor") for n in cross) and all(n.endswith("attn1.processor") for n in self_)
    with pytest.raises(ValueError, match="kind"):
        attention_layers(unet, "both")


def test_replaced_processors_restores_after_exception(tiny_sd_dir):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_sd_dir, subfolder="unet")
    before = dict(unet.attn_processors)
    with replaced_processors(unet, {n: UniformCrossAttnProcessor() for n in attention_layers(unet)}):
        assert any(isinstance(p, UniformCrossAttnProcessor) for p in unet.attn_processors.values())
    assert all(unet.attn_processors[k] is v for k, v in before.items())
    with pytest.raises(RuntimeError, match="boom"):
        with replaced_processors(unet, {n: UniformCrossAttnProcessor() for n in attention_layers(unet)}):
            raise RuntimeError("boom")
    assert all(unet.attn_processors[k] is v for k, v in before.items())


def test_uniform_hook_in_guided_pipeline_restores(tiny_sd_dir):
    from guidekit.pipelines import GuidedStableDiffusionPipeline

    pipe = GuidedStableDiffusionPipeline.from_pretrained(tiny_sd_dir)
    pipe.set_progress_bar_config(disable=True)
    before = dict(pipe.unet.attn_processors)
    kw = dict(num_inference_steps=2, height=16, width=16, output_type="latent")
    plain = pipe("a red circle", generator=torch.Generator().manual_seed(0), **kw).images
    uam = pipe("a red circle", generator=torch.Generator().manual_seed(0), hooks=[UniformAttention()], **kw).images
    assert not torch.allclose(plain, uam)
    assert all(pipe.unet.attn_processors[k] is v for k, v in before.items())

    class Explode(SamplerHook):
        def step_end(self, state):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        pipe("a red circle", hooks=[UniformAttention(), Explode()], **kw)
    assert all(pipe.unet.attn_processors[k] is v for k, v in before.items())
    with pytest.raises(ValueError, match="layers"):
        UniformAttention(layers="self")


def test_uniform_hook_chosen_layers_and_steps(tiny_sd_dir):
    from guidekit.pipelines import GuidedStableDiffusionPipeline

    pipe = GuidedStableDiffusionPipeline.from_pretrained(tiny_sd_dir)
    pipe.set_progress_bar_config(disable=True)
    first = attention_layers(pipe.unet, "cross")[:1]
    uam = UniformAttention(layers=first, start=0.5, stop=1.0)
    seen = []

    class Probe(SamplerHook):
        def step_begin(self, state):
            procs = pipe.unet.attn_processors
            swapped = sorted(n for n, p in procs.items() if isinstance(p, SwitchedUniformProcessor))
            seen.append((state.step_index, procs[first[0]].control.enabled, swapped))  # this call's switch

    pipe("a red circle", num_inference_steps=4, height=16, width=16, output_type="latent", hooks=[uam, Probe()])
    assert [s[1] for s in seen] == [False, False, True, True]
    assert all(s[2] == first for s in seen)
    with pytest.raises(ValueError, match="layers"):
        pipe("a", num_inference_steps=1, height=16, width=16, hooks=[UniformAttention(layers=["nope.processor"])])
