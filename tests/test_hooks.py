"""The sampler-hook interface: x0 conversions per scheduler, composition rules, argument errors."""

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)

import guidekit
from tolerance import assert_close_to_scale
from guidekit.hooks import HookChain, HookConflictError, SamplerHook, SamplerState, resolve_guidance_scale

SD_SCHEDULE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
SCHEDULERS = [
    DDIMScheduler,
    DDPMScheduler,
    PNDMScheduler,
    EulerDiscreteScheduler,
    EulerAncestralDiscreteScheduler,
    LMSDiscreteScheduler,
    DPMSolverMultistepScheduler,
]


def step_with_reference_x0(scheduler, pred, t, latents):
    """Advance the scheduler as a sampling loop does; return (next latents, the scheduler's own x0 or None)."""
    reference = None
    if isinstance(scheduler, DPMSolverMultistepScheduler):
        if scheduler.step_index is None:
            scheduler._init_step_index(t)
        reference = scheduler.convert_model_output(pred, sample=latents)
    generator = torch.Generator().manual_seed(0)
    kwargs = {"generator": generator} if isinstance(scheduler, (DDPMScheduler, EulerAncestralDiscreteScheduler)) else {}
    out = scheduler.step(pred, t, latents, **kwargs)
    if reference is None:
        reference = getattr(out, "pred_original_sample", None)  # PNDM exposes none
    return out.prev_sample, reference


@pytest.mark.parametrize("cls", SCHEDULERS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_x0_conversions_round_trip_and_match_the_scheduler(cls, prediction_type):
    # from_config drops the keys a scheduler does not take (clip_sample: DDIM/DDPM clip x0 by default)
    scheduler = cls.from_config(dict(SD_SCHEDULE, clip_sample=False, prediction_type=prediction_type))
    scheduler.set_timesteps(8)
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64) * scheduler.init_noise_sigma
    for i, t in enumerate(scheduler.timesteps[:4]):
        model_input = scheduler.scale_model_input(latents, t)
        state = SamplerState(num_steps=8, scheduler=scheduler, prediction_type=prediction_type)
        state.update(i, t, latents, model_input)
        pred = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
        x0 = state.to_x0(pred)
        torch.testing.assert_close(state.from_x0(x0), pred, rtol=1e-9, atol=1e-9)
        next_latents, reference = step_with_reference_x0(scheduler, pred, t, latents)
        if reference is not None:
            # schedulers keep sigmas in float32, hence the float32-level tolerance
            assert_close_to_scale(x0, reference.to(torch.float64), rel=1e-5)
        elif prediction_type == "epsilon":  # PNDM: the VP formula by hand
            ab = scheduler.alphas_cumprod[int(t)].double()
            torch.testing.assert_close(x0, (latents - (1 - ab).sqrt() * pred) / ab.sqrt())
        latents = next_latents


def test_sample_prediction_is_identity():
    scheduler = DDIMScheduler(**SD_SCHEDULE, prediction_type="sample")
    scheduler.set_timesteps(4)
    state = SamplerState(num_steps=4, scheduler=scheduler, prediction_type="sample")
    x = torch.randn(1, 4, 4, 4, dtype=torch.float64)
    state.update(0, scheduler.timesteps[0], x, x)
    pred = torch.randn_like(x)
    torch.testing.assert_close(state.to_x0(pred), pred)


def test_unsupported_scheduler_for_x0_space_is_an_error():
    scheduler = UniPCMultistepScheduler(**SD_SCHEDULE)
    scheduler.set_timesteps(4)
    state = SamplerState(num_steps=4, scheduler=scheduler)
    with pytest.raises(ValueError, match="scheduler: .*UniPCMultistepScheduler.*space='model'"):
        guidekit.APG().validate(state)
    guidekit.APG(space="model").validate(state)  # model space works with any scheduler


# ----------------------------------------------------------------------------- composition


class Recorder(SamplerHook):
    def __init__(self, name, log):
        self.name, self.log = name, log

    def begin(self, state):
        self.log.append((self.name, "begin"))

    def correct(self, state, pred):
        self.log.append((self.name, "correct"))
        return pred + 1

    def end(self, state):
        self.log.append((self.name, "end"))


def test_cfg_fills_the_slot_when_no_guidance_hook_is_given():
    assert isinstance(HookChain([], default_guidance=guidekit.CFG()).guidance, guidekit.CFG)
    apg = guidekit.APG()
    assert HookChain([apg], default_guidance=guidekit.CFG()).guidance is apg


def test_two_guidance_hooks_raise_naming_both():
    with pytest.raises(HookConflictError, match=r"APG\(.*\) and CFG\(.*\) both fill the guidance slot"):
        HookChain([guidekit.APG(), guidekit.CFG()], default_guidance=guidekit.CFG())


def test_attention_hooks_on_the_same_layers_conflict():
    class Attn(SamplerHook):
        def __init__(self, layers):
            self.attention_layers = frozenset(layers)

    HookChain([Attn({"a"}), Attn({"b"})], default_guidance=guidekit.CFG())
    with pytest.raises(HookConflictError, match="both replace the attention processors of \\['a'\\]"):
        HookChain([Attn({"a", "b"}), Attn({"a"})], default_guidance=guidekit.CFG())


def test_corrections_run_in_the_order_given_and_end_runs_even_after_errors():
    log = []
    chain = HookChain([Recorder("first", log), Recorder("second", log)], default_guidance=guidekit.CFG())
    state = SamplerState(num_steps=1, scheduler=None)
    chain.begin(state)
    assert chain.correct(state, torch.zeros(1)).item() == 2
    assert [e for e in log if e[1] == "correct"] == [("first", "correct"), ("second", "correct")]

    class Boom(SamplerHook):
        def end(self, state):
            raise RuntimeError("boom")

    log.clear()
    chain = HookChain([Boom(), Recorder("after", log)], default_guidance=guidekit.CFG())
    with pytest.raises(RuntimeError, match="boom"):
        chain.end(state)
    assert ("after", "end") in log


def test_non_hooks_are_rejected():
    with pytest.raises(ValueError, match="hooks: .* is not a guidekit SamplerHook"):
        HookChain(["apg"], default_guidance=guidekit.CFG())


# ----------------------------------------------------------------------------- argument errors


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"guidance_scale": -1.0}, "guidance_scale: -1.0 .*>= 0|guidance_scale: -1.0 is not accepted"),
        ({"norm_threshold": 0.0}, "norm_threshold: 0.0 is not accepted; accepted: a finite number in \\(0"),
        ({"norm_threshold": -3}, "norm_threshold"),
        ({"eta": 1.5}, "eta: 1.5 is not accepted; accepted: a finite number in \\[0.0, 1.0\\]"),
        ({"eta": -0.1}, "eta"),
        ({"start": 0.5, "stop": 0.5}, "start: 0.5 must be below stop: 0.5"),
        ({"start": -0.1}, "start: -0.1 is not accepted"),
        ({"stop": 1.5}, "stop: 1.5 is not accepted"),
        ({"space": "eps"}, "space: 'eps' is not accepted; accepted: 'x0', 'model'"),
        ({"momentum": 1.0}, "momentum: 1.0 is not accepted"),
        ({"eta": float("nan")}, "eta"),
    ],
)
def test_apg_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        guidekit.APG(**kwargs)


def test_guidance_scale_resolution():
    assert resolve_guidance_scale(None, [], default=7.5) == 7.5
    assert resolve_guidance_scale(None, [guidekit.APG(guidance_scale=12)]) == 12
    assert resolve_guidance_scale(12, [guidekit.APG(guidance_scale=12)]) == 12
    assert resolve_guidance_scale(3, [guidekit.APG()]) == 3
    with pytest.raises(ValueError, match="guidance_scale: the call passes 7.5 but APG\\(guidance_scale=12.0"):
        resolve_guidance_scale(7.5, [guidekit.APG(guidance_scale=12)])
    assert resolve_guidance_scale(-2, []) == -2  # as stock: w <= 1 means no guidance
    with pytest.raises(ValueError, match="guidance_scale: nan is not accepted"):
        resolve_guidance_scale(float("nan"), [])
