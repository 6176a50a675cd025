"""Adaptive projected guidance (Sadat, Hilliges, Weber, ICLR 2025, arXiv 2410.02416): the math core.

Plain functions on tensors, no diffusers import, so any host (diffusers pipelines, a diffusers guider,
a ComfyUI node) can reuse them and tests can check them against Algorithm 1 on fixed tensors.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..precision import math_dtype  # re-exported: the one rule lives in guidekit.precision

__all__ = ["project", "apg_step", "check_norm_dims", "math_dtype"]


def check_norm_dims(norm_dims: Optional[tuple[int, ...]], ndim: int) -> Optional[tuple[int, ...]]:
    """`norm_dims` as non-negative dims of an `ndim`-dim tensor; None stays None (all non-batch dims).

    The batch dim 0 is never among them: every sample is guided on its own.
    """
    if norm_dims is None:
        return None
    dims = tuple(norm_dims) if isinstance(norm_dims, (tuple, list)) else None
    ok = bool(dims) and all(isinstance(d, int) and not isinstance(d, bool) and -ndim < d < ndim for d in dims)
    if ok:
        dims = tuple(sorted({d % ndim for d in dims}))
    if not ok or 0 in dims:
        raise ValueError(
            f"norm_dims: {norm_dims!r} is not accepted for a {ndim}-dim prediction; accepted: None (all non-batch "
            f"dims) or a non-empty tuple of dims among 1..{ndim - 1}"
        )
    return dims


def _norm(x: torch.Tensor, dims: Optional[tuple[int, ...]] = None) -> torch.Tensor:
    """L2 norm per sample over `dims` (None: all non-batch dims), keeping dims for broadcasting."""
    if dims is None:
        return x.flatten(1).norm(dim=1).view(-1, *([1] * (x.dim() - 1)))
    return torch.linalg.vector_norm(x, dim=dims, keepdim=True)


def project(
    v: torch.Tensor, onto: torch.Tensor, dims: Optional[tuple[int, ...]] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split `v` into the parts parallel and orthogonal to `onto`, per sample (Algorithm 1, `project`).

    `dims` are the dims that form one vector (None: all non-batch dims); every other index (the batch, and
    e.g. the frames of a video) gets its own projection. A zero `onto` has no direction: then the parallel
    part is zero and `v` is all orthogonal.
    """
    norm = _norm(onto, dims)
    unit = onto / norm.clamp_min(torch.finfo(onto.dtype).tiny)  # a zero `onto` gives a zero unit vector
    if dims is None:
        inner = (v * unit).flatten(1).sum(dim=1).view_as(norm)
    else:
        inner = (v * unit).sum(dim=dims, keepdim=True)
    parallel = inner * unit
    return parallel, v - parallel


def apg_step(
    pred_cond: torch.Tensor,
    pred_uncond: torch.Tensor,
    guidance_scale: float,
    eta: float = 0.0,
    norm_threshold: Optional[float] = 15.0,
    momentum: float = -0.5,
    running: Optional[torch.Tensor] = None,
    norm_dims: Optional[tuple[int, ...]] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """One step of Algorithm 1 of the APG paper, in the paper's convention.

    Δ = P_c − P_u; with momentum β ≠ 0: m ← Δ + β·m, Δ ← m; rescale Δ to norm at most r;
    split Δ into Δ∥ + Δ⊥ along P_c; u = Δ⊥ + η·Δ∥; return P_c + (w − 1)·u.

    Args:
        pred_cond (`torch.Tensor`): conditional prediction P_c, shape (B, ...).
        pred_uncond (`torch.Tensor`): unconditional prediction P_u, same shape.
        guidance_scale (`float`): w; 1 returns P_c.
        eta (`float`, defaults to `0.0`): weight η of the component of Δ parallel to P_c.
        norm_threshold (`float` or `None`, defaults to `15.0`): radius r; `None` turns rescaling off.
        momentum (`float`, defaults to `-0.5`): β of the reverse momentum; 0 turns it off.
        running (`torch.Tensor`, *optional*): the running average m from the previous step (None at the first),
            the shape of the predictions.
        norm_dims (`tuple[int, ...]`, *optional*): the dims over which the norm for r and the projection onto
            P_c are taken. `None` (the paper's image case) takes all non-batch dims, one vector per sample.
            A subset such as (1, 3, 4) of (B, C, F, H, W) video latents makes every frame its own vector, with
            its own rescaling to r and its own projection. Momentum is element-wise and unaffected.

    Returns:
        The guided prediction (dtype of `pred_cond`) and the new running average (None without momentum).
    """
    norm_dims = check_norm_dims(norm_dims, pred_cond.dim())
    if running is not None and running.shape != pred_cond.shape:
        raise ValueError(
            f"running: shape {tuple(running.shape)} is not accepted; accepted: the predictions' shape "
            f"{tuple(pred_cond.shape)} (a running average from the same sampling call), or None"
        )
    dtype = math_dtype(pred_cond.device)
    cond = pred_cond.to(dtype)
    delta = cond - pred_uncond.to(dtype)
    if momentum != 0:
        running = delta if running is None else delta + momentum * running.to(dtype)
        delta = running
    else:
        running = None
    if norm_threshold is not None:
        norm = _norm(delta, norm_dims)
        factor = torch.clamp(norm_threshold / torch.clamp(norm, min=torch.finfo(dtype).tiny), max=1.0)
        delta = delta * factor
    parallel, orthogonal = project(delta, cond, norm_dims)
    update = orthogonal + eta * parallel
    guided = cond + (guidance_scale - 1.0) * update
    return guided.to(pred_cond.dtype), running
