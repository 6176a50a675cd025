"""Wan 2.1 / 2.2 text-to-video with guidekit hooks (APG, CFG, ...), a drop-in for the stock `WanPipeline`."""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, Optional, Sequence, Union

import torch
from diffusers import WanPipeline
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.pipelines.wan.pipeline_output import WanPipelineOutput
from diffusers.pipelines.wan.pipeline_wan import XLA_AVAILABLE
from diffusers.utils import logging
from diffusers.utils.torch_utils import get_module_execution_device

from guidekit.checks import check_number
from guidekit.hooks import SamplerHook

from .hooked_flow import FlowHookedPipelineMixin, undo_per_channel, video_frames

if XLA_AVAILABLE:
    import torch_xla.core.xla_model as xm

logger = logging.get_logger(__name__)


class GuidedWanPipeline(FlowHookedPipelineMixin, WanPipeline):
    """`WanPipeline` (text-to-video) whose denoising loop runs guidekit hooks.

    Loads with `from_pretrained` / `from_pipe` like the stock pipeline and takes every stock argument, plus
    `hooks`. With no hook (or `guidekit.CFG()`) it gives the stock pipeline's video for the same seed. Each step
    runs the conditional pass, then the unconditional one only when the guidance hook asks for it (CFG: when w >
    1, as stock). The hooks see the velocity v = eps - x0 and the loop's own latents in Wan's (B, C, F, H, W)
    layout: float32 at the start and only cast for the forward; after a step they have the dtype the scheduler
    returns, as in stock (FlowMatchEuler: the transformer's, UniPC: float32).

    Wan 2.2's two experts: at timesteps at or above `boundary_ratio * num_train_timesteps`, `transformer` runs with
    `guidance_scale`; below, `transformer_2` runs with `guidance_scale_2`. The hooks' `state.guidance_scale` is
    the scale of the expert of the step, and `state.extras["expert"]` its name.

    Example:
        >>> import guidekit
        >>> from guidekit.pipelines import GuidedWanPipeline
        >>> pipe = GuidedWanPipeline.from_pretrained("Wan-AI/Wan2.1-T2V-1.3B-Diffusers")
        >>> frames = pipe("a cat walks on the grass", guidance_scale=5.0, hooks=[guidekit.APG()]).frames[0]
    """

    default_guidance_scale = 5.0

    @torch.no_grad()
    def __call__(
        self,
        prompt: Union[str, list[str]] = None,
        negative_prompt: Union[str, list[str]] = None,
        height: int = 480,
        width: int = 832,
        num_frames: int = 81,
        num_inference_steps: int = 50,
        guidance_scale: Optional[float] = None,
        guidance_scale_2: Optional[float] = None,
        num_videos_per_prompt: Optional[int] = 1,
        generator: Optional[Union[torch.Generator, list[torch.Generator]]] = None,
        latents: Optional[torch.Tensor] = None,
        prompt_embeds: Optional[torch.Tensor] = None,
        negative_prompt_embeds: Optional[torch.Tensor] = None,
        output_type: Optional[str] = "np",
        return_dict: bool = True,
        attention_kwargs: Optional[dict[str, Any]] = None,
        callback_on_step_end: Optional[Callable] = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],
        max_sequence_length: int = 512,
        hooks: Optional[Sequence[SamplerHook]] = None,
    ):
        r"""Generate videos; the stock arguments mean what they mean in `WanPipeline.__call__`.

        Args:
            guidance_scale (`float`, *optional*, effective default 5.0): the guidance scale w (of the high-noise
                expert with Wan 2.2). `None` takes the guidance hook's scale, else 5.0 (the stock default). Any
                finite value; at w <= 1 the step runs no unconditional pass. A callback may change
                `pipe._guidance_scale` between steps; the following steps guide with it (stock only reads it to
                decide whether to run the unconditional pass).
            guidance_scale_2 (`float`, *optional*): Wan 2.2 only (a pipeline with `boundary_ratio`): the scale of
                the low-noise expert `transformer_2`; `None` takes `guidance_scale` (a hook's own scale stands for
                `guidance_scale`). Each expert's scale decides alone whether its steps are guided: negative
                prompts are encoded when either scale is above 1. Stock `WanPipeline` differs in two cases:
                with `guidance_scale <= 1 < guidance_scale_2` it guides no step, and with `guidance_scale_2 <= 1 <
                guidance_scale` it still runs the unconditional pass below the boundary and combines with
                `guidance_scale_2`. A callback may change `pipe._guidance_scale_2` between steps.
            hooks (`SamplerHook` or `list[SamplerHook]`, *optional*): guidekit hooks for this call, e.g.
                `[guidekit.APG()]`. At most one guidance hook (CFG when none); the others run in the order given.
                `None` uses the hooks given to `guidekit.attach`, if any. One hook object serves both Wan 2.2
                experts, so what it keeps across steps (APG's momentum) carries over the switch.
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs

        # 1. Check inputs; round the frame count and the size as stock does
        self.check_inputs(
            prompt,
            negative_prompt,
            height,
            width,
            prompt_embeds,
            negative_prompt_embeds,
            callback_on_step_end_tensor_inputs,
            guidance_scale_2,
        )
        chain, state = self.start_flow_hooks(hooks, guidance_scale, generator)
        guidance_scale_2 = check_number("guidance_scale_2", guidance_scale_2, allow_none=True)
        num_frames = self.frames_for_vae(num_frames)
        height, width = self.size_for_patches(height, width)

        guidance_scale = state.guidance_scale
        if self.config.boundary_ratio is not None and guidance_scale_2 is None:
            guidance_scale_2 = guidance_scale
        self._guidance_scale = guidance_scale
        self._guidance_scale_2 = guidance_scale_2
        self._attention_kwargs = attention_kwargs
        self._current_timestep = None
        self._interrupt = False
        device = self._execution_device

        # 2. Call parameters
        if prompt is not None and isinstance(prompt, str):
            batch_size = 1
        elif prompt is not None and isinstance(prompt, list):
            batch_size = len(prompt)
        else:
            batch_size = prompt_embeds.shape[0]

        # 3. Encode the prompts; the negatives only when some expert guides
        self._uncond_encoded = guidance_scale > 1 or (guidance_scale_2 is not None and guidance_scale_2 > 1)
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt=prompt,
            negative_prompt=negative_prompt,
            do_classifier_free_guidance=self._uncond_encoded,
            num_videos_per_prompt=num_videos_per_prompt,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            max_sequence_length=max_sequence_length,
            device=device,
        )
        transformer_dtype = self.transformer.dtype if self.transformer is not None else self.transformer_2.dtype
        prompt_embeds = prompt_embeds.to(transformer_dtype)
        if negative_prompt_embeds is not None:
            negative_prompt_embeds = negative_prompt_embeds.to(transformer_dtype)

        # 4. Timesteps
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        state.num_steps = len(timesteps)

        # 5. Start latents: (B, C, F, H, W), float32 whatever the transformer's dtype
        denoiser = self.transformer if self.transformer is not None else self.transformer_2
        latents = self.prepare_latents(
            batch_size * num_videos_per_prompt,
            denoiser.config.in_channels,
            height,
            width,
            num_frames,
            torch.float32,
            device,
            generator,
            latents,
        )

        # 6. Denoising loop, with the hooks at their points
        num_warmup_steps = len(timesteps) - num_inference_steps * self.scheduler.order
        self._num_timesteps = len(timesteps)
        self.scheduler.set_begin_index(0)  # as stock: the first step's sigma is known without a timestep lookup
        boundary_timestep = None
        if self.config.boundary_ratio is not None:
            boundary_timestep = self.config.boundary_ratio * self.scheduler.config.num_train_timesteps

        self.share_decode(state, undo_per_channel, video_frames)
        chain.validate(state)
        chain.begin(state)
        try:
            latents = chain.init_latents(state, latents)
            with self.progress_bar(total=num_inference_steps) as progress_bar:
                for i, t in enumerate(timesteps):
                    if self.interrupt:
                        continue
                    self._current_timestep = t
                    model, scale, expert = self.expert_for(t, boundary_timestep)
                    state.extras["expert"] = expert
                    model_input = latents.to(transformer_dtype)  # latents stay float32; only the forward is cast
                    timestep = self.model_timesteps(t, latents)
                    cache_kwargs = dict(
                        step_index=i, sigma=float(self.scheduler.sigmas[i]), num_inference_steps=self._num_timesteps
                    )

                    def transformer_pass(embeds: torch.Tensor, label: str) -> torch.Tensor:
                        with model.cache_context(label, **cache_kwargs):
                            return model(
                                hidden_states=model_input,
                                timestep=timestep,
                                encoder_hidden_states=embeds,
                                attention_kwargs=attention_kwargs,
                                return_dict=False,
                            )[0]

                    noise_pred = self.guided_velocity(
                        chain,
                        state,
                        i,
                        t,
                        latents,
                        cond=partial(transformer_pass, prompt_embeds, "cond"),
                        uncond=partial(transformer_pass, negative_prompt_embeds, "uncond") if self._uncond_encoded
                        else None,
                        guidance_scale=scale,
                    )
                    latents = self.scheduler.step(noise_pred, t, latents, return_dict=False)[0]
                    state.latents = latents
                    chain.step_end(state)

                    if callback_on_step_end is not None:
                        step_locals = locals()  # (a comprehension would see its own locals)
                        callback_kwargs = {k: step_locals[k] for k in callback_on_step_end_tensor_inputs}
                        callback_outputs = callback_on_step_end(self, i, t, callback_kwargs)
                        latents = callback_outputs.pop("latents", latents)
                        prompt_embeds = callback_outputs.pop("prompt_embeds", prompt_embeds)
                        negative_prompt_embeds = callback_outputs.pop("negative_prompt_embeds", negative_prompt_embeds)
                    if i == len(timesteps) - 1 or ((i + 1) > num_warmup_steps and (i + 1) % self.scheduler.order == 0):
                        progress_bar.update()
                    if XLA_AVAILABLE:
                        xm.mark_step()
        finally:
            chain.end(state)
        self._current_timestep = None

        # 7. Decode
        video = latents if output_type == "latent" else self.decode_video(latents, output_type)
        self.maybe_free_model_hooks()

        if not return_dict:
            return (video,)
        return WanPipelineOutput(frames=video)

    def frames_for_vae(self, num_frames: int) -> int:
        """The frame count the VAE makes: 1 + a multiple of its temporal factor (rounded down, warned, as stock)."""
        factor = self.vae_scale_factor_temporal
        if num_frames % factor != 1:
            logger.warning(f"`num_frames - 1` has to be divisible by {factor}. Rounding to the nearest number.")
            num_frames = num_frames // factor * factor + 1
        return max(num_frames, 1)

    def size_for_patches(self, height: int, width: int) -> tuple[int, int]:
        """Height and width rounded down to whole transformer patches of latent pixels (with a warning, as stock)."""
        patch = (self.transformer if self.transformer is not None else self.transformer_2).config.patch_size
        h_step = self.vae_scale_factor_spatial * patch[1]
        w_step = self.vae_scale_factor_spatial * patch[2]
        fitted = (height // h_step * h_step, width // w_step * w_step)
        if fitted != (height, width):
            logger.warning(
                f"`height` and `width` must be multiples of ({h_step}, {w_step}) for proper patchification. "
                f"Adjusting ({height}, {width}) -> {fitted}."
            )
        return fitted

    def expert_for(self, t: torch.Tensor, boundary_timestep: Optional[float]) -> tuple[torch.nn.Module, float, str]:
        """The transformer for timestep `t`, its guidance scale (read now: a callback may have changed it) and its name.

        Wan 2.1 has one transformer. Wan 2.2 runs `transformer` (high noise) at t >= the boundary and
        `transformer_2` (low noise) below it.
        """
        if boundary_timestep is None or t >= boundary_timestep:
            return self.transformer, self._guidance_scale, "transformer"
        return self.transformer_2, self._guidance_scale_2, "transformer_2"

    def model_timesteps(self, t: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """The timestep input of the transformer: one per sample, or (Wan 2.2 TI2V, `expand_timesteps`) one per latent
        token, i.e. per frame and 2x2 patch, all equal to `t` for text-to-video."""
        if not self.config.expand_timesteps:
            return t.expand(latents.shape[0])
        frames, height, width = latents.shape[2:]
        tokens = torch.ones(frames, (height + 1) // 2, (width + 1) // 2, dtype=torch.float32, device=latents.device)
        return (tokens * t).flatten().unsqueeze(0).expand(latents.shape[0], -1)

    def decode_video(self, latents: torch.Tensor, output_type: str):
        """Undo the VAE's per-channel latent normalisation, decode and post-process the video."""
        latents = latents.to(get_module_execution_device(self.vae), dtype=self.vae.dtype)
        shape = (1, self.vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(self.vae.config.latents_mean).view(shape).to(latents.device, latents.dtype)
        inverse_std = 1.0 / torch.tensor(self.vae.config.latents_std).view(shape).to(latents.device, latents.dtype)
        # Divided by 1/std rather than multiplied by std: the same rounding as stock, so outputs stay bit-equal.
        video = self.vae.decode(latents / inverse_std + mean, return_dict=False)[0]
        return self.video_processor.postprocess_video(video, output_type=output_type)
