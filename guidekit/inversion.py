"""Exact deterministic DDIM inversion (η = 0), shared by UAM and StyleSSP.

A DDIM denoising step from level t to its predecessor p, for a fixed model output `pred`, is affine in
the sample::

    x_p = a(t, p) · x_t + b(t, p) · pred

with (α = √ᾱ, σ = √(1 − ᾱ))

    epsilon:       a = α_p / α_t                 b = σ_p − α_p σ_t / α_t
    v_prediction:  a = α_p α_t + σ_p σ_t         b = σ_p α_t − α_p σ_t
    sample:        a = σ_p / σ_t                 b = α_p − σ_p α_t / σ_t

Inversion walks the same steps backwards, solving that relation for x_t::

    x_t = (x_p − b · pred) / a        with pred = model(x_p, t)

The only approximation of DDIM inversion is that the model is evaluated at x_p instead of the unknown
x_t. So when the model output does not depend on its input sample, invert-then-denoise returns the input
to float precision (tests/test_inversion.py checks this against diffusers' own `DDIMScheduler.step`).

Timestep pairing (the source of diffusers issues 10695, 5145 and 3436 about `DDIMInverseScheduler`): the
k-th inversion step undoes denoising step N−1−k, i.e. it goes from the level that step lands on to the
timestep that step starts from, and evaluates the model at *that* timestep. The level a denoising step
from t lands on is the one `DDIMScheduler.step` uses: ᾱ[t − T/N], or `final_alpha_cumprod` below 0.
So the first inversion step starts from the clean latent at level `final_alpha_cumprod` (ᾱ_0 in Stable
Diffusion, whose scheduler has ``set_alpha_to_one=False``) and uses timestep τ_{N−1} (1 in SD), and the
last one ends at τ_0 (981 in SD at 50 steps) — N model calls, N + 1 latents.

The math runs in float64; latents come back in the input's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List

import torch

__all__ = [
    "DDIMLevels",
    "ddim_levels",
    "ddim_step_coefficients",
    "ddim_step",
    "ddim_inverse_step",
    "ddim_invert",
    "predicted_x0",
    "InversionOutput",
]

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


#----------------------------------------------------------------------------
# Noise levels of a DDIM schedule.


@dataclass
class DDIMLevels:
    """The timesteps of a DDIM schedule and the ᾱ each denoising step starts from and lands on.

    Attributes:
        timesteps (`list[int]`): denoising order, τ_0 > τ_1 > ... > τ_{N−1}.
        alpha_bar (`torch.Tensor`): float64, ᾱ at each τ_i (shape N).
        alpha_bar_prev (`torch.Tensor`): float64, ᾱ of the level step i lands on (shape N); the last
            entry is the scheduler's `final_alpha_cumprod`.
    """

    timesteps: List[int]
    alpha_bar: torch.Tensor
    alpha_bar_prev: torch.Tensor


def ddim_levels(scheduler) -> DDIMLevels:
    """Read the levels of a `DDIMScheduler` after `set_timesteps`, pairing them as its `step` does.

    Args:
        scheduler: a diffusers `DDIMScheduler` on which `set_timesteps` has been called.
    """
    if getattr(scheduler, "num_inference_steps", None) is None:
        raise ValueError("scheduler: call set_timesteps(num_inference_steps) before reading its DDIM levels")
    alphas_cumprod = scheduler.alphas_cumprod.to(torch.float64)
    final = torch.as_tensor(scheduler.final_alpha_cumprod, dtype=torch.float64)
    stride = scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    timesteps = [int(t) for t in scheduler.timesteps]
    alpha_bar, alpha_bar_prev = [], []
    for t in timesteps:
        prev = t - stride
        alpha_bar.append(alphas_cumprod[t])
        alpha_bar_prev.append(alphas_cumprod[prev] if prev >= 0 else final)
    return DDIMLevels(timesteps, torch.stack(alpha_bar), torch.stack(alpha_bar_prev))


#----------------------------------------------------------------------------
# One step, both directions.


def ddim_step_coefficients(alpha_bar_t, alpha_bar_prev, prediction_type: str = "epsilon"):
    """(a, b) with x_prev = a · x_t + b · pred for a deterministic DDIM step (float64).

    Args:
        alpha_bar_t: ᾱ of the level the step starts from.
        alpha_bar_prev: ᾱ of the level it lands on.
        prediction_type (`str`, defaults to ``"epsilon"``): what the model predicts: ``"epsilon"``,
            ``"v_prediction"`` or ``"sample"``.
    """
    ab_t = torch.as_tensor(alpha_bar_t, dtype=torch.float64)
    ab_p = torch.as_tensor(alpha_bar_prev, dtype=torch.float64)
    a_t, s_t = ab_t.sqrt(), (1 - ab_t).sqrt()
    a_p, s_p = ab_p.sqrt(), (1 - ab_p).sqrt()
    if prediction_type == "epsilon":
        return a_p / a_t, s_p - a_p * s_t / a_t
    if prediction_type == "v_prediction":
        return a_p * a_t + s_p * s_t, s_p * a_t - a_p * s_t
    if prediction_type == "sample":
        return s_p / s_t, a_p - s_p * a_t / s_t
    raise ValueError(f"prediction_type: {prediction_type!r} is not supported; accepted: {', '.join(PREDICTION_TYPES)}")


def ddim_step(x_t, pred, alpha_bar_t, alpha_bar_prev, prediction_type: str = "epsilon"):
    """Deterministic DDIM denoising step x_t → x_prev (η = 0), computed in float64."""
    a, b = ddim_step_coefficients(alpha_bar_t, alpha_bar_prev, prediction_type)
    out = a * x_t.to(torch.float64) + b * pred.to(torch.float64)
    return out.to(x_t.dtype)


def ddim_inverse_step(x_prev, pred, alpha_bar_t, alpha_bar_prev, prediction_type: str = "epsilon"):
    """Inverse DDIM step x_prev → x_t, the exact algebraic inverse of `ddim_step` for the same `pred`."""
    a, b = ddim_step_coefficients(alpha_bar_t, alpha_bar_prev, prediction_type)
    out = (x_prev.to(torch.float64) - b * pred.to(torch.float64)) / a
    return out.to(x_prev.dtype)


def predicted_x0(x_t, pred, alpha_bar_t, prediction_type: str = "epsilon") -> torch.Tensor:
    """The model's estimate of the clean sample x̂0 at level ᾱ_t, in float64."""
    ab = torch.as_tensor(alpha_bar_t, dtype=torch.float64)
    alpha, sigma = ab.sqrt(), (1 - ab).sqrt()
    x_t, pred = x_t.to(torch.float64), pred.to(torch.float64)
    if prediction_type == "epsilon":
        return (x_t - sigma * pred) / alpha
    if prediction_type == "v_prediction":
        return alpha * x_t - sigma * pred
    if prediction_type == "sample":
        return pred
    raise ValueError(f"prediction_type: {prediction_type!r} is not supported; accepted: {', '.join(PREDICTION_TYPES)}")


#----------------------------------------------------------------------------
# The whole inversion.


@dataclass
class InversionOutput:
    """Result of `ddim_invert`.

    Attributes:
        latents (`torch.Tensor`): the inverted noise latent z_T (at timestep τ_0).
        trajectory (`list[torch.Tensor]`): N + 1 latents from the clean input z_0 to z_T, in inversion
            order; ``trajectory[-1 - i]`` is the latent denoising step i starts from.
        timesteps (`list[int]`): the denoising timesteps τ_0 > ... > τ_{N−1}.
    """

    latents: torch.Tensor
    trajectory: List[torch.Tensor]
    timesteps: List[int]


def ddim_invert(
    model: Callable[[torch.Tensor, int], torch.Tensor],
    latents: torch.Tensor,
    levels: DDIMLevels,
    prediction_type: str = "epsilon",
) -> InversionOutput:
    """Deterministic DDIM inversion of clean latents (see the module docstring for the pairing).

    Args:
        model (`callable`): ``model(x, t) -> pred``, the (already guided) model output at sample x and
            integer timestep t, in the parameterisation `prediction_type`.
        latents (`torch.Tensor`): clean latents z_0.
        levels (`DDIMLevels`): from `ddim_levels(scheduler)`.
        prediction_type (`str`, defaults to ``"epsilon"``): the model's parameterisation.
    """
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type: {prediction_type!r} is not supported; accepted: {', '.join(PREDICTION_TYPES)}")
    for i, t in enumerate(levels.timesteps):
        a, _ = ddim_step_coefficients(levels.alpha_bar[i], levels.alpha_bar_prev[i], prediction_type)
        if not torch.isfinite(a) or a == 0:
            raise ValueError(
                f"prediction_type: the DDIM step at timestep {t} maps every sample to the same output with "
                f"prediction_type={prediction_type!r} (ᾱ_prev={float(levels.alpha_bar_prev[i]):.6g}), so it cannot "
                "be inverted; accepted: a schedule with set_alpha_to_one=False or an epsilon / v_prediction model"
            )
    x = latents
    trajectory = [x]
    for i in reversed(range(len(levels.timesteps))):
        t = levels.timesteps[i]
        pred = model(x, t)
        x = ddim_inverse_step(x, pred, levels.alpha_bar[i], levels.alpha_bar_prev[i], prediction_type)
        trajectory.append(x)
    return InversionOutput(latents=x, trajectory=trajectory, timesteps=list(levels.timesteps))
