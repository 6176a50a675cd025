"""guidekit's adaptive projected guidance as a diffusers guider, for Modular Diffusers pipelines.

Usage (Modular SDXL):

    from guidekit.guidance.diffusers_guider import APGGuider

    pipe.update_components(guider=APGGuider(guidance_scale=7.5))

The math is `guidekit.guidance.apg_math.apg_step`, shared with guidekit's own `APG` hook.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.guiders.guider_utils import BaseGuidance, GuiderOutput

from ..checks import check_number, check_window
from .apg_math import apg_step

if TYPE_CHECKING:
    from diffusers.modular_pipelines.modular_pipeline import BlockState

__all__ = ["APGGuider"]


class APGGuider(BaseGuidance):
    """Adaptive projected guidance (Sadat et al., ICLR 2025, Algorithm 1) as a diffusers `BaseGuidance`.

    Use it as the `guider` component of a Modular Diffusers pipeline (e.g. Modular SDXL):
    `pipe.update_components(guider=APGGuider(...))`. Per step: Δ = P_c − P_u, reverse momentum m ← Δ + β·m,
    rescale Δ to norm at most r, drop (η = 0) the part of Δ parallel to P_c, output P_c + (w − 1)·u.
    The scale w is the paper's; it equals the CFG scale of diffusers' default formulation
    (P_u + w·(P_c − P_u) = P_c + (w − 1)·(P_c − P_u)), so the same number means the same strength as
    `ClassifierFreeGuidance(guidance_scale=w)`. With η = 1, no rescaling and no momentum this guider is exactly CFG.

    Space: a Modular guider only receives the denoiser's raw predictions (eps or v); it never sees the latents,
    the timestep's alphas/sigmas or the scheduler, so it cannot convert to predicted clean latents (x0). APG is
    therefore applied to the raw model output, like diffusers' own `AdaptiveProjectedGuidance` guider. The
    authors recommend x0 space; for that use guidekit's pipelines with `guidekit.guidance.APG(space="x0")`.

    Differences from diffusers' `AdaptiveProjectedGuidance`: the scale is the paper's w (diffusers' guider
    with `use_original_formulation=True` and scale w − 1 computes the same thing), η defaults to 0 and momentum
    to −0.5 as in the paper, all the arithmetic runs in float64 (float32 on MPS), and steps outside the
    [start, stop) window get plain CFG instead of the conditional prediction alone.

    State: the momentum average is reset at step 0 of every pipeline call (in `set_state`), so two identical
    calls give identical outputs. It is only updated on APG steps.

    Args:
        guidance_scale (`float`, defaults to `7.5`): w, >= 0; 1 returns the conditional prediction (and the
            pipeline then skips the unconditional pass). A guider has no pipeline call scale, so it lives here.
        eta (`float`, defaults to `0.0`): weight of the component of Δ parallel to P_c, in [0, 1]. The paper
            recommends 0.
        norm_threshold (`float` or `None`, defaults to `15.0`): radius r of the rescaling, > 0; `None` turns
            rescaling off. r is a raw L2 norm over all non-batch dims of the model output, so it depends on
            resolution and prediction type: 15 is the value given for SDXL. On video outputs it is one norm
            over the whole video (C, F, H, W), as in diffusers' guider, so the update of each frame shrinks as
            the video gets longer; guidekit's `APG` hook takes it per frame by default (`per_frame`).
        momentum (`float`, defaults to `-0.5`): β of the reverse momentum, in (-1, 1); 0 turns it off.
        start (`float`, defaults to `0.0`): fraction of the steps at which APG starts.
        stop (`float`, defaults to `1.0`): fraction of the steps at which APG stops, 0 <= start < stop <= 1.
            Step i of N is an APG step when start <= i / N < stop (guidekit's hook convention, so the same
            window guides the same steps in guidekit's pipelines and here). Steps outside the window get plain
            CFG P_u + w·(P_c − P_u), as with guidekit's `APG` hook (diffusers' own guiders instead return P_c
            there, and count steps as int(start·N) <= i < int(stop·N)).
        enabled (`bool`, defaults to `True`): `False` (or `disable()`) returns the conditional prediction only.
    """

    _input_predictions = ["pred_cond", "pred_uncond"]

    @register_to_config
    def __init__(
        self,
        guidance_scale: float = 7.5,
        eta: float = 0.0,
        norm_threshold: Optional[float] = 15.0,
        momentum: float = -0.5,
        start: float = 0.0,
        stop: float = 1.0,
        enabled: bool = True,
    ):
        guidance_scale = check_number("guidance_scale", guidance_scale, 0.0)
        eta = check_number("eta", eta, 0.0, 1.0)
        norm_threshold = check_number("norm_threshold", norm_threshold, 0.0, low_open=True, allow_none=True)
        momentum = check_number("momentum", momentum, -1.0, 1.0, low_open=True, high_open=True)
        start, stop = check_window(start, stop)
        if not isinstance(enabled, bool):
            raise ValueError(f"enabled: {enabled!r} is not accepted; accepted: True or False")
        super().__init__(start, stop, enabled)
        self.guidance_scale = guidance_scale
        self.eta = eta
        self.norm_threshold = norm_threshold
        self.momentum = momentum
        self._running: Optional[torch.Tensor] = None

    # ------------------------------------------------------------------ protocol

    def set_state(self, step: int, num_inference_steps: int, timestep: torch.LongTensor) -> None:
        super().set_state(step, num_inference_steps, timestep)
        if step == 0:
            self._running = None  # a new pipeline call starts a new momentum average

    def prepare_inputs(self, data: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> list["BlockState"]:
        """Split `{name: (cond, uncond)}` into one batch per prediction needed at this step (cond first)."""
        return [
            self._prepare_batch(data, index, name)
            for index, name in zip(range(self.num_conditions), self._input_predictions)
        ]

    def prepare_inputs_from_block_state(
        self, data: "BlockState", input_fields: dict[str, str | tuple[str, str]]
    ) -> list["BlockState"]:
        """Like `prepare_inputs`, reading `input_fields` (`{name: (cond_field, uncond_field)}`) from a block state."""
        return [
            self._prepare_batch_from_block_state(input_fields, data, index, name)
            for index, name in zip(range(self.num_conditions), self._input_predictions)
        ]

    def forward(self, pred_cond: torch.Tensor, pred_uncond: Optional[torch.Tensor] = None) -> GuiderOutput:
        if pred_uncond is None or not self._needs_uncond():
            pred = pred_cond
        elif not self._in_window():
            pred = pred_uncond + self.guidance_scale * (pred_cond - pred_uncond)
        else:
            pred, self._running = apg_step(
                pred_cond,
                pred_uncond,
                self.guidance_scale,
                eta=self.eta,
                norm_threshold=self.norm_threshold,
                momentum=self.momentum,
                running=self._running,
            )
        return GuiderOutput(pred=pred, pred_cond=pred_cond, pred_uncond=pred_uncond)

    @property
    def is_conditional(self) -> bool:
        # The conditional batch is prepared first (prepare_models counts the batches of the current step).
        return self._count_prepared == 1

    @property
    def num_conditions(self) -> int:
        return 2 if self._needs_uncond() else 1

    # ------------------------------------------------------------------ helpers

    def _needs_uncond(self) -> bool:
        # Inside the window w = 1 gives P_c; outside it CFG at w = 1 gives P_c too: no unconditional pass needed.
        return self._enabled and not math.isclose(self.guidance_scale, 1.0)

    def _in_window(self) -> bool:
        if self._step is None or not self._num_inference_steps:
            return True  # called by hand without set_state: treat as inside the window
        progress = self._step / self._num_inference_steps
        return self._start <= progress < self._stop

    def get_state(self) -> dict:
        state = super().get_state()
        state["momentum_average"] = None if self._running is None else tuple(self._running.shape)
        return state
