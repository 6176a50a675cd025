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

The math runs in `guidekit.precision.math_dtype` of the tensors' device (float64; float32 on MPS, which has
no float64); latents come back in the input's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List

import torch

from .precision import math_dtype

__all__ = [
    "DDIMLevels",
    "ddim_levels",
    "ddim_step_coefficients",
    "ddim_step",
    "ddim_inverse_step",
    "ddim_invert",
    "predicted_x0",
    "check_invertible",
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
        alpha_bar (`torch.Tensor`): ᾱ at each τ_i (shape N), in the math dtype of the scheduler's device.
        alpha_bar_prev (`torch.Tensor`): ᾱ of the level step i lands on (shape N), same dtype; the last
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
    alphas_cumprod = _in_math_dtype(scheduler.alphas_cumprod)
    final = _level(scheduler.final_alpha_cumprod).to(alphas_cumprod.device, alphas_cumprod.dtype)
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


def _in_math_dtype(x: torch.Tensor) -> torch.Tensor:
    """`x` in the math dtype of its own device (no device transfer, so MPS never sees float64)."""
    return x.to(math_dtype(x.device))


def _level(alpha_bar) -> torch.Tensor:
    """ᾱ as a 0-d tensor in the math dtype: a tensor stays on its device, a Python number goes to the CPU
    without passing through float32."""
    if isinstance(alpha_bar, torch.Tensor):
        return _in_math_dtype(alpha_bar)
    return torch.tensor(float(alpha_bar), dtype=math_dtype(torch.device("cpu")))


def ddim_step_coefficients(alpha_bar_t, alpha_bar_prev, prediction_type: str = "epsilon"):
    """(a, b) with x_prev = a · x_t + b · pred for a deterministic DDIM step (0-d tensors in the math dtype).

    Args:
        alpha_bar_t: ᾱ of the level the step starts from.
        alpha_bar_prev: ᾱ of the level it lands on.
        prediction_type (`str`, defaults to ``"epsilon"``): what the model predicts: ``"epsilon"``,
            ``"v_prediction"`` or ``"sample"``.
    """
    ab_t, ab_p = _level(alpha_bar_t), _level(alpha_bar_prev)
    a_t, s_t = ab_t.sqrt(), (1 - ab_t).sqrt()
    a_p, s_p = ab_p.sqrt(), (1 - ab_p).sqrt()
    if prediction_type == "epsilon":
        return a_p / a_t, s_p - a_p * s_t / a_t
    if prediction_type == "v_prediction":
        return a_p * a_t + s_p * s_t, s_p * a_t - a_p * s_t
    if prediction_type == "sample":
        return s_p / s_t, a_p - s_p * a_t / s_t
    raise ValueError(f"prediction_type: {prediction_type!r} is not supported; accepted: {', '.join(PREDICTION_TYPES)}")


def _scalars(*values) -> List[float]:
    """0-d coefficients as Python floats: they combine with tensors on any device in the tensors' dtype,
    and a float64 coefficient converts exactly."""
    return [float(v) for v in values]


def ddim_step(x_t, pred, alpha_bar_t, alpha_bar_prev, prediction_type: str = "epsilon"):
    """Deterministic DDIM denoising step x_t → x_prev (η = 0), computed in the math dtype of x_t's device."""
    a, b = _scalars(*ddim_step_coefficients(alpha_bar_t, alpha_bar_prev, prediction_type))
    out = a * _in_math_dtype(x_t) + b * pred.to(x_t.device, math_dtype(x_t.device))
    return out.to(x_t.dtype)


def ddim_inverse_step(x_prev, pred, alpha_bar_t, alpha_bar_prev, prediction_type: str = "epsilon"):
    """Inverse DDIM step x_prev → x_t, the exact algebraic inverse of `ddim_step` for the same `pred`."""
    a, b = _scalars(*ddim_step_coefficients(alpha_bar_t, alpha_bar_prev, prediction_type))
    out = (_in_math_dtype(x_prev) - b * pred.to(x_prev.device, math_dtype(x_prev.device))) / a
    return out.to(x_prev.dtype)


def predicted_x0(x_t, pred, alpha_bar_t, prediction_type: str = "epsilon") -> torch.Tensor:
    """The model's estimate of the clean sample x̂0 at level ᾱ_t, in the math dtype of x_t's device."""
    ab = _level(alpha_bar_t)
    alpha, sigma = _scalars(ab.sqrt(), (1 - ab).sqrt())
    x_t, pred = _in_math_dtype(x_t), pred.to(x_t.device, math_dtype(x_t.device))
    if prediction_type == "epsilon":
        return (x_t - sigma * pred) / alpha
    if prediction_type == "v_prediction":
        return alpha * x_t - sigma * pred
    if prediction_type == "sample":
        return pred
    raise ValueError(f"prediction_type: {prediction_type!r} is not supported; accepted: {', '.join(PREDICTION_TYPES)}")


#----------------------------------------------------------------------------
# The whole inversion.


def check_invertible(levels: DDIMLevels, prediction_type: str = "epsilon") -> None:
    """Raise a ValueError naming the cause when some step of `levels` has no inverse for this model.

    A step x_prev = a · x_t + b · pred can be solved for x_t only when a is finite and non-zero:

    * epsilon at ᾱ_t = 0 (a zero-terminal-SNR schedule at its last timestep): α_t = 0, so
      x0 = (x − σ ε) / α is undefined and a = α_prev / α_t is infinite;
    * sample landing on ᾱ_prev = 1 (``set_alpha_to_one=True``): σ_prev = 0, so a = σ_prev / σ_t = 0 and
      every x_t maps to the model's x0.
    """
    for i, t in enumerate(levels.timesteps):
        ab_t, ab_p = float(levels.alpha_bar[i]), float(levels.alpha_bar_prev[i])
        a, _ = ddim_step_coefficients(levels.alpha_bar[i], levels.alpha_bar_prev[i], prediction_type)
        if torch.isfinite(a) and a != 0:
            continue
        if prediction_type == "epsilon" and ab_t == 0:
            raise ValueError(
                f"prediction_type: 'epsilon' cannot be inverted at timestep {t}, where ᾱ_t = 0 (a zero terminal "
                "SNR schedule): the clean-sample estimate x0 = (x − σ·ε) / α is undefined at α = 0; accepted: a "
                "v_prediction model, a schedule without zero terminal SNR (rescale_betas_zero_snr=False), or "
                "timesteps that skip the last one (e.g. timestep_spacing='leading')"
            )
        if prediction_type == "sample" and ab_p == 1:
            raise ValueError(
                f"prediction_type: 'sample' cannot be inverted at timestep {t}: the step lands on ᾱ_prev = 1 "
                "(σ_prev = 0), where it returns the model's x0 whatever the input, so it maps every sample to the "
                "same output; accepted: a schedule with set_alpha_to_one=False, or an epsilon / v_prediction model"
            )
        raise ValueError(
            f"prediction_type: {prediction_type!r} cannot be inverted at timestep {t}: the DDIM step's factor on x_t "
            f"is {float(a):.6g} (ᾱ_t={ab_t:.6g}, ᾱ_prev={ab_p:.6g}); accepted: schedules whose ᾱ lie strictly "
            "between 0 and 1 at the timesteps used"
        )


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
    check_invertible(levels, prediction_type)
    x = latents
    trajectory = [x]
    for i in reversed(range(len(levels.timesteps))):
        t = levels.timesteps[i]
        pred = model(x, t)
        x = ddim_inverse_step(x, pred, levels.alpha_bar[i], levels.alpha_bar_prev[i], prediction_type)
        trajectory.append(x)
    return InversionOutput(latents=x, trajectory=trajectory, timesteps=list(levels.timesteps))


# The flow-matching counterpart (SD3, Flux, Qwen-Image, Wan) lives in its own module.
from .flow_inversion import (  # noqa: E402
    FlowInversionOutput,
    FlowLevels,
    flow_euler_step,
    flow_inverse_step,
    flow_invert,
    flow_levels,
)

__all__ += ["FlowLevels", "flow_levels", "flow_euler_step", "flow_inverse_step", "flow_invert", "FlowInversionOutput"]
