"""What the hooked pipelines share: setting up a call's hooks and the guided prediction of one step."""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from guidekit.guidance.cfg import CFG
from guidekit.hooks import HookChain, SamplerHook, SamplerState, resolve_guidance_scale


class HookedPipelineMixin:
    """Adds `hooks` to a diffusers pipeline: the pipeline's loop calls `guided_prediction` each step."""

    #: The stock default guidance scale of the pipeline class this mixin is combined with.
    default_guidance_scale: float = 7.5
    #: Hooks used when a call passes none (set by `guidekit.attach`).
    attached_hooks: tuple = ()

    def start_hooks(
        self,
        hooks: Optional[Sequence[SamplerHook]],
        guidance_scale: Optional[float],
        guidance_rescale: float,
        generator,
    ) -> tuple[HookChain, SamplerState]:
        """Check the hooks, resolve the guidance scale and build the call's `SamplerState`."""
        hooks = list(self.attached_hooks if hooks is None else hooks)
        scale = resolve_guidance_scale(guidance_scale, hooks, default=self.default_guidance_scale)
        chain = HookChain(hooks, default_guidance=CFG())
        state = SamplerState(
            num_steps=0,
            scheduler=self.scheduler,
            prediction_type=self.scheduler.config.get("prediction_type", "epsilon"),
            guidance_scale=scale,
            guidance_rescale=guidance_rescale,
            generator=generator,
            extras={"pipeline": self},
        )
        return chain, state

    def use_uncond(self, chain: HookChain, state: SamplerState) -> bool:
        """Whether this step runs the unconditional batch (never when the call encoded no negative prompt)."""
        return self.do_classifier_free_guidance and chain.needs_uncond(state)

    def guided_prediction(
        self,
        chain: HookChain,
        state: SamplerState,
        step_index: int,
        t: torch.Tensor,
        latents: torch.Tensor,
        model: Callable[[torch.Tensor, torch.Tensor, bool], torch.Tensor],
    ) -> torch.Tensor:
        """One step's prediction: scale the input, run the model, guide, correct.

        `model(model_input, t, with_uncond)` runs the denoiser on the batch `[uncond, cond]` when `with_uncond`
        and on the conditional batch alone otherwise.
        """
        state.update(step_index, t, latents, model_input=None)
        with_uncond = self.use_uncond(chain, state)
        model_input = torch.cat([latents] * 2) if with_uncond else latents
        model_input = self.scheduler.scale_model_input(model_input, t)
        state.model_input = model_input.chunk(2)[1] if with_uncond else model_input
        chain.step_begin(state)
        pred = model(model_input, t, with_uncond)
        pred_uncond, pred_cond = pred.chunk(2) if with_uncond else (None, pred)
        pred = chain.guide(state, pred_cond, pred_uncond)
        return chain.correct(state, pred)
