"""The drop-in promise of the hooked pipelines: every stock argument, the stock image, and nothing changed
on the user's objects. Each test reproduces a way the promise can break."""

import logging
import warnings

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    LMSDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)
from diffusers.callbacks import MultiPipelineCallbacks, SDCFGCutoffCallback, SDXLCFGCutoffCallback

import guidekit
from guidekit.attention import UniformAttention
from guidekit.guidance.cfg import rescale_guided
from guidekit.hooks import SamplerHook, SamplerState, scheduler_family
from guidekit.pipelines import (
    GuidedStableDiffusionPipeline,
    GuidedStableDiffusionXLPipeline,
    UAMStableDiffusionPipeline,
)
from guidekit.testing import guidance_pairs
from test_pipelines import load, sd, sdxl  # noqa: F401  (the stock/hooked pipeline pairs, shared fixtures)

PROMPT = "a red circle on a blue background"
KW = dict(num_inference_steps=4, height=32, width=32, output_type="np")


def run(pipe, seed=0, prompt=PROMPT, **kw):
    return pipe(prompt, generator=torch.Generator().manual_seed(seed), **{**KW, **kw}).images


def assert_same(a, b):
    assert a.shape == b.shape
    assert np.abs(a - b).max() <= 1e-5


# ----------------------------------------------------------------------------- callbacks


def test_sd_cfg_cutoff_callback_object_runs_as_in_stock(sd):
    stock, hooked = sd
    kw = dict(guidance_scale=7.5, callback_on_step_end=SDCFGCutoffCallback(cutoff_step_ratio=0.5))
    assert_same(run(stock, **kw), run(hooked, **kw))
    multi = MultiPipelineCallbacks([SDCFGCutoffCallback(cutoff_step_ratio=0.5)])
    assert_same(run(stock, callback_on_step_end=multi), run(hooked, callback_on_step_end=multi))


def test_sdxl_cfg_cutoff_callback_object_runs_as_in_stock(sdxl):
    stock, hooked = sdxl
    kw = dict(guidance_scale=7.0, callback_on_step_end=SDXLCFGCutoffCallback(cutoff_step_ratio=0.5))
    assert_same(run(stock, **kw), run(hooked, **kw))


def test_a_callback_that_changes_the_guidance_scale_mid_run_acts_as_in_stock(sd):
    stock, hooked = sd

    def lower_scale(pipe, i, t, kwargs):
        if i == 1:
            pipe._guidance_scale = 3.0  # diffusers' documented way to change guidance during sampling
        return {}

    a = run(stock, guidance_scale=9.0, callback_on_step_end=lower_scale)
    b = run(hooked, guidance_scale=9.0, callback_on_step_end=lower_scale)
    assert_same(a, b)
    assert np.abs(b - run(hooked, guidance_scale=9.0)).max() > 1e-4  # the change did act


@pytest.mark.parametrize("which", ["sd", "sdxl"])
def test_deprecated_callback_arguments_are_accepted_as_in_stock(which, request):
    stock, hooked = request.getfixturevalue(which)
    calls = {"stock": [], "hooked": []}

    def recorder(name):
        return lambda step, t, latents: calls[name].append((step, int(t), float(latents.abs().mean())))

    with pytest.warns(FutureWarning, match="callback"):
        a = run(stock, callback=recorder("stock"), callback_steps=2)
    with pytest.warns(FutureWarning, match="callback"):
        b = run(hooked, callback=recorder("hooked"), callback_steps=2)
    assert_same(a, b)
    assert [c[:2] for c in calls["hooked"]] == [c[:2] for c in calls["stock"]] and len(calls["hooked"]) == 2
    with pytest.raises(ValueError, match="callback_steps"):
        run(hooked, callback=recorder("hooked"), callback_steps=0)


# ----------------------------------------------------------------------------- arguments


def test_guidance_rescale_acts_under_apg_on_its_output():
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False)
    scheduler.set_timesteps(3)
    (conds, unconds), x = guidance_pairs(n_steps=2), torch.randn(3, 4, 6, 6, generator=torch.Generator().manual_seed(5))
    for cond, uncond in zip(conds, unconds):
        state = SamplerState(num_steps=3, scheduler=scheduler, guidance_scale=9.0, guidance_rescale=0.0)
        state.update(0, scheduler.timesteps[0], x, x)
        plain = guidekit.APG().guide(state, cond, uncond)
        state = SamplerState(num_steps=3, scheduler=scheduler, guidance_scale=9.0, guidance_rescale=0.7)
        state.update(0, scheduler.timesteps[0], x, x)
        rescaled = guidekit.APG().guide(state, cond, uncond)
        torch.testing.assert_close(rescaled, rescale_guided(plain, cond, 0.7))
        own = guidekit.APG(guidance_rescale=0.7)
        state.guidance_rescale = 0.0
        torch.testing.assert_close(own.guide(state, cond, uncond), rescaled)


def test_guidance_rescale_changes_the_apg_image(sd):
    _, hooked = sd
    a = run(hooked, guidance_scale=9.0, hooks=[guidekit.APG()])
    b = run(hooked, guidance_scale=9.0, guidance_rescale=0.7, hooks=[guidekit.APG()])
    assert np.abs(a - b).max() > 1e-4


def test_non_square_sample_size_gives_the_stock_size(tiny_sd_dir):
    components = load(StableDiffusionPipeline, tiny_sd_dir).components
    components["unet"].register_to_config(sample_size=[8, 12])
    stock, hooked = StableDiffusionPipeline(**components), GuidedStableDiffusionPipeline(**components)
    for pipe in (stock, hooked):
        pipe.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=2, output_type="np")
    a = stock(PROMPT, generator=torch.Generator().manual_seed(0), **kw).images
    b = hooked(PROMPT, generator=torch.Generator().manual_seed(0), **kw).images
    assert a.shape == b.shape == (1, 16, 24, 3)
    assert_same(a, b)
    # a height given alone is used (documented; stock SD would replace it by the default)
    assert hooked(PROMPT, height=32, **kw).images.shape == (1, 32, 24, 3)


def test_a_single_hook_is_accepted_and_other_values_are_named(sd):
    _, hooked = sd
    assert_same(run(hooked, guidance_scale=9.0, hooks=guidekit.APG()), run(hooked, guidance_scale=9.0, hooks=[guidekit.APG()]))
    with pytest.raises(ValueError, match="hooks: 'apg' is not accepted; accepted: a guidekit SamplerHook"):
        run(hooked, hooks="apg")


def test_negative_guidance_scale_behaves_as_in_stock(sd):
    stock, hooked = sd
    assert_same(run(stock, guidance_scale=-2.0), run(hooked, guidance_scale=-2.0))
    with pytest.raises(ValueError, match="guidance_scale: nan is not accepted"):
        run(hooked, guidance_scale=float("nan"))


def test_signatures_take_every_stock_argument():
    import inspect

    for stock, ours in ((StableDiffusionPipeline, GuidedStableDiffusionPipeline),
                        (StableDiffusionXLPipeline, GuidedStableDiffusionXLPipeline)):
        theirs = inspect.signature(stock.__call__).parameters
        mine = inspect.signature(ours.__call__).parameters
        for name, parameter in theirs.items():
            assert name in mine, f"{ours.__name__} lacks {name}"
            if name not in ("guidance_scale", "self", "kwargs"):
                assert mine[name].default == parameter.default, name
        assert f"effective default {theirs['guidance_scale'].default}" in ours.__call__.__doc__


# ----------------------------------------------------------------------------- hook points


class BeginRaises(SamplerHook):
    def begin(self, state):
        raise RuntimeError("begin failed")


def test_processors_are_put_back_when_a_later_hook_begin_raises(tiny_sd_dir):
    pipe = load(GuidedStableDiffusionPipeline, tiny_sd_dir)
    before = {k: type(v) for k, v in pipe.unet.attn_processors.items()}
    with pytest.raises(RuntimeError, match="begin failed"):
        run(pipe, hooks=[UniformAttention(), BeginRaises()])
    assert {k: type(v) for k, v in pipe.unet.attn_processors.items()} == before


class X0Recorder(SamplerHook):
    """Records x0 of the guided prediction at `correct` and again at `step_end`."""

    def __init__(self):
        self.at_correct, self.at_step_end = [], []

    def correct(self, state, pred):
        self.pred = pred
        self.at_correct.append(state.to_x0(pred))
        return pred

    def step_end(self, state):
        self.at_step_end.append(state.to_x0(self.pred))


@pytest.mark.parametrize("scheduler_cls", [EulerDiscreteScheduler, LMSDiscreteScheduler, DPMSolverMultistepScheduler, DDIMScheduler])
def test_x0_conversions_hold_in_step_end(tiny_sd_dir, scheduler_cls):
    pipe = load(GuidedStableDiffusionPipeline, tiny_sd_dir)
    pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config)
    recorder = X0Recorder()
    run(pipe, hooks=[recorder])
    assert len(recorder.at_step_end) == KW["num_inference_steps"]
    for a, b in zip(recorder.at_correct, recorder.at_step_end):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9 * float(a.abs().max()))


class CondOnlyGuidance(SamplerHook):
    """A guidance hook that never asks for the unconditional pass (as a CFG cutoff or EluCD alone would)."""

    slot = "guidance"

    def guide(self, state, pred_cond, pred_uncond):
        assert pred_uncond is None
        return pred_cond


def test_sdxl_cond_only_steps_get_the_positive_micro_conditioning(sdxl):
    stock, hooked = sdxl
    prompts = [PROMPT, "a blue square on a red background"]
    kw = dict(negative_original_size=(8, 8), negative_target_size=(8, 8))
    expected = run(stock, prompt=prompts, guidance_scale=1.0)  # cond only, positive time ids, in stock
    got = run(hooked, prompt=prompts, guidance_scale=7.0, hooks=[CondOnlyGuidance()], **kw)
    assert_same(expected, got)


def test_one_hook_object_serves_interleaved_calls(tiny_sd_dir):
    outer, inner = load(GuidedStableDiffusionPipeline, tiny_sd_dir), load(GuidedStableDiffusionPipeline, tiny_sd_dir)
    apg = guidekit.APG()
    alone = run(outer, guidance_scale=9.0, hooks=[apg])

    def call_inside(pipe, i, t, kwargs):
        # another call with the same hook object and another batch size, between two steps of this one
        run(inner, prompt=[PROMPT, PROMPT], guidance_scale=12.0, hooks=[apg])
        return {}

    interleaved = run(outer, guidance_scale=9.0, hooks=[apg], callback_on_step_end=call_inside)
    np.testing.assert_array_equal(interleaved, alone)


def test_scheduler_subclasses_are_supported_for_x0_conversions():
    class MyDDIM(DDIMScheduler):
        pass

    class MyEuler(EulerDiscreteScheduler):
        pass

    assert scheduler_family(MyDDIM()) == "vp" and scheduler_family(MyEuler()) == "ve"


def test_conversions_follow_the_shared_precision_rule(monkeypatch):
    import guidekit.hooks

    monkeypatch.setattr(guidekit.hooks, "math_dtype", lambda device: torch.float32)  # what MPS gets
    scheduler = DDIMScheduler()
    scheduler.set_timesteps(2)
    state = SamplerState(num_steps=2, scheduler=scheduler)
    x = torch.randn(1, 4, 2, 2)
    state.update(0, scheduler.timesteps[0], x, x)
    assert state.to_x0(x).dtype == torch.float32 and state.from_x0(x).dtype == torch.float32


# ----------------------------------------------------------------------------- attach and from_pipe


@pytest.mark.parametrize("maker", ["attach", "uam_from_pipe", "guided_from_pipe"])
def test_attach_and_from_pipe_leave_dtypes_devices_and_scheduler_unchanged(tiny_sd_dir, maker):
    stock = load(StableDiffusionPipeline, tiny_sd_dir)
    stock.scheduler = DDIMScheduler.from_config(stock.scheduler.config, clip_sample=True)
    stock.unet.to(torch.bfloat16)
    stock.text_encoder.to(torch.bfloat16)  # the VAE stays float32: mixed dtypes must survive too
    dtypes = {k: v.dtype for k, v in stock.components.items() if isinstance(v, torch.nn.Module)}
    devices = {k: v.device for k, v in stock.components.items() if isinstance(v, torch.nn.Module)}
    config = dict(stock.scheduler.config)
    new = {
        "attach": lambda: guidekit.attach(stock, guidekit.APG()),
        "uam_from_pipe": lambda: UAMStableDiffusionPipeline.from_pipe(stock),
        "guided_from_pipe": lambda: GuidedStableDiffusionPipeline.from_pipe(stock),
    }[maker]()
    for name, dtype in dtypes.items():
        assert getattr(stock, name).dtype == dtype and getattr(new, name).dtype == dtype, name
        assert getattr(stock, name).device == devices[name]
        assert getattr(new, name) is getattr(stock, name)  # shared, not copied
    assert dict(stock.scheduler.config) == config
    assert new.scheduler is not stock.scheduler and dict(new.scheduler.config) == config


def test_attach_leaves_the_stock_images_unchanged_with_a_clipping_scheduler(tiny_sd_dir):
    stock = load(StableDiffusionPipeline, tiny_sd_dir)
    stock.scheduler = DDIMScheduler.from_config(stock.scheduler.config, clip_sample=True)
    before = run(stock, guidance_scale=9.0)
    hooked = guidekit.attach(stock, guidekit.APG())
    hooked.set_progress_bar_config(disable=True)
    run(hooked, guidance_scale=9.0)
    np.testing.assert_array_equal(run(stock, guidance_scale=9.0), before)


def test_attach_prints_no_warning(sd, sdxl):
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    root = logging.getLogger("diffusers")
    root.addHandler(handler)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            guidekit.attach(sd[0], guidekit.APG())
            guidekit.attach(sdxl[0], guidekit.APG())
    finally:
        root.removeHandler(handler)
    assert [r.getMessage() for r in records if r.levelno >= logging.WARNING] == []


def test_sdxl_decodes_on_the_vae_execution_device(sdxl, monkeypatch):
    import guidekit.pipelines.guided_sdxl as module

    seen = []
    real = module.get_module_execution_device
    monkeypatch.setattr(module, "get_module_execution_device", lambda m: seen.append(m) or real(m))
    _, hooked = sdxl
    run(hooked)
    assert seen and seen[-1] is hooked.vae


def test_one_uniform_attention_hook_serves_two_pipelines_at_once(tiny_sd_dir):
    outer, inner = load(GuidedStableDiffusionPipeline, tiny_sd_dir), load(GuidedStableDiffusionPipeline, tiny_sd_dir)
    uam = UniformAttention(start=0.5)
    before = {k: type(v) for k, v in inner.unet.attn_processors.items()}
    alone = run(outer, hooks=[uam])

    def call_inside(pipe, i, t, kwargs):
        run(inner, hooks=[uam])  # the same hook object, begun and ended inside the outer call
        return {}

    np.testing.assert_array_equal(run(outer, hooks=[uam], callback_on_step_end=call_inside), alone)
    assert {k: type(v) for k, v in inner.unet.attn_processors.items()} == before
    assert {k: type(v) for k, v in outer.unet.attn_processors.items()} == before
