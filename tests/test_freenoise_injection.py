"""FreeNoise's motion injection with an IP-Adapter and without classifier-free guidance, against the official
code's rules (VideoCrafter `ddim_mp.py::p_sample_ddim` and `attention_freenoise.py`): the fixed prompt replaces
the text tokens of the conditional pass only, image tokens stay, and a step without the unconditional pass is
not injected."""

import warnings

import pytest
import torch

import guidekit
from guidekit.hooks import SamplerState
from guidekit.pipelines import GuidedAnimateDiffPipeline
from guidekit.testing.animatediff import make_tiny_animatediff
from guidekit.testing.ip_adapter import TINY_IP_ADAPTER_WEIGHTS, save_tiny_ip_adapter
from animatediff_calls import load, video
from tolerance import assert_close_to_scale

TRAVEL = {0: "a red circle", 12: "a blue square"}
INJECTED_PARTS = ("down_blocks", "mid_block")  # the official code's input and middle blocks


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_animatediff(tmp_path_factory.mktemp("tiny-animatediff-injection"), max_length=16)


@pytest.fixture(scope="module")
def ours(tiny_dir):
    return load(GuidedAnimateDiffPipeline, tiny_dir)


@pytest.fixture(scope="module")
def with_ip_adapter(tiny_dir, tmp_path_factory):
    pipe = load(GuidedAnimateDiffPipeline, tiny_dir)
    folder = save_tiny_ip_adapter(pipe.unet, tmp_path_factory.mktemp("tiny-ip-adapter"), image_encoder=False)
    pipe.load_ip_adapter(str(folder), subfolder="", weight_name=TINY_IP_ADAPTER_WEIGHTS, image_encoder_folder=None)
    return pipe


class _Spy:
    """Records the encoder_hidden_states a cross-attention layer gets, then runs the layer's processor."""

    def __init__(self, name, original, log):
        self.name, self.original, self.log = name, original, log

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if isinstance(encoder_hidden_states, tuple):
            text, images = encoder_hidden_states
            recorded = (text.clone(), [image.clone() for image in images])
        else:
            recorded = (encoder_hidden_states.clone(), None)
        self.log.append((self.name, *recorded))
        return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)


def spied_call(pipe, **kwargs):
    """Run one call with every cross-attention layer spied; returns [(layer, step, text, image tokens or None)]."""
    from guidekit.attention import attention_layers

    processors = pipe.unet.attn_processors
    cross = attention_layers(pipe.unet, "cross")
    log, steps = [], []
    pipe.unet.set_attn_processor({**processors, **{n: _Spy(n, processors[n], log) for n in cross}})
    user_callback = kwargs.pop("callback_on_step_end", None)

    def callback(pipeline, i, t, tensors):
        steps.append(len(log))
        return user_callback(pipeline, i, t, tensors) if user_callback else {}

    try:
        video(pipe, 20, prompt=TRAVEL, callback_on_step_end=callback, **kwargs)
    finally:
        pipe.unet.set_attn_processor(processors)
    bounds = [0] + steps
    return [
        (name, step, text, images)
        for step in range(len(steps))
        for name, text, images in log[bounds[step]:bounds[step + 1]]
    ]


def last_prompt(pipe):
    return pipe.encode_prompt(TRAVEL[12], "cpu", 1, False)[0][0]


def test_motion_injection_with_an_ip_adapter_keeps_the_image_tokens(with_ip_adapter):
    # before: AttributeError 'tuple' object has no attribute 'clone' in the injection processor
    pipe = with_ip_adapter
    image_embeds = [torch.randn(2, 1, 8, generator=torch.Generator().manual_seed(4))]  # [negative, positive]
    records = spied_call(pipe, num_inference_steps=4, guidance_scale=5.0, ip_adapter_image_embeds=image_embeds,
                         hooks=[guidekit.FreeNoise(motion_injection=True)])  # steps 0, 2, 3 of 4 inject
    last = last_prompt(pipe)
    per_step = {}
    for name, step, text, images in records:
        assert images is not None, name  # every spatial cross-attention got (text, [image tokens])
        per_step.setdefault(step, []).append((name, text, images))
    assert sorted(per_step) == [0, 1, 2, 3]
    for step, layers in per_step.items():
        reference = [images for name, _, images in layers if name.split(".")[0] == "up_blocks"][0]
        for name, text, images in layers:
            uncond, cond = text.chunk(2)
            injected = step in (0, 2, 3) and name.split(".")[0] in INJECTED_PARTS
            assert bool(cond.eq(last).all()) == injected, (name, step)
            assert not bool(uncond.eq(last).all(dim=(1, 2)).any())  # never in the unconditional pass
            # the image tokens are those of the layers that are never injected, in the same UNet call
            assert len(images) == len(reference)
            for got, expected in zip(images, reference):
                assert torch.equal(got, expected), (name, step)


def test_motion_injection_with_an_ip_adapter_changes_the_video(with_ip_adapter):
    image_embeds = [torch.randn(2, 1, 8, generator=torch.Generator().manual_seed(4))]
    kw = dict(prompt=TRAVEL, ip_adapter_image_embeds=image_embeds)
    plain = video(with_ip_adapter, 20, hooks=[guidekit.FreeNoise()], **kw)
    injected = video(with_ip_adapter, 20, hooks=[guidekit.FreeNoise(motion_injection=True)], **kw)
    assert torch.isfinite(injected).all() and (injected - plain).abs().max() > 1e-4


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_motion_injection_without_guidance_is_refused(ours, scale):
    # the official sampler runs no injection without its unconditional pass; here the call says so
    with pytest.raises(ValueError, match=rf"motion_injection: needs classifier-free guidance.*guidance_scale={scale:g}"):
        video(ours, 20, prompt=TRAVEL, guidance_scale=scale, hooks=[guidekit.FreeNoise(motion_injection=True)])
    assert all(type(p).__name__ != "MotionInjectionProcessor" for p in ours.unet.attn_processors.values())
    # the same call without injection runs
    assert torch.isfinite(video(ours, 20, prompt=TRAVEL, guidance_scale=scale, hooks=[guidekit.FreeNoise()])).all()


def test_steps_without_the_unconditional_pass_are_not_injected(ours):
    def guidance_off_after_the_first_step(pipeline, i, t, tensors):
        pipeline._guidance_scale = 1.0  # a CFG cutoff: steps 1–3 run the conditional pass alone
        return {}

    with pytest.warns(UserWarning, match=r"motion_injection: steps \[2, 3\] ran without the unconditional pass"):
        records = spied_call(ours, num_inference_steps=4, guidance_scale=5.0,
                             callback_on_step_end=guidance_off_after_the_first_step,
                             hooks=[guidekit.FreeNoise(motion_injection=True)])
    last = last_prompt(ours)
    for name, step, text, _ in records:
        assert text.shape[0] == (40 if step == 0 else 20), (name, step)
        cond = text[-20:]
        injected = step == 0 and name.split(".")[0] in INJECTED_PARTS
        assert bool(cond.eq(last).all()) == injected, (name, step)
    assert not any(m._forward_pre_hooks for m in ours.unet.modules())


def test_guided_steps_do_not_warn(ours):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        video(ours, 20, prompt=TRAVEL, num_inference_steps=2, guidance_scale=5.0,
              hooks=[guidekit.FreeNoise(motion_injection=True)])


def test_injection_blocks_without_cross_attention_are_refused(ours, monkeypatch):
    from guidekit.attention import freenoise

    state = SamplerState(num_steps=1, scheduler=ours.scheduler, guidance_scale=5.0,
                         extras={"pipeline": ours, "fixed_prompt_embeds": torch.zeros(4, 32)})
    hook = guidekit.FreeNoise(motion_injection=True, injection_blocks=("up",))
    ours._guidance_scale = 5.0
    hook.validate(state)
    monkeypatch.setattr(freenoise, "injection_layers", lambda unet, blocks: [])
    with pytest.raises(ValueError, match="injection_blocks: .*hold no cross-attention layer"):
        hook.validate(state)


def test_motion_injection_with_an_ip_adapter_is_exact_in_chunks(with_ip_adapter):
    # the spatial chunks split the (text, [image tokens]) pair row by row; injection then acts per chunk
    image_embeds = [torch.randn(2, 1, 8, generator=torch.Generator().manual_seed(5))]
    kw = dict(prompt=TRAVEL, ip_adapter_image_embeds=image_embeds)
    whole = video(with_ip_adapter, 20, hooks=[guidekit.FreeNoise(motion_injection=True)], **kw)
    chunked = video(with_ip_adapter, 20, hooks=[guidekit.FreeNoise(motion_injection=True, spatial_chunk=7)], **kw)
    assert_close_to_scale(chunked, whole, rel=1e-5)
