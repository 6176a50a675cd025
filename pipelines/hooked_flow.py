"""What the flow-matching hooked pipelines (SD3, Flux, Qwen-Image, Wan) share: hook set-up on a flow scheduler
and the guided velocity of one step, for one batched pass or two separate passes."""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import warnings

import torch

from torch import nn

from guidekit.guidance.cfg import CFG
from guidekit.hooks import FLOW_PREDICTION, HookChain, SamplerHook, SamplerState, check_flow_scheduler

from .hooked import HookedPipelineMixin


def undo_scale_shift(latents: torch.Tensor, vae: nn.Module) -> torch.Tensor:
    """SD3 and Flux: the transformer's latents -> the VAE's input, z / scaling_factor + shift_factor."""
    return latents / vae.config.scaling_factor + vae.config.shift_factor


def undo_per_channel(latents: torch.Tensor, vae: nn.Module) -> torch.Tensor:
    """Qwen-Image and Wan: 5-D latents (B, C, F, H, W) -> the VAE's input, z·std + mean per channel (as the
    pipelines write it: z / (1/std) + mean)."""
    shape = (1, vae.config.z_dim, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean).view(shape).to(latents.device, latents.dtype)
    inverse_std = 1.0 / torch.tensor(vae.config.latents_std).view(shape).to(latents.device, latents.dtype)
    return latents / inverse_std + mean


def image_as_frame(images: torch.Tensor) -> torch.Tensor:
    """An image VAE's output (B, 3, H, W) -> (B, 1, 3, H, W): one frame per sample."""
    return images.unsqueeze(1)


def first_frame(images: torch.Tensor) -> torch.Tensor:
    """Qwen-Image's video VAE output (B, 3, 1, H, W) -> (B, 1, 3, H, W): its frame 0, as the pipeline keeps it."""
    return images[:, :, :1].transpose(1, 2)


def video_frames(video: torch.Tensor) -> torch.Tensor:
    """Wan's VAE output (B, 3, F, H, W) -> (B, F, 3, H, W): every frame an image."""
    return video.transpose(1, 2)


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

    def share_decode(
        self,
        state: SamplerState,
        vae_input: Callable[[torch.Tensor, nn.Module], torch.Tensor],
        frames: Callable[[torch.Tensor], torch.Tensor],
    ) -> None:
        """Give the hooks this pipeline's decode, differentiable, for classifiers that read x̂0 (EluCD).

        Args:
            state (`SamplerState`): the call's state; sets ``state.extras["decode_latents"]`` and
                ``state.extras["decoded_frames"]``.
            vae_input (`Callable`): (latents in the hooks' layout, the autoencoder that decodes) -> that
                autoencoder's input: unpacked and de-normalised with its config, as the pipeline's own decode.
            frames (`Callable`): the autoencoder's output -> images (B, F, 3, H, W), F frames per sample (1 for
                image models).
        """
        state.extras["decode_latents"] = vae_input
        state.extras["decoded_frames"] = frames

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
        after_guidance: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None,
    ) -> torch.Tensor:
        """One step's velocity from two separate passes, conditional first (Flux, Qwen-Image, Wan).

        `cond()` / `uncond()` run the transformer on the conditional / unconditional inputs; `uncond` is None when
        the call encoded no negative (no CFG). The unconditional pass runs only when the guidance hook asks for
        it at this step. `after_guidance(guided, pred_cond)`, when given, post-processes the guidance slot's result
        on steps whose unconditional pass ran, before the correction hooks (Qwen-Image's norm rescale).
        """
        state.guidance_scale = float(guidance_scale)
        state.update(step_index, t, latents, model_input=latents)
        with_uncond = uncond is not None and chain.needs_uncond(state)
        chain.step_begin(state)
        pred_cond = cond()
        pred_uncond = uncond() if with_uncond else None
        pred = chain.guide(state, pred_cond, pred_uncond)
        if pred_uncond is not None and after_guidance is not None:
            pred = after_guidance(pred, pred_cond)
        return chain.correct(state, pred)
