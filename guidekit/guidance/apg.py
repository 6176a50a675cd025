"""Adaptive projected guidance as a guidekit hook (the guidance slot)."""

from __future__ import annotations

from typing import Optional

import torch

from ..checks import check_choice, check_number, check_window
from ..hooks import SUPPORTED_SCHEDULERS, SamplerHook, SamplerState, scheduler_family
from .apg_math import apg_step
from .cfg import rescale_guided

__all__ = ["APG"]

# Video latents of guidekit's video pipelines (AnimateDiff) are (B, C, F, H, W): one frame is (C, H, W).
VIDEO_NDIM = 5
FRAME_DIMS = (1, 3, 4)


class APG(SamplerHook):
    """Adaptive projected guidance, Algorithm 1 of Sadat et al. (ICLR 2025): CFG without oversaturation.

    Per step: Δ = P_c − P_u, reverse momentum, rescale to radius r, drop (η = 0) the part of Δ parallel to
    P_c, output P_c + (w − 1)·u. With η = 1, no rescaling and no momentum this is exactly CFG.

    Args:
        guidance_scale (`float`, *optional*): w. `None` takes the pipeline call's `guidance_scale`; a value
            that contradicts a scale passed to the call is an error.
        eta (`float`, defaults to `0.0`): weight of the parallel component, in [0, 1]. The paper recommends 0.
        norm_threshold (`float` or `None`, defaults to `15.0`): radius r of the rescaling, > 0; `None` turns
            rescaling off. r is a raw L2 norm over all latent dims of an image (of a frame, for a video with
            `per_frame=True`), so it depends on resolution and space:
            15 is the value given for SDXL (diffusers PR #9626, "Table 10"); for SD 1.x at 512 px the
            per-model value is unconfirmed (stable-diffusion.cpp suggests 5). See the README table.
        momentum (`float`, defaults to `-0.5`): β of the reverse momentum m ← Δ + β·m, in (-1, 1); 0 turns it off.
        space (`str`, defaults to `"x0"`): `"x0"` applies APG to the predicted clean latents, as the authors
            recommend, and converts back to the model's prediction type; `"model"` applies it to the raw
            model output (eps/v), as diffusers' `AdaptiveProjectedGuidance` guider does.
        start (`float`, defaults to `0.0`): fraction of the steps at which APG starts.
        stop (`float`, defaults to `1.0`): fraction of the steps at which APG stops. Steps outside
            [start, stop) use plain CFG; the momentum buffer is only updated on APG steps.
        guidance_rescale (`float`, *optional*): φ of the CFG rescale (Lin et al. 2023, Sec. 3.4), applied to
            APG's final output in the model's own parameterisation (eps/v), toward the std of the
            conditional prediction, exactly as for CFG and as diffusers' APG guider does. `None` takes the
            call's `guidance_rescale` (0, off, by default).
        per_frame (`bool`, defaults to `True`): for video latents (5-D, (B, C, F, H, W) as in AnimateDiff),
            `True` treats every frame as one image: the norm, the radius r and the projection onto P_c are
            taken over each frame's (C, H, W), so the guidance of a frame does not depend on the number of
            frames or on the other frames. `False` takes them over the whole video (C, F, H, W), as diffusers'
            `AdaptiveProjectedGuidance` guider (and guidekit's `APGGuider`) do; there the per-frame update
            shrinks as the video gets longer. Image latents (4-D) are guided the same way with either value.

    The momentum buffer lives in the call's `SamplerState`, so one `APG` object serves concurrent calls.
    """

    slot = "guidance"

    def __init__(
        self,
        guidance_scale: Optional[float] = None,
        eta: float = 0.0,
        norm_threshold: Optional[float] = 15.0,
        momentum: float = -0.5,
        space: str = "x0",
        start: float = 0.0,
        stop: float = 1.0,
        guidance_rescale: Optional[float] = None,
        per_frame: bool = True,
    ):
        self.guidance_scale = check_number("guidance_scale", guidance_scale, 0.0, allow_none=True)
        self.eta = check_number("eta", eta, 0.0, 1.0)
        self.norm_threshold = check_number("norm_threshold", norm_threshold, 0.0, low_open=True, allow_none=True)
        self.momentum = check_number("momentum", momentum, -1.0, 1.0, low_open=True, high_open=True)
        self.space = check_choice("space", space, ("x0", "model"))
        self.start, self.stop = check_window(start, stop)
        self.guidance_rescale = check_number("guidance_rescale", guidance_rescale, 0.0, 1.0, allow_none=True)
        if not isinstance(per_frame, bool):
            raise ValueError(f"per_frame: {per_frame!r} is not accepted; accepted: True or False")
        self.per_frame = per_frame

    def validate(self, state: SamplerState) -> None:
        if self.space == "x0" and scheduler_family(state.scheduler) is None:
            raise ValueError(
                f"scheduler: APG(space='x0') needs x0 conversions, which guidekit does not know for "
                f"{type(state.scheduler).__name__}; accepted: {', '.join(sorted(SUPPORTED_SCHEDULERS))}, "
                "or APG(space='model')"
            )

    def is_active(self, state: SamplerState) -> bool:
        return self.start <= state.progress < self.stop

    def needs_uncond(self, state: SamplerState) -> bool:
        return state.guidance_scale > 1

    def guide(self, state: SamplerState, pred_cond: torch.Tensor, pred_uncond: Optional[torch.Tensor]) -> torch.Tensor:
        if pred_uncond is None:
            return pred_cond
        if not self.is_active(state):
            guided = pred_uncond + state.guidance_scale * (pred_cond - pred_uncond)
        elif self.space == "model":
            guided = self._step(state, pred_cond, pred_uncond)
        else:
            x0_guided = self._step(state, state.to_x0(pred_cond), state.to_x0(pred_uncond))
            guided = state.from_x0(x0_guided).to(pred_cond.dtype)
        phi = state.guidance_rescale if self.guidance_rescale is None else self.guidance_rescale
        if phi > 0.0:
            guided = rescale_guided(guided, pred_cond, phi)
        return guided

    def _step(self, state: SamplerState, cond: torch.Tensor, uncond: torch.Tensor) -> torch.Tensor:
        # A new call has an empty memory, so it starts a new momentum average.
        memory = state.memory(self)
        guided, memory["running"] = apg_step(
            cond,
            uncond,
            state.guidance_scale,
            eta=self.eta,
            norm_threshold=self.norm_threshold,
            momentum=self.momentum,
            running=memory.get("running"),
            norm_dims=self._norm_dims(cond),
        )
        return guided

    def _norm_dims(self, pred: torch.Tensor) -> Optional[tuple[int, ...]]:
        # One vector per frame on videos; None (all non-batch dims, the paper's image case) otherwise.
        return FRAME_DIMS if self.per_frame and pred.dim() == VIDEO_NDIM else None

    def __repr__(self) -> str:
        return (
            f"APG(guidance_scale={self.guidance_scale}, eta={self.eta}, norm_threshold={self.norm_threshold}, "
            f"momentum={self.momentum}, space={self.space!r}, start={self.start}, stop={self.stop}"
            + (f", guidance_rescale={self.guidance_rescale}" if self.guidance_rescale is not None else "")
            + ("" if self.per_frame else ", per_frame=False")
            + ")"
        )
