"""What the flow-matching hooked pipelines (SD3, Flux, Qwen-Image, Wan) share: hook set-up on a flow scheduler
and the guided velocity of one step, for one batched pass or two separate passes."""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import warnings

import torch

from guidekit.guidance.cfg import CFG
from guidekit.hooks import FLOW_PREDICTION, HookChain, SamplerHook, SamplerState, check_flow_scheduler

from .hooked import HookedPipelineMixin


class FlowHookedPipelineMixin(HookedPipelineMixin):
    """Adds `hooks` to a diffusers flow-matching pipeline.

    The hooks see the velocity v = eps - x0 as the model prediction (``state.prediction_type ==
    "flow_prediction"``), the pipeline's latents as the model input (flow schedulers do not scale it), and
    convert with sigma = `scheduler.sigmas` at the step. Packing stays the pipeline's business: a hook sees
    the latents in the layout the transformer takes (Flux and Qwen-Image: packed tokens (B, N, 4C); SD3: (B, C,
    H, W); Wan: (B, C, F, H, W)); a per-sample norm over all non-batch elements does not depend on packing.
    """

    def start_flow_hooks(
        self,
        hooks: Union[SamplerHook, Sequence[SamplerHook], None],
        guidance_scale: Optional[float],
        generator,
    ) -> tuple[HookChain, SamplerState]:
        """Check the scheduler and the hooks, resolve the guidance slot's scale and build the call's state."""
        check_flow_scheduler(self.scheduler)
        chain, state = self.start_hooks(hooks, guidance_scale, 0.0, generator)
        state.prediction_type = FLOW_PREDICTION
        return chain, state

    #: The arguments that give a negative without text, for the message of `check_true_cfg`.
    negative_embeds_names = "negative_prompt_embeds"

    def check_true_cfg(self, chain: HookChain, do_true_cfg: bool, true_cfg_scale: float, has_negative: bool) -> None:
        """Flux and Qwen-Image: refuse a guidance hook other than CFG when the call runs no unconditional pass.

        Such a hook mixes the conditional and the unconditional velocity; without true CFG (a negative and
        `true_cfg_scale` > 1) there is only the conditional one, so it would silently do nothing. CFG itself gives
        the stock result, with a warning when the call asked for guidance (a negative or w > 1) but cannot run it.
        """
        if do_true_cfg:
            return
        missing = [] if has_negative else ["a negative prompt"]
        missing += [] if true_cfg_scale > 1 else ["true_cfg_scale > 1"]
        given = "given" if has_negative else "not given"
        if isinstance(chain.guidance, CFG):
            if has_negative or true_cfg_scale > 1:
                warnings.warn(
                    f"true_cfg_scale={true_cfg_scale} with a negative prompt {given}: true CFG is off for this call "
                    f"(missing: {' and '.join(missing)})",
                    UserWarning,
                    stacklevel=4,  # the caller of the pipeline (past torch.no_grad's wrapper)
                )
            return
        distilled = ""
        if getattr(self.transformer.config, "guidance_embeds", False):
            distilled = (
                "; this model is guidance-distilled: its embedded `guidance_scale` is a model input on every pass, "
                "not the hook's scale"
            )
        raise ValueError(
            f"hooks: {chain.guidance!r} needs the unconditional prediction, but this call runs no unconditional pass "
            f"(true_cfg_scale={true_cfg_scale}, negative prompt {given}; missing: {' and '.join(missing)}); enable "
            f"true CFG with negative_prompt (or {self.negative_embeds_names}) and true_cfg_scale > 1{distilled}"
        )

    def guided_velocity(
        self,
        chain: HookChain,
        state: SamplerState,
        step_index: int,
        t: torch.Tensor,
        latents: torch.Tensor,
        cond: Callable[[], torch.Tensor],
        uncond: Optional[Callable[[], torch.Tensor]],
        guidance_scale: float,
    ) -> torch.Tensor:
        """One step's velocity from two separate passes, conditional first (Flux, Qwen-Image, Wan).

        `cond()` / `uncond()` run the transformer on the conditional / unconditional inputs; `uncond` is None when
        the call encoded no negative (no CFG). The unconditional pass runs only when the guidance hook asks for
        it at this step.
        """
        state.guidance_scale = float(guidance_scale)
        state.update(step_index, t, latents, model_input=latents)
        with_uncond = uncond is not None and chain.needs_uncond(state)
        chain.step_begin(state)
        pred_cond = cond()
        pred_uncond = uncond() if with_uncond else None
        pred = chain.guide(state, pred_cond, pred_uncond)
        return chain.correct(state, pred)
