"""EluCD's mean shift on every scheduler it accepts: the realised shift of x_{t−1} (two scheduler steps from the
same state and noise) equals the intended u = s·(Σ_t + a_t)·g re-derived by hand (`elucd_shift`), step by step;
multistep solvers are refused with an error that names the accepted schedulers and the recommended one."""

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
from elucd_shift import LinearClassifier, Settings, measure_shifts
from guidekit.guidance.elucd import ELUCD_SCHEDULERS

SD_SCHEDULE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                   steps_offset=1, set_alpha_to_one=False)
SHAPE = (2, 3, 8, 8)

CASES = {
    "ddpm-eps-50": (DDPMScheduler, "epsilon", None, 50),
    "ddpm-v-10": (DDPMScheduler, "v_prediction", None, 10),
    "ddim-eps-50": (DDIMScheduler, "epsilon", None, 50),
    "ddim-eps-10": (DDIMScheduler, "epsilon", None, 10),
    "ddim-v-10": (DDIMScheduler, "v_prediction", None, 10),
    "ddim-x0-10": (DDIMScheduler, "sample", None, 10),
    "ddim-eta-0.5-20": (DDIMScheduler, "epsilon", 0.5, 20),
    "ddim-eta-1-10": (DDIMScheduler, "v_prediction", 1.0, 10),
    "euler-eps-50": (EulerDiscreteScheduler, "epsilon", None, 50),
    "euler-eps-10": (EulerDiscreteScheduler, "epsilon", None, 10),
    "euler-v-10": (EulerDiscreteScheduler, "v_prediction", None, 10),
    "euler-ancestral-eps-50": (EulerAncestralDiscreteScheduler, "epsilon", None, 50),
    "euler-ancestral-v-10": (EulerAncestralDiscreteScheduler, "v_prediction", None, 10),
}


def scheduler(cls, prediction_type, **kw):
    return cls.from_config({**SD_SCHEDULE, "prediction_type": prediction_type, **kw})


def check(steps_measured, rel=1e-4):
    moved = [d for d in steps_measured if float(d["intended"].norm()) > 0]
    assert len(moved) >= len(steps_measured) - 1  # at most the last step has no shift (Σ = 0 at ᾱ_prev = 1)
    for d in steps_measured:
        assert d["residual"] < rel, (d["step"], d["ratio"], d["residual"])


@pytest.mark.parametrize("case", list(CASES))
def test_realised_mean_shift_equals_the_intended_one(case):
    cls, prediction_type, eta, steps = CASES[case]
    settings = Settings(scale=3.0, tau1=1.5, tau2=0.7, gamma=0.4)
    hook = guidekit.EluCD(LinearClassifier(SHAPE[1:]), ["first", "third"], scale=settings.scale,
                          joint_temperature=settings.tau1, marginal_temperature=settings.tau2, gamma=settings.gamma)
    check(measure_shifts(scheduler(cls, prediction_type), hook, settings, steps, SHAPE, labels=(0, 2), eta=eta))


@pytest.mark.parametrize("cls", [DDIMScheduler, EulerDiscreteScheduler, DDPMScheduler], ids=lambda c: c.__name__)
def test_edm_schedule_realises_its_shift(cls):
    settings = Settings(scale=20.0, tau1=1.0, tau2=0.0, gamma=0.3, schedule="edm")
    hook = guidekit.EluCD(LinearClassifier(SHAPE[1:]), [1, 0], scale=settings.scale, marginal_temperature=0.0,
                          schedule="edm", gamma=0.3)
    check(measure_shifts(scheduler(cls, "epsilon"), hook, settings, 20, SHAPE, labels=(1, 0)))


@pytest.mark.parametrize("cls", [DDIMScheduler, EulerDiscreteScheduler], ids=lambda c: c.__name__)
def test_classifier_guidance_takes_the_same_path(cls):
    settings = Settings(scale=2.0, tau1=1.0, tau2=1.0, gamma=0.0)
    hook = guidekit.ClassifierGuidance(LinearClassifier(SHAPE[1:]), [2, 2], scale=settings.scale)
    check(measure_shifts(scheduler(cls, "epsilon"), hook, settings, 25, SHAPE, labels=(2, 2)))


def test_ddim_at_many_steps_realises_the_whole_shift():
    """The DDIM step's coefficient of x̂0 is about half the DDPM posterior mean's at many steps: a correction
    scaled for DDPM moved DDIM's x_{t−1} by about half of u."""
    settings = Settings()
    hook = guidekit.EluCD(LinearClassifier(SHAPE[1:]), [0, 2])
    ratios = [d["ratio"] for d in measure_shifts(scheduler(DDIMScheduler, "epsilon"), hook, settings, 60, SHAPE)[:-1]]
    assert min(ratios) > 1 - 1e-4 and max(ratios) < 1 + 1e-4


REFUSED = [PNDMScheduler, LMSDiscreteScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler]


@pytest.mark.parametrize("cls", REFUSED, ids=lambda c: c.__name__)
@pytest.mark.parametrize("hook_cls", [guidekit.EluCD, guidekit.ClassifierGuidance], ids=lambda c: c.__name__)
def test_multistep_solvers_are_refused_naming_the_accepted_and_the_recommended(cls, hook_cls):
    from guidekit.hooks import SamplerState

    sched = scheduler(cls, "epsilon")
    sched.set_timesteps(5)
    hook = hook_cls(LinearClassifier(SHAPE[1:]), 0)
    state = SamplerState(num_steps=5, scheduler=sched)
    accepted = ", ".join(ELUCD_SCHEDULERS)
    pattern = rf"scheduler: {cls.__name__} .*accepted by {hook_cls.__name__}: {accepted}; recommended: DDPMScheduler"
    with pytest.raises(ValueError, match=pattern):
        hook.validate(state)
    x = torch.zeros(SHAPE)
    state.update(0, sched.timesteps[0], x, model_input=x)
    with pytest.raises(ValueError, match=pattern):
        hook.correct(state, x)
