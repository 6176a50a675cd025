"""CFG and APG on flow-matching states, against an independent derivation on fixed tensors: in x0 space, x0 =
x − σ·v with σ the scheduler's sigma at the step, the guided x0 goes back to a velocity at the same x and σ;
APG's radius is per sample (per batch row over every element), for SD3's (B, C, H, W) and Flux's packed (B, N, 4C)."""

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

import guidekit
from guidekit.hooks import SamplerState
from tolerance import assert_close_to_scale


def paper_apg(cond, uncond, w, eta, r, beta, running):
    """Algorithm 1 of the APG paper written out per batch row, in float64."""
    out, new_running = [], []
    for b in range(cond.shape[0]):
        c, u = cond[b].double().flatten(), uncond[b].double().flatten()
        d = c - u
        if beta != 0:
            d = d if running is None else d + beta * running[b]
            new_running.append(d)
        n = torch.linalg.vector_norm(d)
        if r is not None and n > r:
            d = d * (r / n)
        par = (d @ c) / (c @ c) * c
        out.append((c + (w - 1) * ((d - par) + eta * par)).reshape(cond.shape[1:]))
    return torch.stack(out), (new_running or None)


def flow_state(shape, step):
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(4)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(10 + step))
    state = SamplerState(num_steps=4, scheduler=scheduler, prediction_type="flow_prediction", guidance_scale=6.0)
    scheduler._step_index = step
    state.update(step, scheduler.timesteps[step], x, x)
    return state, x, float(scheduler.sigmas[step])


SHAPES = {"sd3": (2, 4, 6, 6), "flux-packed": (2, 9, 16)}


@pytest.mark.parametrize("layout", list(SHAPES))
def test_apg_in_x0_space_follows_the_paper_through_x0_and_back(layout):
    hook = guidekit.APG(eta=0.0, norm_threshold=2.0, momentum=-0.5)
    memory_state = None
    running = None
    g = torch.Generator().manual_seed(0)
    for step in range(2):
        state, x, sigma = flow_state(SHAPES[layout], step)
        if memory_state is not None:
            state._memories = memory_state._memories  # one call: the momentum carries over
        cond = torch.randn(SHAPES[layout], generator=g)
        uncond = cond + torch.randn(SHAPES[layout], generator=g)
        x0c, x0u = x.double() - sigma * cond.double(), x.double() - sigma * uncond.double()
        x0g, running = paper_apg(x0c, x0u, 6.0, 0.0, 2.0, -0.5, running)
        expected = (x.double() - x0g) / sigma
        assert_close_to_scale(hook.guide(state, cond, uncond).double(), expected, rel=1e-5)
        memory_state = state


def test_apg_in_model_space_guides_the_velocity_itself():
    state, x, _ = flow_state(SHAPES["flux-packed"], 1)
    g = torch.Generator().manual_seed(1)
    cond = torch.randn(SHAPES["flux-packed"], generator=g)
    uncond = cond + torch.randn(SHAPES["flux-packed"], generator=g)
    expected, _ = paper_apg(cond, uncond, 6.0, 0.0, 1.0, 0.0, None)
    out = guidekit.APG(eta=0.0, norm_threshold=1.0, momentum=0.0, space="model").guide(state, cond, uncond)
    assert_close_to_scale(out.double(), expected, rel=1e-5)


def test_cfg_combines_velocities_as_the_stock_flow_pipelines_do():
    state, x, _ = flow_state(SHAPES["sd3"], 0)
    g = torch.Generator().manual_seed(2)
    cond, uncond = torch.randn(SHAPES["sd3"], generator=g), torch.randn(SHAPES["sd3"], generator=g)
    assert torch.equal(guidekit.CFG().guide(state, cond, uncond), uncond + 6.0 * (cond - uncond))


def test_apg_radius_is_per_sample_not_over_the_batch():
    """Row 0 alone, and row 0 next to a row 100 times larger, get the same guidance."""
    state, x, _ = flow_state((1, 9, 16), 0)
    g = torch.Generator().manual_seed(3)
    cond, uncond = torch.randn(1, 9, 16, generator=g), torch.randn(1, 9, 16, generator=g)
    hook = guidekit.APG(norm_threshold=1.0, momentum=0.0, space="model")
    alone = hook.guide(state, cond, uncond)
    state2, _, _ = flow_state((2, 9, 16), 0)
    both = hook.guide(state2, torch.cat([cond, 100 * cond]), torch.cat([uncond, -100 * uncond]))
    assert_close_to_scale(both[:1], alone, rel=1e-6)


def test_cfg_in_x0_space_is_cfg_on_the_velocity():
    """x0 = x − σ·v is affine in v, so CFG on x0 (then back to v at the same x and σ) is CFG on v: the guidance
    slot needs no x0 form of CFG on flow models."""
    state, x, sigma = flow_state(SHAPES["sd3"], 2)
    g = torch.Generator().manual_seed(4)
    cond, uncond = torch.randn(SHAPES["sd3"], generator=g), torch.randn(SHAPES["sd3"], generator=g)
    x0 = state.to_x0(uncond) + 6.0 * (state.to_x0(cond) - state.to_x0(uncond))
    assert_close_to_scale(state.from_x0(x0), guidekit.CFG().guide(state, cond, uncond).double(), rel=1e-6)
