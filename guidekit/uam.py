"""Adaptive mask-guided editing of UAM (Mo et al., WACV 2025, Alg. 1; METHODS.md §2.4): the mask math.

Plain tensor functions (no diffusers), one per step of the algorithm. At denoising step i (of N), with the
x0-estimates x̂0^src, x̂0^tgt and x̂0^u of the source, target and auxiliary (uniform-map) branches:

1. Δ = x̂0^src − x̂0^tgt                                         (element-wise over the C×h×w latent)
2. q_i = linspace(0, q_max, N)[i]                                `quantile_schedule`
3. τ_i = quantile(|Δ|, q_i)                                      per image pair
4. M_edit = 1[|Δ| > τ_i] ("paper") or 1[|soft(Δ, τ_i)| > τ_i] = 1[|Δ| > 2τ_i] ("code")   `edit_mask`
5. dilate M_edit (code) or M_keep (paper) with a (2r+1)² max-pool, M_keep = 1 − M_edit   `adaptive_masks`
6. only while recon_t_end < t < recon_t (DDPM timestep units)    `mask_active`
7. x̂0^tgt ← M_keep ⊙ x̂0^u + (1 − M_keep) ⊙ x̂0^tgt
   x̂0^src ← M_edit ⊙ x̂0^u + (1 − M_edit) ⊙ x̂0^src             `blend_x0`

Computed in `guidekit.precision.math_dtype` of the tensors' device (float64; float32 on MPS, which has no
float64).
"""

from __future__ import annotations

import math
from typing import Tuple

import torch
import torch.nn.functional as F

from .precision import math_dtype

__all__ = [
    "quantile_schedule",
    "soft_threshold",
    "edit_mask",
    "dilate",
    "adaptive_masks",
    "blend_x0",
    "mask_active",
    "THRESHOLD_RULES",
    "DILATE_TARGETS",
]

THRESHOLD_RULES = ("code", "paper")
DILATE_TARGETS = ("edit", "keep")


def _check_quantile(quantile) -> float:
    try:
        q = float(quantile)
    except (TypeError, ValueError):
        q = float("nan")
    if isinstance(quantile, bool) or not (0.0 < q < 1.0) or not math.isfinite(q):
        raise ValueError(f"quantile: {quantile!r} is not accepted; accepted: a number in the open interval (0, 1)")
    return q


def quantile_schedule(quantile: float, num_steps: int) -> torch.Tensor:
    """q_i = linspace(0, quantile, num_steps)[i]: the quantile level used at denoising step i.

    A CPU tensor (it is read one level at a time), in the math dtype of the CPU.

    Args:
        quantile (`float`): q_max, in (0, 1). The official script uses 0.5, its editor's default is 0.7.
        num_steps (`int`): number of denoising steps N (the official code hard-codes 50).
    """
    q = _check_quantile(quantile)
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps: {num_steps!r} is not accepted; accepted: an integer >= 1")
    return torch.linspace(0.0, q, num_steps, dtype=math_dtype(torch.device("cpu")))


def soft_threshold(delta: torch.Tensor, tau) -> torch.Tensor:
    """soft(Δ, τ) = Δ − clamp(Δ, −τ, τ) = sign(Δ)·max(|Δ| − τ, 0)."""
    tau = torch.as_tensor(tau, dtype=delta.dtype, device=delta.device)
    return delta - torch.maximum(torch.minimum(delta, tau), -tau)


def edit_mask(delta: torch.Tensor, tau, threshold_rule: str = "code") -> torch.Tensor:
    """Binary edit mask (float) of a difference Δ at threshold τ.

    Args:
        delta (`torch.Tensor`): Δ = x̂0^src − x̂0^tgt.
        tau: τ (a scalar or a tensor broadcastable to `delta`).
        threshold_rule (`str`, defaults to ``"code"``): ``"code"``: the official code soft-thresholds Δ in
            place and then compares it to τ again, i.e. 1[|Δ| > 2τ]; ``"paper"``: Alg. 1's 1[|Δ| > τ].
    """
    if threshold_rule == "code":
        return (soft_threshold(delta, tau).abs() > tau).to(delta.dtype)
    if threshold_rule == "paper":
        return (delta.abs() > tau).to(delta.dtype)
    raise ValueError(f"threshold_rule: {threshold_rule!r} is not accepted; accepted: {', '.join(map(repr, THRESHOLD_RULES))}")


def dilate(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Binary dilation of each channel of `mask` (…, H, W) with a (2·radius+1)² square (a max-pool)."""
    if isinstance(radius, bool) or not isinstance(radius, int) or radius < 0:
        raise ValueError(f"radius: {radius!r} is not accepted; accepted: an integer >= 0")
    if radius == 0:
        return mask
    shape = mask.shape
    flat = mask.reshape(-1, 1, shape[-2], shape[-1])
    out = F.max_pool2d(flat, kernel_size=2 * radius + 1, stride=1, padding=radius)
    return out.reshape(shape)


def adaptive_masks(
    x0_src: torch.Tensor,
    x0_tgt: torch.Tensor,
    quantile_level: float,
    dilate_radius: int = 1,
    threshold_rule: str = "code",
    dilate_target: str = "edit",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(M_edit, M_keep) for a batch of image pairs (B, C, h, w); the quantile is taken per pair.

    Args:
        x0_src (`torch.Tensor`): x̂0 of the source branch.
        x0_tgt (`torch.Tensor`): x̂0 of the target branch.
        quantile_level (`float`): q_i of this step, in [0, 1].
        dilate_radius (`int`, defaults to `1`): r; the official code's `dilate_mask=1` (a 3×3 max-pool).
        threshold_rule (`str`, defaults to ``"code"``): see `edit_mask`.
        dilate_target (`str`, defaults to ``"edit"``): ``"edit"`` dilates the edit mask (official code: a
            margin around the edited region stays free to change); ``"keep"`` dilates the keep mask, as
            Alg. 1 writes M = dilate(|Δ| ≤ λ) (the margin is pulled towards the uniform-map branch).
    """
    if dilate_target not in DILATE_TARGETS:
        raise ValueError(f"dilate_target: {dilate_target!r} is not accepted; accepted: {', '.join(map(repr, DILATE_TARGETS))}")
    if not 0.0 <= float(quantile_level) <= 1.0:
        raise ValueError(f"quantile_level: {quantile_level!r} is not accepted; accepted: a number in [0, 1]")
    dtype = math_dtype(x0_src.device)
    delta = x0_src.to(dtype) - x0_tgt.to(dtype)
    flat = delta.abs().flatten(1)
    tau = torch.quantile(flat, float(quantile_level), dim=1).view(-1, *([1] * (delta.ndim - 1)))
    m_edit = edit_mask(delta, tau, threshold_rule)
    if dilate_target == "edit":
        m_edit = dilate(m_edit, dilate_radius)
        return m_edit, 1.0 - m_edit
    m_keep = dilate(1.0 - m_edit, dilate_radius)
    return 1.0 - m_keep, m_keep


def blend_x0(
    x0_src: torch.Tensor,
    x0_tgt: torch.Tensor,
    x0_uam: torch.Tensor,
    m_edit: torch.Tensor,
    m_keep: torch.Tensor,
    blend_source: bool = True,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Alg. 1's x0 blend: the unedited region of the target and the edited region of the source are taken
    from the uniform-map branch. Returns (x̂0^src, x̂0^tgt) in the math dtype of the device.

    Args:
        blend_source (`bool`, defaults to `True`): also blend the source branch (the README's "red line"
            improvement, in the official code); False leaves x̂0^src unchanged.
    """
    dtype = math_dtype(x0_uam.device)
    u = x0_uam.to(dtype)
    src, tgt = x0_src.to(dtype), x0_tgt.to(dtype)
    tgt = m_keep * u + (1.0 - m_keep) * tgt
    if blend_source:
        src = m_edit * u + (1.0 - m_edit) * src
    return src, tgt


def mask_active(timestep, recon_t: int, recon_t_end: int = 0) -> bool:
    """Whether the mask is applied at this timestep: recon_t_end < t < recon_t (DDPM timestep units)."""
    return recon_t_end < int(timestep) < recon_t
