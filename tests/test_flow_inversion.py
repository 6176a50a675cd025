"""Flow-matching inversion: the exact inverse of FlowMatchEuler's step, checked by denoising with diffusers' own
`scheduler.step` from the inverted latent."""

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from tolerance import assert_close_to_scale
from guidekit.inversion import flow_euler_step, flow_invert, flow_levels


def x_independent_velocity(x, t):
    """A velocity that depends on t but not on x: the case where exact inversion has no approximation."""
    s = torch.tensor(float(t) / 1000, dtype=torch.float64)
    pattern = torch.linspace(-1, 1, x.numel(), dtype=torch.float64).reshape(x.shape)
    return (torch.sin(3 * s) * pattern + s * s).to(x.dtype)


def smooth_velocity(x, t):
    """A velocity that depends smoothly on x (a contraction at the step sizes used), for the fixed-point refinement."""
    s = torch.tensor(float(t) / 1000, dtype=torch.float64)
    return (0.3 * torch.tanh(x) * (1 + s) + torch.cos(2 * s)).to(x.dtype)


def denoise(scheduler, model, latents):
    """The sampler's loop, with diffusers' own `step`, from the given start latent."""
    x = latents
    for t in scheduler.timesteps:
        x = scheduler.step(model(x, t), t, x, return_dict=False)[0]
    return x


def schedulers():
    static = FlowMatchEulerDiscreteScheduler(shift=3.0)
    static.set_timesteps(12)
    dynamic = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, shift_terminal=0.02)
    dynamic.set_timesteps(sigmas=[1 - k / 12 for k in range(12)], mu=0.9)
    return [("sd3-static", static), ("qwen-dynamic-terminal", dynamic)]


@pytest.mark.parametrize("name,scheduler", schedulers(), ids=[c[0] for c in schedulers()])
def test_exact_inversion_returns_the_start_latent_for_an_x_independent_model(name, scheduler):
    clean = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    levels = flow_levels(scheduler)
    inverted = flow_invert(x_independent_velocity, clean, levels, refine_steps=0)
    assert len(inverted.trajectory) == len(scheduler.timesteps) + 1
    scheduler._step_index = None
    reconstructed = denoise(scheduler, x_independent_velocity, inverted.latents)
    assert_close_to_scale(reconstructed, clean, rel=2e-6)


def test_approximate_inversion_is_not_an_inverse_even_without_x_dependence():
    scheduler = schedulers()[0][1]
    clean = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    approximate = flow_invert(x_independent_velocity, clean, flow_levels(scheduler), method="approximate")
    scheduler._step_index = None
    error = (denoise(scheduler, x_independent_velocity, approximate.latents) - clean).abs().max()
    assert error > 1e-2  # far beyond float precision: the velocity is taken at the other end of each step


def test_fixed_point_refinement_converges_to_the_inverse_for_an_x_dependent_model():
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(20)
    clean = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    levels = flow_levels(scheduler)
    errors = []
    for refine in (0, 2, 10):
        inverted = flow_invert(smooth_velocity, clean, levels, refine_steps=refine)
        x = inverted.latents
        # denoise in float64 with the same Euler arithmetic as diffusers' step (its float32 sigmas)
        for i, t in enumerate(levels.timesteps):
            x = flow_euler_step(x, smooth_velocity(x, t), levels.sigmas[i], levels.sigmas[i + 1])
        errors.append(float((x - clean).abs().max()))
    assert errors[0] > 1e-4  # one evaluation at x_{i+1} is not exact when v depends on x
    assert errors[2] < 1e-9 * max(1.0, float(clean.abs().max()))
    assert errors[0] > errors[1] > errors[2]
    # with a tolerance, refinement stops once a refinement changes x by at most that: same result, fewer calls
    calls = []
    counted = lambda x, t: calls.append(1) or smooth_velocity(x, t)  # noqa: E731
    early = flow_invert(counted, clean, levels, refine_steps=50, tolerance=1e-12)
    assert len(calls) < 20 * 50
    assert all(r <= 1e-12 * 10 for r in early.residuals)


def test_inversion_refuses_what_it_cannot_invert():
    with pytest.raises(ValueError, match="stochastic_sampling"):
        scheduler = FlowMatchEulerDiscreteScheduler(stochastic_sampling=True)
        scheduler.set_timesteps(4)
        flow_levels(scheduler)
    with pytest.raises(ValueError, match="set_timesteps"):
        flow_levels(FlowMatchEulerDiscreteScheduler())
    scheduler = FlowMatchEulerDiscreteScheduler()
    scheduler.set_timesteps(4)
    levels = flow_levels(scheduler)
    with pytest.raises(ValueError, match="method: 'ddim' is not accepted"):
        flow_invert(x_independent_velocity, torch.zeros(1, 4, 2, 2), levels, method="ddim")
    with pytest.raises(ValueError, match="tolerance"):
        flow_invert(x_independent_velocity, torch.zeros(1, 4, 2, 2), levels, tolerance=0)
    with pytest.raises(ValueError, match="refine_steps"):
        flow_invert(x_independent_velocity, torch.zeros(1, 4, 2, 2), levels, refine_steps=-1)
