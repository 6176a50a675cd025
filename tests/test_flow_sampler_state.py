"""SamplerState on flow-matching schedulers: x0 = x − σ·v and ε = x + (1 − σ)·v with σ read from the scheduler's
sigmas, checked against each scheduler's own arithmetic at every hook point (step_end included)."""

import math

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
    FlowMatchLCMScheduler,
    UniPCMultistepScheduler,
)

from tolerance import assert_close_to_scale
from guidekit.hooks import SamplerState, check_flow_scheduler, scheduler_family

FLOW = "flow_prediction"


def euler_schedulers():
    """(id, scheduler after set_timesteps) for the FlowMatchEuler configurations pipelines use."""
    cases = []
    s = FlowMatchEulerDiscreteScheduler(shift=3.0)  # SD3: static shift, default path
    s.set_timesteps(6)
    cases.append(("static-shift", s))
    s = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)  # Flux
    s.set_timesteps(sigmas=[1 - k / 6 for k in range(6)], mu=0.8)
    s.set_begin_index(0)
    cases.append(("dynamic-exponential", s))
    s = FlowMatchEulerDiscreteScheduler(  # Qwen-Image
        use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9, max_image_seq_len=8192, shift_terminal=0.02
    )
    s.set_timesteps(sigmas=[1 - k / 6 for k in range(6)], mu=0.7)
    s.set_begin_index(0)
    cases.append(("dynamic-terminal", s))
    s = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type="linear")
    s.set_timesteps(6, mu=1.1)
    cases.append(("dynamic-linear", s))
    return cases


def ddim_form_next(state, v, sigma_next):
    """x_next = (1 − σ_next)·x0 + σ_next·ε: the Euler step written with the state's x0 and ε (FLOW.md §1)."""
    return (1.0 - sigma_next) * state.to_x0(v) + sigma_next * state.to_eps(v)


@pytest.mark.parametrize("name,scheduler", euler_schedulers(), ids=[c[0] for c in euler_schedulers()])
def test_euler_conversions_match_the_scheduler_step_at_every_hook_point(name, scheduler):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 6, 6, generator=g)
    state = SamplerState(num_steps=len(scheduler.timesteps), scheduler=scheduler, prediction_type=FLOW)
    assert scheduler_family(scheduler) == "flow"
    for i, t in enumerate(scheduler.timesteps):
        state.update(i, t, x, x)
        v = torch.randn(x.shape, generator=g)
        sigma = float(scheduler.sigmas[i])  # the i-th sigma: the one the model input is at
        x0 = state.to_x0(v)
        torch.testing.assert_close(x0, x.double() - sigma * v.double(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(state.to_eps(v), x.double() + (1 - sigma) * v.double(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(state.from_x0(x0), v.double(), rtol=1e-9, atol=1e-9)
        sigma_next = float(scheduler.sigmas[i + 1])
        x_next = scheduler.step(v, t, x, return_dict=False)[0]
        assert_close_to_scale(ddim_form_next(state, v, sigma_next), x_next.double(), rel=1e-5)
        # step_end: the scheduler has advanced its index, the state still converts with this step's sigma
        state.latents = x_next
        torch.testing.assert_close(state.to_x0(v), x0)
        x = x_next


def test_stochastic_sampling_realises_x0_at_the_next_sigma():
    """stochastic_sampling: x_next = (1 − σ_next)·x0 + σ_next·noise, so an x0 correction d moves x_next by (1 − σ_next)·d."""
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, stochastic_sampling=True)
    scheduler.set_timesteps(4)
    x = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    state = SamplerState(num_steps=4, scheduler=scheduler, prediction_type=FLOW)
    t = scheduler.timesteps[1]
    scheduler._step_index = 1
    state.update(1, t, x, x)
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    d = torch.randn(x.shape, generator=torch.Generator().manual_seed(3)) * 0.1
    v_corrected = state.from_x0(state.to_x0(v) + d).float()
    plain = scheduler.step(v, t, x, generator=torch.Generator().manual_seed(4), return_dict=False)[0]
    scheduler._step_index = 1
    corrected = scheduler.step(v_corrected, t, x, generator=torch.Generator().manual_seed(4), return_dict=False)[0]
    sigma_next = float(scheduler.sigmas[2])
    assert_close_to_scale((corrected - plain).double(), (1 - sigma_next) * d.double(), rel=1e-5)


def test_heun_hook_points_see_each_model_call_at_its_own_sigma():
    """Order 2: 2n − 1 model calls; each call's input is at σ = t/1000 of that call (first stage at σ_i, second
    stage at the Euler predictor's σ_{i+1}), and x0 = x − σ·v reproduces the scheduler's own step."""
    scheduler = FlowMatchHeunDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(4)
    assert len(scheduler.timesteps) == 7
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 4, 4, 4, generator=g)
    state = SamplerState(num_steps=7, scheduler=scheduler, prediction_type=FLOW)
    for i, t in enumerate(scheduler.timesteps):
        first_stage = scheduler.state_in_first_order
        state.update(i, t, x, x)
        sigma = float(state.alpha_sigma()[1])
        assert math.isclose(sigma, float(t) / 1000, rel_tol=1e-6, abs_tol=1e-7)
        v = torch.randn(x.shape, generator=g)
        x_next = scheduler.step(v, t, x, return_dict=False)[0]
        if first_stage:  # the predictor is a plain Euler step from this call's σ
            sigma_next = float(scheduler.sigmas[scheduler.step_index])
            assert_close_to_scale(ddim_form_next(state, v, sigma_next), x_next.double(), rel=1e-5)
        x = x_next


@pytest.mark.parametrize("cls", [UniPCMultistepScheduler, DPMSolverMultistepScheduler], ids=lambda c: c.__name__)
def test_multistep_flow_solvers_agree_with_their_own_x0(cls):
    """UniPC / DPM-Solver++ with flow sigmas have int64 timesteps (t/1000 is not σ): σ comes from their sigmas."""
    scheduler = cls(prediction_type=FLOW, use_flow_sigmas=True, flow_shift=3.0)
    scheduler.set_timesteps(5)
    assert scheduler.timesteps.dtype == torch.int64
    assert scheduler_family(scheduler) == "flow"
    g = torch.Generator().manual_seed(6)
    x = torch.randn(1, 4, 4, 4, generator=g)
    state = SamplerState(num_steps=5, scheduler=scheduler, prediction_type=FLOW)
    for i, t in enumerate(scheduler.timesteps):
        state.update(i, t, x, x)
        v = torch.randn(x.shape, generator=g)
        if scheduler.step_index is None:
            scheduler._init_step_index(t)
        reference = scheduler.convert_model_output(v, sample=x)
        assert_close_to_scale(state.to_x0(v), reference.double(), rel=1e-5)
        x = scheduler.step(v, t, x, return_dict=False)[0]
        state.latents = x
        assert_close_to_scale(state.to_x0(v), reference.double(), rel=1e-5)


def test_solvers_without_flow_sigmas_and_other_schedulers_are_refused_by_name():
    check_flow_scheduler(FlowMatchEulerDiscreteScheduler())
    check_flow_scheduler(FlowMatchHeunDiscreteScheduler())
    check_flow_scheduler(UniPCMultistepScheduler(prediction_type=FLOW, use_flow_sigmas=True))
    with pytest.raises(ValueError, match="scheduler: FlowMatchLCMScheduler is not supported.*FlowMatchEulerDiscreteScheduler"):
        check_flow_scheduler(FlowMatchLCMScheduler())
    with pytest.raises(ValueError, match="scheduler: DDIMScheduler is not supported"):
        check_flow_scheduler(DDIMScheduler())
    with pytest.raises(ValueError, match="use_flow_sigmas=False"):
        check_flow_scheduler(UniPCMultistepScheduler())
    with pytest.raises(ValueError, match="invert_sigmas"):
        check_flow_scheduler(FlowMatchEulerDiscreteScheduler(invert_sigmas=True))
    assert scheduler_family(FlowMatchLCMScheduler()) is None


def test_flow_prediction_on_a_ddpm_scheduler_is_an_error():
    scheduler = DDIMScheduler()
    scheduler.set_timesteps(4)
    state = SamplerState(num_steps=4, scheduler=scheduler, prediction_type=FLOW)
    x = torch.zeros(1, 4, 2, 2)
    state.update(0, scheduler.timesteps[0], x, x)
    with pytest.raises(ValueError, match="prediction_type: 'flow_prediction' needs a flow-matching scheduler"):
        state.to_x0(x)


def test_dpm_solver_without_flow_sigmas_keeps_its_ddpm_family():
    assert scheduler_family(DPMSolverMultistepScheduler()) == "dpm"
    assert scheduler_family(DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type=FLOW)) == "flow"
