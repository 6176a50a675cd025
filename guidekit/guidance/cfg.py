"""Classifier-free guidance as a guidekit hook: the default filler of the guidance slot."""

from __future__ import annotations

from typing import Optional

import torch

from ..checks import check_number
from ..hooks import SamplerHook, SamplerState

__all__ = ["CFG", "rescale_guided"]


def rescale_guided(guided: torch.Tensor, pred_cond: torch.Tensor, guidance_rescale: float) -> torch.Tensor:
    """Rescale a CFG prediction toward the conditional one's std (Lin et al. 2023, Sec. 3.4).

    The same operations, in the same order, as diffusers' `rescale_noise_cfg`, so outputs stay bit-equal.
    """
    dims = list(range(1, pred_cond.ndim))
    std_cond = pred_cond.std(dim=dims, keepdim=True)
    std_guided = guided.std(dim=dims, keepdim=True)
    rescaled = guided * (std_cond / std_guided)
    return guidance_rescale * rescaled + (1 - guidance_rescale) * guided


class CFG(SamplerHook):
    """Classifier-free guidance, `P_u + w (P_c − P_u)`, exactly as the stock diffusers pipelines compute it.

    Args:
        guidance_scale (`float`, *optional*): w. `None` takes the pipeline call's `guidance_scale`.
        guidance_rescale (`float`, *optional*): φ of "Common Diffusion Noise Schedules and Sample Steps are
            Flawed"; `None` takes the call's `guidance_rescale` (0 by default, i.e. off).
    """

    slot = "guidance"

    def __init__(self, guidance_scale: Optional[float] = None, guidance_rescale: Optional[float] = None):
        self.guidance_scale = check_number("guidance_scale", guidance_scale, 0.0, allow_none=True)
        self.guidance_rescale = check_number("guidance_rescale", guidance_rescale, 0.0, 1.0, allow_none=True)

    def needs_uncond(self, state: SamplerState) -> bool:
        # Stock pipelines skip the unconditional pass when w <= 1.
        return state.guidance_scale > 1

    def guide(self, state: SamplerState, pred_cond: torch.Tensor, pred_uncond: Optional[torch.Tensor]) -> torch.Tensor:
        if pred_uncond is None:
            return pred_cond
        guided = pred_uncond + state.guidance_scale * (pred_cond - pred_uncond)
        phi = state.guidance_rescale if self.guidance_rescale is None else self.guidance_rescale
        if phi > 0.0:
            guided = rescale_guided(guided, pred_cond, phi)
        return guided

    def __repr__(self) -> str:
        return f"CFG(guidance_scale={self.guidance_scale}, guidance_rescale={self.guidance_rescale})"
