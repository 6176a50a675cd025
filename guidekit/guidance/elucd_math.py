"""EluCD, off-the-shelf classifier guidance made useful by calibration (Ma et al., ICLR 2024, arXiv 2310.11311):
the math core.

Plain functions on tensors, no diffusers import, so any host can reuse them and tests can check them against the
equations on fixed tensors. The equations follow the official code (AlexMaOLS/EluCD @ 0b79a4e), which has two
sampler paths:

* DDPM (ADM, ancestral sampling): the classifier reads the predicted x̂0 and the mean of p(x_{t−1}|x_t) moves by
  μ ← μ + (Σ_t + a_t)·s·g with g = ∇_{x̂0} log p̃(y|x̂0) and a_t = γ·max_var·sin(π·t/T)
  (:func:`ddpm_guidance_weight`). The gradient is used as it comes, only multiplied by the scale s.
* EDM (Heun): the classifier reads the noisy sample divided by its RMS when that exceeds 1
  (:func:`edm_classifier_input`), and the gradient is rescaled to RMS(x)·λ_i with λ_i a linear decay plus a sine
  bump (:func:`edm_guidance_weight`, :func:`edm_rescale_gradient`) and added to the sample before the Euler step.

Both take the gradient with respect to the classifier's input only, never back through the denoiser
(:func:`classifier_gradient`), of the calibrated log-probability :func:`calibrated_log_prob`, from a classifier
whose ReLUs are smoothed into Softplus (:func:`smooth_classifier`).

[UNCONFIRMED]: the paper's DiT setup (no DiT code was released), and whether the EDM path's use of the noisy sample
(rather than x̂0) as classifier input is deliberate; the code does it.
"""

from __future__ import annotations

import copy
import math
import warnings
from numbers import Real
from typing import Callable, Optional, Union

import torch
from torch import nn

from ..precision import math_dtype

__all__ = [
    "calibrated_log_prob",
    "classifier_gradient",
    "ddpm_guidance_weight",
    "ddpm_posterior_variance",
    "ddpm_sine_boost",
    "edm_classifier_input",
    "edm_guidance_weight",
    "edm_rescale_gradient",
    "flow_posterior_variance",
    "smooth_classifier",
]

Scalar = Union[float, torch.Tensor]


def _real(name: str, value, *, minimum: Optional[float] = None, strict: bool = False) -> float:
    """`value` as a finite float, else a ValueError naming `name`; optionally ≥ (or >) `minimum`."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if minimum is not None and (value <= minimum if strict else value < minimum):
        raise ValueError(f"{name} must be {'>' if strict else '>='} {minimum:g}, got {value!r}")
    return value


def _int(name: str, value, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return value


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return type(value).__name__


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape a (B,) tensor to broadcast against `like` of shape (B, ...)."""
    return values.view(-1, *([1] * (like.dim() - 1)))


def _rms(x: torch.Tensor) -> torch.Tensor:
    """Root mean square per sample over all non-batch dims, shape (B,)."""
    return x.flatten(1).square().mean(dim=1).sqrt()


# --------------------------------------------------------------------------------------------------------------
# Calibrated log-probability


def calibrated_log_prob(
    logits: torch.Tensor,
    labels: torch.Tensor,
    joint_temperature: float = 1.0,
    marginal_temperature: float = 0.5,
) -> torch.Tensor:
    """The calibrated log-probability of EluCD, per sample:

        log p̃(y|x) = τ₁·f_y(x) − log Σ_k exp(τ₂·f_k(x)),

    with f the classifier's logits, τ₁ the joint and τ₂ the marginal temperature. With τ₁ = τ₂ = 1 it is the plain
    log-softmax. The official code evaluates it as ``log(exp(τ₁·f_y) / Σ_k exp(τ₂·f_k))``, which overflows for
    logits of a few hundred (float32); here it is ``τ₁·f_y − logsumexp(τ₂·f)``, equal in exact arithmetic and finite
    for any finite logits.

    Official settings: DDPM τ₁ = 1.0, τ₂ = τ₁ · ``margin_temperature_discount`` = 0.5 (the defaults here); EDM
    τ₁ = 1.0, τ₂ = ``uncond_temperature`` = 0.0, where the second term is the constant log K and the gradient is that
    of the raw logit f_y.

    Args:
        logits (`torch.Tensor`): f, shape (B, K), floating point. Half types are computed in float32.
        labels (`torch.Tensor`): y, an integer tensor of shape (B,) with values in [0, K).
        joint_temperature (`float`, defaults to `1.0`): τ₁, finite and ≥ 0.
        marginal_temperature (`float`, defaults to `0.5`): τ₂, finite and ≥ 0.

    Returns:
        `torch.Tensor` of shape (B,), in float32 (or float64 for float64 logits), differentiable w.r.t. `logits`.
    """
    tau1 = _real("joint_temperature", joint_temperature, minimum=0.0)
    tau2 = _real("marginal_temperature", marginal_temperature, minimum=0.0)
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point() or logits.dim() != 2:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"logits must be a floating-point tensor of shape (batch, classes), got {shape}")
    batch, classes = logits.shape
    if classes == 0:
        raise ValueError("logits must have at least one class, got shape (batch, 0)")
    if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        kind = labels.dtype if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"labels must be an integer tensor of shape ({batch},), got {kind}")
    if labels.shape != (batch,):
        raise ValueError(f"labels must have shape ({batch},) to match logits {tuple(logits.shape)}, got {tuple(labels.shape)}")
    if batch and (int(labels.min()) < 0 or int(labels.max()) >= classes):
        raise ValueError(f"labels must lie in [0, {classes}), got values from {int(labels.min())} to {int(labels.max())}")
    f = logits.to(torch.promote_types(logits.dtype, torch.float32))
    joint = tau1 * f.gather(1, labels.to(device=f.device, dtype=torch.long).view(-1, 1)).squeeze(1)
    return joint - torch.logsumexp(tau2 * f, dim=1)


# --------------------------------------------------------------------------------------------------------------
# Gradient w.r.t. the classifier's input


def classifier_gradient(
    log_prob_fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, return_nonfinite: bool = False
) -> Union[torch.Tensor, tuple[torch.Tensor, int]]:
    """g = ∇ₓ Σ_b log p̃(y_b|x_b): the gradient of the summed per-sample log-probabilities w.r.t. `x` alone.

    The graph is built under ``torch.enable_grad()`` on a detached copy of `x`, so it works inside a sampler's
    ``torch.no_grad()`` loop and never reaches whatever produced `x` (the denoiser). Summing is what the official code
    does; each sample gets the gradient of its own term as long as the classifier treats samples independently
    (batch norm in eval mode).

    Never NaN: a sample whose gradient has any non-finite element (an overflow, or a NaN input) gets a zero
    gradient, i.e. no correction, and an `x` that `log_prob_fn` does not use gives zeros. A zero gradient stays
    zero, so it also gives no correction. Zeroing is never silent: it warns with the count of such samples, or
    returns the count (``return_nonfinite=True``) for a caller that reports it itself.

    Args:
        log_prob_fn (`Callable[[torch.Tensor], torch.Tensor]`): maps the classifier input (B, ...) to the
            log-probabilities, shape (B,) (or anything whose sum is the objective), e.g.
            ``lambda x: calibrated_log_prob(classifier(x), labels)``.
        x (`torch.Tensor`): the classifier input (x̂0 or the normalised noisy sample), shape (B, ...), floating
            point. It is not modified.
        return_nonfinite (`bool`, defaults to `False`): also return how many samples had a non-finite gradient
            (and were zeroed), instead of warning about them.

    Returns:
        `torch.Tensor`, the gradient, detached, same shape and dtype as `x` (a half `x` gives a half gradient; a
        classifier run in float32 should upcast inside `log_prob_fn`); with ``return_nonfinite=True``, the pair
        (gradient, number of zeroed samples).

    Raises:
        RuntimeError: under ``torch.inference_mode()``, where ``enable_grad`` cannot record a graph (run the sampler
            under ``torch.no_grad()`` instead).
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 1:
        raise ValueError(f"x must be a floating-point tensor of shape (batch, ...), got {_describe(x)}")
    if not callable(log_prob_fn):
        raise ValueError(f"log_prob_fn must be callable, got {type(log_prob_fn).__name__}")
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            "classifier_gradient cannot take a gradient under torch.inference_mode(); "
            "run the sampling loop under torch.no_grad() instead"
        )
    with torch.enable_grad():
        x_in = x.detach()
        if x_in.is_inference():  # a tensor made under inference_mode earlier: copy it into a normal tensor
            x_in = x_in.clone()
        x_in.requires_grad_(True)
        objective = log_prob_fn(x_in)
        if not isinstance(objective, torch.Tensor) or not objective.is_floating_point():
            raise ValueError(f"log_prob_fn must return a floating-point tensor, got {type(objective).__name__}")
        grad = None
        if objective.requires_grad:  # else constant in x: the gradient is zero
            (grad,) = torch.autograd.grad(objective.sum(), x_in, allow_unused=True)
    grad = torch.zeros_like(x) if grad is None else grad.detach().to(x.dtype)
    grad, zeroed = zero_nonfinite(grad)
    if return_nonfinite:
        return grad, zeroed
    if zeroed:
        warnings.warn(nonfinite_message("the classifier gradient", zeroed, grad.shape[0]), UserWarning, stacklevel=2)
    return grad


def zero_nonfinite(values: torch.Tensor) -> tuple[torch.Tensor, int]:
    """`values` (B, ...) with every sample that holds a non-finite element set to zero, and how many were."""
    finite = torch.isfinite(values.flatten(1) if values.dim() > 1 else values.view(-1, 1)).all(dim=1)
    zeroed = int((~finite).sum())
    if zeroed == 0:
        return values, 0
    return torch.where(_per_sample(finite, values), values, torch.zeros_like(values)), zeroed


def nonfinite_message(what: str, zeroed: int, total: int, unit: str = "samples", method: str = "EluCD") -> str:
    """The warning for gradients zeroed because they were not finite: guidance must never stop silently."""
    return (
        f"{method}: {what} was non-finite for {zeroed} of {total} {unit} and was zeroed; guidance did nothing for "
        f"them (an overflow, e.g. a half-precision decoder or classifier, or a NaN input)"
    )


# --------------------------------------------------------------------------------------------------------------
# DDPM schedule (official DDPM/guided_diffusion/gaussian_diffusion.py, p_sample)


def ddpm_posterior_variance(alpha_prod_t: Scalar, alpha_prod_prev: Scalar) -> Scalar:
    """Σ_t = (1 − ᾱ_prev)/(1 − ᾱ_t) · (1 − ᾱ_t/ᾱ_prev), the variance of q(x_{t−1} | x_t, x0) between two
    (possibly respaced) steps.

    The official DDPM path uses the ADM model's *learned* variance (``learn_sigma``, learned range) as Σ_t; for a
    model with a fixed variance this posterior variance ("fixed_small") is the corresponding quantity. It is 0 at
    the last step when ᾱ_prev = 1.

    Args:
        alpha_prod_t (`float` or `torch.Tensor`): ᾱ_t, in (0, 1).
        alpha_prod_prev (`float` or `torch.Tensor`): ᾱ of the next, less noisy step, in [ᾱ_t, 1].

    Returns:
        Σ_t, a float for float inputs, else a tensor.
    """
    if not isinstance(alpha_prod_t, torch.Tensor):
        a_t = _real("alpha_prod_t", alpha_prod_t)
        if not 0.0 < a_t < 1.0:
            raise ValueError(f"alpha_prod_t must lie in (0, 1), got {alpha_prod_t!r}")
    if not isinstance(alpha_prod_prev, torch.Tensor):
        a_prev = _real("alpha_prod_prev", alpha_prod_prev)
        if not 0.0 < a_prev <= 1.0:
            raise ValueError(f"alpha_prod_prev must lie in (0, 1], got {alpha_prod_prev!r}")
    if not isinstance(alpha_prod_t, torch.Tensor) and not isinstance(alpha_prod_prev, torch.Tensor):
        if a_prev < a_t:
            raise ValueError(f"alpha_prod_prev ({a_prev!r}) must be >= alpha_prod_t ({a_t!r})")
    return (1 - alpha_prod_prev) / (1 - alpha_prod_t) * (1 - alpha_prod_t / alpha_prod_prev)


def flow_posterior_variance(sigma: float, sigma_next: float) -> float:
    """Σ of q(x_{σ'} | x_σ, x0) on the flow-matching path x_σ = (1 − σ)·x0 + σ·ε, between this step's σ and the
    σ' < σ the scheduler steps to: the flow counterpart of :func:`ddpm_posterior_variance`.

    The path is the Gaussian one with α = 1 − σ (not variance preserving), so the DDPM algebra holds with the
    forward transition x_σ = α_{t|s}·x_{σ'} + σ_{t|s}·ε', α_{t|s} = α/α', σ²_{t|s} = σ² − α²_{t|s}·σ'²:
    Σ = σ²_{t|s}·σ'²/σ². With α² + σ² = 1 this is (1 − ᾱ_prev)/(1 − ᾱ_t)·(1 − ᾱ_t/ᾱ_prev) again. At σ = 1
    (pure noise) it is σ'², and 0 at the last step (σ' = 0).

    Args:
        sigma (`float`): σ of this step, in (0, 1].
        sigma_next (`float`): σ' of the next step, in [0, σ).

    Returns:
        Σ, a float.
    """
    s, s_next = _real("sigma", sigma), _real("sigma_next", sigma_next)
    if not 0.0 < s <= 1.0:
        raise ValueError(f"sigma must lie in (0, 1], got {sigma!r}")
    if not 0.0 <= s_next < s:
        raise ValueError(f"sigma_next must lie in [0, sigma) = [0, {s!r}), got {sigma_next!r}")
    alpha_ts = (1.0 - s) / (1.0 - s_next)
    var_ts = s * s - alpha_ts * alpha_ts * s_next * s_next
    return var_ts * s_next * s_next / (s * s)


def ddpm_sine_boost(t: Scalar, num_timesteps: int, max_variance: Scalar, gamma: float = 0.3) -> Scalar:
    """a_t = max(γ · max_var · sin(π·t/T), 0): EluCD's sine-shaped boost of the DDPM guidance weight.

    It is ≈ 0 at both ends of the trajectory and peaks at t = T/2.

    Args:
        t (`float` or `torch.Tensor`): the official t, the respaced timestep index, which counts *down* from T − 1 at
            the first sampling step to 0 at the last. With a step index i counted from 0, t = T − 1 − i. Must lie in
            [0, T].
        num_timesteps (`int`): T, the number of (respaced) sampling steps, ≥ 1 (250 in the official script).
        max_variance (`float` or `torch.Tensor`): max_var, the running maximum of the variance Σ seen so far in this
            sampling run (reset to 0 at the start of each run). The official code takes Σ as one scalar, element
            [0, 0, 0, 0] of the learned variance (sample 0, first channel, first pixel), and since Σ shrinks along
            the trajectory max_var is in practice the first step's value. Must be ≥ 0.
        gamma (`float`, defaults to `0.3`): γ, ``gamma_factor`` in the official script, finite and ≥ 0; 0 turns the
            boost off.

    Returns:
        a_t, a float for float inputs, else a tensor.

    Float arguments are range-checked; tensor values are not (that would synchronise with the device).
    """
    steps = _int("num_timesteps", num_timesteps, minimum=1)
    gamma = _real("gamma", gamma, minimum=0.0)
    if not isinstance(t, torch.Tensor):
        t = _real("t", t)
        if not 0.0 <= t <= steps:
            raise ValueError(f"t must lie in [0, num_timesteps={steps}], got {t!r}")
    if not isinstance(max_variance, torch.Tensor):
        max_variance = _real("max_variance", max_variance, minimum=0.0)
    if isinstance(t, torch.Tensor) or isinstance(max_variance, torch.Tensor):
        phase = torch.sin(torch.as_tensor(t) * (math.pi / steps))
        return (phase * max_variance * gamma).clamp_min(0.0)
    return max(math.sin(t / steps * math.pi) * max_variance * gamma, 0.0)


def ddpm_guidance_weight(
    variance: Scalar, t: Scalar, num_timesteps: int, max_variance: Scalar, gamma: float = 0.3
) -> Scalar:
    """w_t = Σ_t + a_t = Σ_t + max(γ · max_var · sin(π·t/T), 0): the DDPM-path weight of the classifier gradient.

    The official sampler shifts the mean of p(x_{t−1} | x_t) by

        μ ← μ + w_t · s · g,    g = ∇_{x̂0} log p̃(y | x̂0),

    where x̂0 is the (clipped, detached) predicted clean sample and s the ``classifier_scale`` (1.0). The gradient is
    neither normalised nor multiplied by a chain factor such as 1/√ᾱ_t, although it is taken w.r.t. x̂0 and added
    in x_t space. Noise is then added as usual. With γ = 0 this is the classic Σ_t-weighted classifier guidance.

    The paper's form, γ_t = σ_t + γ·σ_T·sin(πt/T), is known only from a secondary summary [UNCONFIRMED]; this
    function follows the code.

    Args:
        variance (`float` or `torch.Tensor`): Σ_t, the variance of the reverse step (the model's learned variance in
            the official code, possibly per pixel; see :func:`ddpm_posterior_variance` for a fixed-variance model).
        t (`float` or `torch.Tensor`): the respaced timestep index, counting down from T − 1 to 0 (see
            :func:`ddpm_sine_boost`).
        num_timesteps (`int`): T, the number of (respaced) sampling steps.
        max_variance (`float` or `torch.Tensor`): the running maximum of Σ in this run (see :func:`ddpm_sine_boost`).
        gamma (`float`, defaults to `0.3`): γ, the official ``gamma_factor``.

    Returns:
        w_t, a float for float inputs, else a tensor broadcast from `variance`.
    """
    if not isinstance(variance, torch.Tensor):
        variance = _real("variance", variance, minimum=0.0)
    return variance + ddpm_sine_boost(t, num_timesteps, max_variance, gamma)


# --------------------------------------------------------------------------------------------------------------
# EDM schedule (official EDM/generate.py, edm_sampler)


def edm_classifier_input(x: torch.Tensor) -> torch.Tensor:
    """x_in = x / max(1, RMS(x)), per sample: what the EDM path feeds the classifier.

    The official EDM sampler gives the classifier the *noisy* current sample x_cur (not the denoised x̂0, unlike
    its DDPM path), divided by its RMS over (C, H, W) when that exceeds 1, so high-noise samples come in at unit
    scale. Whether the paper intends the noisy input is [UNCONFIRMED]; the code does this.

    Args:
        x (`torch.Tensor`): the current sample, shape (B, ...), floating point.

    Returns:
        `torch.Tensor` of the same shape and dtype, differentiable w.r.t. `x`.
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 2:
        raise ValueError(f"x must be a floating-point tensor of shape (batch, ...), got {_describe(x)}")
    return x / _per_sample(_rms(x).clamp_min(1.0), x)


def edm_guidance_weight(
    step: int, num_steps: int, max_guidance: float = 0.004, add_factor: float = 0.3, floor: float = 1e-5
) -> float:
    """λ_i = max(G·(N + 1 − i)/(N + 1), floor) + G·γ·sin(π·i/N): EluCD's EDM guidance schedule.

    A linear decay from G over the N + 1 noise levels of the EDM grid (``len(t_steps)`` = N + 1, the last one 0)
    plus a sine bump of height G·γ in the middle of the trajectory. The floor keeps λ_i ≥ 1e-5 even when G = 0, as
    in the code. The gradient is then rescaled to RMS(x)·λ_i (:func:`edm_rescale_gradient`).

    Args:
        step (`int`): i, the sampling step, 0 ≤ i < N (0 = the noisiest).
        num_steps (`int`): N, the number of sampling steps, ≥ 1 (official script: 10).
        max_guidance (`float`, defaults to `0.004`): G, ``max_guidance``; 0.004 in the official script (the code's
            own default is 0.001). Finite, ≥ 0.
        add_factor (`float`, defaults to `0.3`): γ, ``add_factor``; 0.3 in the official script (the code's own
            default is 0.0, no bump). Finite, ≥ 0.
        floor (`float`, defaults to `1e-5`): the lower bound of the linear part, a constant in the official code.
            Finite, ≥ 0.

    Returns:
        λ_i as a float.
    """
    n = _int("num_steps", num_steps, minimum=1)
    i = _int("step", step, minimum=0)
    if i >= n:
        raise ValueError(f"step must lie in [0, num_steps={n}), got {step!r}")
    g = _real("max_guidance", max_guidance, minimum=0.0)
    gamma = _real("add_factor", add_factor, minimum=0.0)
    floor = _real("floor", floor, minimum=0.0)
    linear = max(g * (n + 1 - i) / (n + 1), floor)
    return linear + g * gamma * math.sin(math.pi * i / n)


def edm_rescale_gradient(grad: torch.Tensor, x: torch.Tensor, weight: Scalar) -> torch.Tensor:
    """Δx = g / RMS(g) · RMS(x) · λ_i, per sample: the EDM-path correction, added to x before the Euler step.

    The official sampler then steps from x_hat = x_cur + √(t_hat² − t_cur²)·noise + Δx; the Heun correction is
    unchanged. The step is thus a fixed fraction λ_i of the sample's own scale, whatever the classifier's gradient
    magnitude. RMS(x) is that of the raw sample, not of the classifier input. A sample whose gradient is zero or
    not finite gets Δx = 0 (the official code divides by zero there); a non-finite one also warns with the count.

    Args:
        grad (`torch.Tensor`): g, the classifier gradient, shape (B, ...).
        x (`torch.Tensor`): the current sample x_cur, same shape.
        weight (`float` or `torch.Tensor`): λ_i (:func:`edm_guidance_weight`); a tensor of shape (B,) gives one per
            sample.

    Returns:
        `torch.Tensor` Δx, same shape and dtype as `x`, computed in float64 (float32 on MPS).
    """
    if not isinstance(grad, torch.Tensor) or not isinstance(x, torch.Tensor) or grad.shape != x.shape or x.dim() < 2:
        raise ValueError(f"grad and x must be tensors of the same shape (batch, ...), got {_describe(grad)} and {_describe(x)}")
    if not isinstance(weight, torch.Tensor):
        weight = _real("weight", weight, minimum=0.0)
    dtype = math_dtype(x.device)
    g, zeroed = zero_nonfinite(grad.to(dtype))
    if zeroed:
        warnings.warn(nonfinite_message("the gradient", zeroed, g.shape[0]), UserWarning, stacklevel=2)
    g_rms = _rms(g)
    scale = _rms(x.to(dtype)) / g_rms.clamp_min(torch.finfo(dtype).tiny)
    scale = torch.where(g_rms > 0, scale, torch.zeros_like(scale))
    if isinstance(weight, torch.Tensor):
        if weight.dim() > 1 or (weight.dim() == 1 and weight.shape[0] != x.shape[0]):
            raise ValueError(f"weight must be a float, a 0-d tensor or a tensor of shape ({x.shape[0]},), got {_describe(weight)}")
        scale = scale * weight.to(device=x.device, dtype=dtype)
    else:
        scale = scale * weight
    return (g * _per_sample(scale, g)).to(x.dtype)


# --------------------------------------------------------------------------------------------------------------
# Classifier smoothing


def smooth_classifier(model: nn.Module, beta: Optional[float]) -> nn.Module:
    """A deep copy of `model` whose every ``nn.ReLU`` module is ``nn.Softplus(beta)``.

    Softplus_β(x) = (1/β)·log(1 + e^{β·x}) is a smooth ReLU (within log 2 / β of it), which gives an off-the-shelf
    classifier smoother input gradients. The official code uses β = 3.0 (DDPM) and 5.0 (EDM).

    * What is replaced: every ``nn.ReLU`` instance (subclasses included) held as a submodule anywhere in the tree,
      including ``inplace=True`` ones (Softplus is never in place). A ReLU instance reached from several places
      (torchvision's Bottleneck calls one ReLU three times; one module may sit in two parents) becomes a single
      Softplus, shared the same way. ReLUs applied functionally (``F.relu``, ``torch.relu``, ``x.relu()``), held
      outside the module tree, or other activations (GELU, ReLU6, ...) are not replaced: check
      ``softplus_replaced``. Forward hooks registered on a replaced ReLU are dropped with it.
    * The result is always a new, independent copy (its own parameters, same device, dtype, train/eval mode and
      ``requires_grad`` flags), so the caller may freeze or move it; `model` itself is never modified. This holds
      for ``beta=None`` too, for a consistent contract; skip the call to avoid the copy.
    * The copy carries ``softplus_replaced`` (`int`): the number of distinct ReLU module instances replaced (0 for
      ``beta=None``, or for a model without ``nn.ReLU`` modules, where smoothing does nothing).

    Args:
        model (`nn.Module`): the classifier.
        beta (`float` or `None`): β of the Softplus, finite and > 0; ``None`` keeps the ReLUs (the official default
            β = ∞; pass None rather than ``math.inf``).

    Returns:
        `nn.Module`, the smoothed copy.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if beta is not None:
        beta = _real("beta", beta, minimum=0.0, strict=True)
    smoothed = copy.deepcopy(model)  # deepcopy keeps shared submodules shared
    replaced: dict[nn.Module, nn.Softplus] = {}  # keyed by the ReLU object itself: identity hashing, kept alive
    if beta is not None:
        if isinstance(smoothed, nn.ReLU):
            smoothed = nn.Softplus(beta=beta)
            replaced[model] = smoothed
        else:
            for parent in list(smoothed.modules()):
                for name, child in list(parent._modules.items()):
                    if isinstance(child, nn.ReLU):
                        if child not in replaced:
                            replaced[child] = nn.Softplus(beta=beta)
                        parent._modules[name] = replaced[child]
    smoothed.softplus_replaced = len(replaced)
    return smoothed
