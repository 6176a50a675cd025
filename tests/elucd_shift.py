"""Measuring EluCD's mean shift on a diffusers scheduler: the realised shift of x_{t−1} against the intended one.

EluCD's DDPM path moves the mean of x_{t−1} by u = s·(Σ_t + a_t)·g. On any scheduler the realised shift is
x_{t−1}(guided) − x_{t−1}(unguided) for the same x_t and the same noise draw: the scheduler steps twice from the
same state, once with the plain prediction and once with the hook's. The intended u is re-derived here from the
scheduler's own noise levels, independently of the hook, for a linear classifier f(x) = W·x (one gradient formula,
no autograd). Both are in model-input (VP) units: a sigma scheduler's latents x = x0 + σ·ε are scaled by
1/√(σ_{t−1}² + 1), the scaling of the next step's model input.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from diffusers import DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, LMSDiscreteScheduler
from torch import nn

from guidekit.hooks import SamplerState

SIGMA_SCHEDULERS = (EulerDiscreteScheduler, EulerAncestralDiscreteScheduler, LMSDiscreteScheduler)


class LinearClassifier(nn.Module):
    """logits = W·x (each image flattened; `shape` is one image's), fixed random W: its log-probability gradient has a
    closed form."""

    id2label = {0: "first", 1: "second", 2: "third"}

    def __init__(self, shape: tuple, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.weight = nn.Parameter(torch.randn(3, math.prod(shape), generator=gen, dtype=torch.float64) / 8)

    def forward(self, x):
        return x.flatten(1).to(self.weight.dtype) @ self.weight.T


def linear_gradient(weight: torch.Tensor, x: torch.Tensor, labels: list, tau1: float, tau2: float) -> torch.Tensor:
    """∇ₓ [τ₁·f_y − logsumexp(τ₂·f)] for f = W·x: τ₁·W_y − τ₂·softmax(τ₂·f)ᵀ·W."""
    f = x.flatten(1).double() @ weight.T.double()
    p = torch.softmax(tau2 * f, dim=1)
    g = tau1 * weight[labels].double() - tau2 * p @ weight.double()
    return g.view_as(x)


def noise_levels(scheduler, i: int, t: int, steps: int) -> tuple[float, float, float]:
    """(ᾱ_t, ᾱ_prev, α_next): this step's level, the one the step goes to, and the VP scale of the next latents."""
    if isinstance(scheduler, SIGMA_SCHEDULERS):  # latents = x0 + σ·ε
        s, s_next = float(scheduler.sigmas[i]), float(scheduler.sigmas[i + 1])
        return 1 / (1 + s * s), 1 / (1 + s_next * s_next), 1 / math.sqrt(1 + s_next * s_next)
    if isinstance(scheduler, DPMSolverMultistepScheduler):  # latents = α·x0 + σ·ε, α = 1/√(1 + s²)
        s, s_next = float(scheduler.sigmas[i]), float(scheduler.sigmas[i + 1])
        return 1 / (1 + s * s), 1 / (1 + s_next * s_next), 1.0
    ac = scheduler.alphas_cumprod.double()
    prev = t - scheduler.config.num_train_timesteps // steps
    end = float(getattr(scheduler, "final_alpha_cumprod", 1.0))
    return float(ac[t]), float(ac[prev]) if prev >= 0 else end, 1.0


@dataclass
class Settings:
    scale: float = 1.0
    tau1: float = 1.0
    tau2: float = 0.5
    gamma: float = 0.3
    schedule: str = "ddpm"
    edm_max_guidance: float = 0.004


def intended_shift(settings: Settings, weight, labels, x_in, pred, prediction_type, levels, i, steps) -> torch.Tensor:
    """u of step i, by hand: x̂0 from the prediction, g at clip(x̂0) (pixel model), the weight of the schedule."""
    a, ap, _ = levels[-1]
    alpha, sigma = math.sqrt(a), math.sqrt(1 - a)
    x, p = x_in.double(), pred.double()
    x0 = {"epsilon": (x - sigma * p) / alpha, "v_prediction": alpha * x - sigma * p, "sample": p}[prediction_type]
    g = linear_gradient(weight, x0.clamp(-1, 1), labels, settings.tau1, settings.tau2)
    if settings.schedule == "ddpm":
        post_var = [(1 - lp) / (1 - lt) * (1 - lt / lp) for lt, lp, _ in levels]
        boost = max(settings.gamma * max(post_var) * math.sin(math.pi * (steps - 1 - i) / steps), 0.0)
        return settings.scale * (post_var[-1] + boost) * g
    big_g = settings.scale * settings.edm_max_guidance
    lam = max(big_g * (steps + 1 - i) / (steps + 1), 1e-5) + big_g * settings.gamma * math.sin(math.pi * i / steps)
    rms = lambda v: v.flatten(1).square().mean(1).sqrt().view(-1, *[1] * (v.dim() - 1))  # noqa: E731
    return g / rms(g) * rms(x) * lam


def measure_shifts(scheduler, hook, settings: Settings, steps: int, shape=(2, 3, 8, 8), labels=(0, 2), eta=None,
                   seed: int = 0) -> list[dict]:
    """Run `steps` steps of `scheduler` with random predictions; at each, the hook's correction and both steps.

    Returns one dict per step: ``realised`` and ``intended`` (tensors, VP units), ``ratio`` (the least-squares
    factor ⟨realised, u⟩/⟨u, u⟩) and ``residual`` (‖realised − u‖/‖u‖).
    """
    gen = torch.Generator().manual_seed(seed)
    scheduler.set_timesteps(steps)
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * float(scheduler.init_noise_sigma)
    prediction_type = scheduler.config.prediction_type
    state = SamplerState(num_steps=steps, scheduler=scheduler, prediction_type=prediction_type,
                         extras={} if eta is None else {"eta": eta})
    step_kwargs = {} if eta is None else {"eta": eta}
    weight = hook.classifier.model.weight.detach()
    levels, out = [], []
    for i, t in enumerate(scheduler.timesteps):
        x_in = scheduler.scale_model_input(x, t)
        state.update(i, t, x, model_input=x_in)
        pred = torch.randn(shape, generator=gen, dtype=torch.float64)
        if prediction_type == "sample":
            pred = pred.clamp(-1.5, 1.5)
        guided = hook.correct(state, pred)
        levels.append(noise_levels(scheduler, i, int(t), steps))
        nexts = []
        for p in (pred, guided):
            sched = copy.deepcopy(scheduler)
            nexts.append(sched.step(p, t, x, generator=torch.Generator().manual_seed(100 + i), **step_kwargs).prev_sample)
        realised = (nexts[1] - nexts[0]).double() * levels[-1][2]
        intended = intended_shift(settings, weight, list(labels), x_in, pred, prediction_type, levels, i, steps)
        norm = float(intended.norm())
        out.append({
            "step": i,
            "realised": realised,
            "intended": intended,
            "ratio": float((realised * intended).sum()) / norm**2 if norm > 0 else float("nan"),
            "residual": float((realised - intended).norm()) / norm if norm > 0 else float(realised.norm()),
        })
        x = scheduler.step(pred, t, x, generator=torch.Generator().manual_seed(100 + i), **step_kwargs).prev_sample
    return out
