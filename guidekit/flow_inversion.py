"""Inversion of the flow-matching Euler sampler (SD3, Flux, Qwen-Image, Wan), shared by start-point methods.

A denoising step of `FlowMatchEulerDiscreteScheduler` from noise level σ_i to σ_{i+1} < σ_i is::

    x_{i+1} = x_i + (σ_{i+1} − σ_i) · v(x_i, t_i)          t_i = the schedule's i-th timestep

Exact inversion solves that relation for x_i::

    x_i = x_{i+1} − (σ_{i+1} − σ_i) · v(x_i, t_i)

with the velocity at the *higher* σ of the pair, the one the denoising step evaluated. The equation is
implicit in x_i; the first estimate evaluates v at x_{i+1}, and each refinement re-evaluates it at the
current estimate of x_i (a fixed-point iteration, which converges for a model that is smooth in x at the
step sizes samplers use). When v does not depend on x, the first estimate is already exact, and
invert-then-denoise returns the input to float precision.

The inversion usually seen in flow-editing code steps forward in time with the velocity at the *lower* σ,
``x_i ≈ x_{i+1} + (σ_i − σ_{i+1}) · v(x_{i+1}, t(σ_{i+1}))``. It is not the inverse of the sampler even when v
ignores x (its velocity is taken at another time), so it is offered as ``method="approximate"`` only.

The math runs in `guidekit.precision.math_dtype` (float64; float32 on MPS); latents come back in the
input's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional

import torch

from .precision import math_dtype

__all__ = ["FlowLevels", "flow_levels", "flow_euler_step", "flow_inverse_step", "flow_invert", "FlowInversionOutput"]

INVERSION_METHODS = ("exact", "approximate")


@dataclass
class FlowLevels:
    """The timesteps and sigmas of a flow-matching Euler schedule, paired as its `step` pairs them.

    Attributes:
        timesteps (`torch.Tensor`): the N timesteps the model is called with, in the scheduler's units
            (σ · num_train_timesteps for FlowMatchEuler), denoising order.
        sigmas (`torch.Tensor`): N + 1 noise levels in the math dtype, σ_0 > ... > σ_N (σ_N is the terminal
            level, 0 unless the schedule ends elsewhere).
        num_train_timesteps (`int`): the scheduler's timestep scale, to call the model at a σ off the grid
            (the approximate inversion).
    """

    timesteps: torch.Tensor
    sigmas: torch.Tensor
    num_train_timesteps: int = 1000

    def __len__(self) -> int:
        return len(self.timesteps)


def flow_levels(scheduler) -> FlowLevels:
    """Read the levels of a `FlowMatchEulerDiscreteScheduler` after `set_timesteps`.

    Whatever `set_timesteps` was given (static or dynamic shift with `mu`, `sigmas`, `shift_terminal`) is what
    is read back, so the inversion walks exactly the schedule that sampling will use.

    Args:
        scheduler: a diffusers `FlowMatchEulerDiscreteScheduler` (deterministic: `stochastic_sampling=False`,
            `invert_sigmas=False`) on which `set_timesteps` has been called.
    """
    names = [cls.__name__ for cls in type(scheduler).__mro__]
    if "FlowMatchEulerDiscreteScheduler" not in names:
        raise ValueError(
            f"scheduler: {type(scheduler).__name__} cannot be inverted here; accepted: FlowMatchEulerDiscreteScheduler "
            "(the flow inversion is the exact inverse of its Euler step)"
        )
    config = scheduler.config
    if config.get("stochastic_sampling", False):
        raise ValueError(
            "scheduler: stochastic_sampling=True draws fresh noise at every step and cannot be inverted; "
            "accepted: a FlowMatchEulerDiscreteScheduler with stochastic_sampling=False"
        )
    if config.get("invert_sigmas", False):
        raise ValueError("scheduler: invert_sigmas=True is not supported; accepted: invert_sigmas=False")
    if getattr(scheduler, "num_inference_steps", None) is None or scheduler.timesteps is None:
        raise ValueError("scheduler: call set_timesteps(num_inference_steps) before reading its flow levels")
    sigmas = scheduler.sigmas.to(math_dtype(scheduler.sigmas.device))
    if len(sigmas) != len(scheduler.timesteps) + 1:
        raise ValueError(
            f"scheduler: {len(scheduler.timesteps)} timesteps need {len(scheduler.timesteps) + 1} sigmas, the scheduler "
            f"has {len(sigmas)}"
        )
    return FlowLevels(scheduler.timesteps.clone(), sigmas, int(config.num_train_timesteps))


def flow_euler_step(x: torch.Tensor, v: torch.Tensor, sigma, sigma_next) -> torch.Tensor:
    """One Euler step of the flow ODE, x + (σ_next − σ) · v, in the math dtype."""
    x = x.to(math_dtype(x.device))
    return x + (float(sigma_next) - float(sigma)) * v.to(x.dtype)


def flow_inverse_step(x_next: torch.Tensor, v: torch.Tensor, sigma, sigma_next) -> torch.Tensor:
    """The Euler step solved for its start, x_next − (σ_next − σ) · v, with v the velocity at (x, σ)."""
    x_next = x_next.to(math_dtype(x_next.device))
    return x_next - (float(sigma_next) - float(sigma)) * v.to(x_next.dtype)


@dataclass
class FlowInversionOutput:
    """Result of `flow_invert`.

    Attributes:
        latents (`torch.Tensor`): the inverted latent at σ_0 (pure noise level for text-to-image schedules),
            in the input's dtype.
        trajectory (`list[torch.Tensor]`): N + 1 latents from the clean input to `latents`, in inversion order
            and the math dtype; ``trajectory[-1 - i]`` is the latent denoising step i starts from.
        residuals (`list[float]`): per inversion step (inversion order), the largest absolute change of the
            last fixed-point refinement, or NaN where no refinement ran; how far from exact the step may be.
    """

    latents: torch.Tensor
    trajectory: List[torch.Tensor]
    residuals: List[float]


def flow_invert(
    model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    latents: torch.Tensor,
    levels: FlowLevels,
    method: str = "exact",
    refine_steps: int = 2,
    tolerance: Optional[float] = None,
) -> FlowInversionOutput:
    """Invert clean latents through a flow-matching Euler schedule (see the module docstring).

    Args:
        model (`callable`): ``model(x, t) -> v``, the (already guided) velocity at sample x and timestep t
            (a 0-d tensor in the scheduler's units, as the pipeline's loop passes it to `scheduler.step`).
        latents (`torch.Tensor`): the clean latents (σ = σ_N), in the layout `model` takes.
        levels (`FlowLevels`): from `flow_levels(scheduler)`.
        method (`str`, defaults to ``"exact"``): ``"exact"``, the inverse of the Euler step (velocity at the
            higher σ of each pair, refined by fixed-point iteration), or ``"approximate"``, the velocity at the
            lower σ (no refinement; not an inverse of the sampler, kept for comparison).
        refine_steps (`int`, defaults to 2): the most fixed-point refinements per step of the exact method, each
            one model call more. 0 evaluates v once, at x_{i+1}: exact when v does not depend on x.
        tolerance (`float`, *optional*): stop refining a step once the largest change of a refinement is at most
            `tolerance` times the largest magnitude of x_{i+1} (at least 1); None always runs `refine_steps`.
    """
    if method not in INVERSION_METHODS:
        raise ValueError(f"method: {method!r} is not accepted; accepted: {', '.join(INVERSION_METHODS)}")
    if isinstance(refine_steps, bool) or not isinstance(refine_steps, int) or refine_steps < 0:
        raise ValueError(f"refine_steps: {refine_steps!r} is not accepted; accepted: an int >= 0")
    if tolerance is not None and not (isinstance(tolerance, (int, float)) and 0 < tolerance < 1):
        raise ValueError(f"tolerance: {tolerance!r} is not accepted; accepted: None or a number in (0, 1)")
    dtype = latents.dtype
    sigmas = levels.sigmas
    x = latents.to(math_dtype(latents.device))
    trajectory, residuals = [x], []
    for i in reversed(range(len(levels))):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        if method == "approximate":
            t_low = (sigma_next * levels.num_train_timesteps).to(levels.timesteps.dtype)
            x = flow_euler_step(x, model(x.to(dtype), t_low), sigma_next, sigma)
            residuals.append(float("nan"))
        else:
            x_next, t = x, levels.timesteps[i]
            x = flow_inverse_step(x_next, model(x_next.to(dtype), t), sigma, sigma_next)
            change = float("nan")
            bound = None if tolerance is None else tolerance * max(1.0, float(x_next.abs().max()))
            for _ in range(refine_steps):
                refined = flow_inverse_step(x_next, model(x.to(dtype), t), sigma, sigma_next)
                change = float((refined - x).abs().max())
                x = refined
                if bound is not None and change <= bound:
                    break
            residuals.append(change)
        trajectory.append(x)
    return FlowInversionOutput(latents=x.to(dtype), trajectory=trajectory, residuals=residuals)
