"""Stable Diffusion 3 / 3.5 text-to-image with guidekit hooks (APG, CFG, EluCD, ...), a drop-in for the stock pipeline."""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, Union

import torch
from diffusers import StableDiffusion3Pipeline
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.pipelines.stable_diffusion_3.pipeline_output import StableDiffusion3PipelineOutput
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift, retrieve_timesteps

from guidekit.hooks import SamplerHook

from .hooked_flow import FlowHookedPipelineMixin, image_as_frame, undo_scale_shift


class GuidedStableDiffusion3Pipeline(FlowHookedPipelineMixin, StableDiffusion3Pipeline):
    """`StableDiffusion3Pipeline` whose denoising loop runs guidekit hooks.

    Loads with `from_pretrained` / `from_pipe` like the stock pipeline and takes every stock argument, plus
    `hooks`. With no hook (or `guidekit.CFG()`) it gives the stock pipeline's image for the same seed, bit for
    bit. CFG stays one batched pass over [uncond, cond], as in stock; when the guidance hook does not need the
    unconditional prediction at a step, that half of the batch is not run. Skip-layer guidance still works: its
    term is added to the guided velocity after the guidance slot and before the correction hooks, where stock
    adds it after CFG.

    Example:
        >>> import guidekit
        >>> from guidekit.pipelines import GuidedStableDiffusion3Pipeline
        >>> pipe = GuidedStableDiffusion3Pipeline.from_pretrained("path/or/hub-id")
        >>> image = pipe("a red circle on a blue background", guidance_scale=12, hooks=[guidekit.APG()]).images[0]
    """

    default_guidance_scale = 7.0

    @torch.no_grad()
    def __call__(
        self,
        prompt: Union[str, list[str]] = None,
        prompt_2: Optional[Union[str, list[str]]] = None,
        prompt_3: Optional[Union[str, list[str]]] = None,
        height: Optional[int] = None,
        width: Optional[int] = None,
        num_inference_steps: int = 28,
        sigmas: Optional[list[float]] = None,
        guidance_scale: Optional[float] = None,
        negative_prompt: Optional[Union[str, list[str]]] = None,
        negative_prompt_2: Optional[Union[str, list[str]]] = None,
        negative_prompt_3: Optional[Union[str, list[str]]] = None,
        num_images_per_prompt: Optional[int] = 1,
        generator: Optional[Union[torch.Generator, list[torch.Generator]]] = None,
        latents: Optional[torch.FloatTensor] = None,
        prompt_embeds: Optional[torch.FloatTensor] = None,
        negative_prompt_embeds: Optional[torch.FloatTensor] = None,
        pooled_prompt_embeds: Optional[torch.FloatTensor] = None,
        negative_pooled_prompt_embeds: Optional[torch.FloatTensor] = None,
        ip_adapter_image=None,
        ip_adapter_image_embeds: Optional[torch.Tensor] = None,
        output_type: Optional[str] = "pil",
        return_dict: bool = True,
        joint_attention_kwargs: Optional[dict[str, Any]] = None,
        clip_skip: Optional[int] = None,
        callback_on_step_end: Optional[Callable] = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],
        max_sequence_length: int = 256,
        skip_guidance_layers: Optional[list[int]] = None,
        skip_layer_guidance_scale: float = 2.8,
        skip_layer_guidance_stop: float = 0.2,
        skip_layer_guidance_start: float = 0.01,
        mu: Optional[float] = None,
        hooks: Optional[Sequence[SamplerHook]] = None,
    ):
        r"""Generate images; the stock arguments mean what they mean in `StableDiffusion3Pipeline.__call__`.

        Args:
            guidance_scale (`float`, *optional*, effective default 7.0): the guidance slot's scale w. `None` takes
                the guidance hook's scale, else 7.0 (the stock default). At w <= 1 no unconditional pass runs.
            hooks (`SamplerHook` or `list[SamplerHook]`, *optional*): guidekit hooks for this call, e.g.
                `[guidekit.APG()]`. At most one guidance hook (CFG when none); the others run in the order given.
                `None` uses the hooks given to `guidekit.attach`, if any. Hooks see the velocity v as the
                prediction and the (B, C, H, W) latents as the model input.
        """
        chain, state = self.start_flow_hooks(hooks, guidance_scale, generator)
        height = height or self.default_sample_size * self.vae_scale_factor
        width = width or self.default_sample_size * self.vae_scale_factor
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs

        # 1. Check inputs
        self.check_inputs(
            prompt,
            prompt_2,
            prompt_3,
            height,
            width,
            negative_prompt=negative_prompt,
            negative_prompt_2=negative_prompt_2,
            negative_prompt_3=negative_prompt_3,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds,
            negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            max_sequence_length=max_sequence_length,
        )
        self._guidance_scale = state.guidance_scale
        self._skip_layer_guidance_scale = skip_layer_guidance_scale
        self._clip_skip = clip_skip
        self._joint_attention_kwargs = joint_attention_kwargs
        self._interrupt = False

        # 2. Call parameters
        if prompt is not None and isinstance(prompt, str):
            batch_size = 1
        elif prompt is not None and isinstance(prompt, list):
            batch_size = len(prompt)
        else:
            batch_size = prompt_embeds.shape[0]
        device = self._execution_device

        # 3. Encode the prompts; with guidance the batch is [negative, positive]
        lora_scale = self.joint_attention_kwargs.get("scale", None) if self.joint_attention_kwargs is not None else None
        (
            prompt_embeds,
            negative_prompt_embeds,
            pooled_prompt_embeds,
            negative_pooled_prompt_embeds,
        ) = self.encode_prompt(
            prompt=prompt,
            prompt_2=prompt_2,
            prompt_3=prompt_3,
            negative_prompt=negative_prompt,
            negative_prompt_2=negative_prompt_2,
            negative_prompt_3=negative_prompt_3,
            do_classifier_free_guidance=self.do_classifier_free_guidance,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds,
            negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
            device=device,
            clip_skip=self.clip_skip,
            num_images_per_prompt=num_images_per_prompt,
            max_sequence_length=max_sequence_length,
            lora_scale=lora_scale,
        )
        self._uncond_encoded = self.do_classifier_free_guidance
        original_prompt_embeds, original_pooled_prompt_embeds = prompt_embeds, pooled_prompt_embeds
        if self.do_classifier_free_guidance:
            prompt_embeds = torch.cat([negative_prompt_embeds, prompt_embeds], dim=0)
            pooled_prompt_embeds = torch.cat([negative_pooled_prompt_embeds, pooled_prompt_embeds], dim=0)

        # 4. Start latents
        latents = self.prepare_latents(
            batch_size * num_images_per_prompt,
            self.transformer.config.in_channels,
            height,
            width,
            prompt_embeds.dtype,
            device,
            generator,
            latents,
        )

        # 5. Timesteps (mu from the token count when the scheduler shifts dynamically)
        scheduler_kwargs = {}
        if self.scheduler.config.get("use_dynamic_shifting", None) and mu is None:
            _, _, latent_height, latent_width = latents.shape
            patch = self.transformer.config.patch_size
            mu = calculate_shift(
                (latent_height // patch) * (latent_width // patch),
                self.scheduler.config.get("base_image_seq_len", 256),
                self.scheduler.config.get("max_image_seq_len", 4096),
                self.scheduler.config.get("base_shift", 0.5),
                self.scheduler.config.get("max_shift", 1.16),
            )
            scheduler_kwargs["mu"] = mu
        elif mu is not None:
            scheduler_kwargs["mu"] = mu
        timesteps, num_inference_steps = retrieve_timesteps(
            self.scheduler, num_inference_steps, device, sigmas=sigmas, **scheduler_kwargs
        )
        state.num_steps = len(timesteps)
        num_warmup_steps = max(len(timesteps) - num_inference_steps * self.scheduler.order, 0)
        self._num_timesteps = len(timesteps)

        # 6. IP-Adapter image embeddings
        if (ip_adapter_image is not None and self.is_ip_adapter_active) or ip_adapter_image_embeds is not None:
            ip_adapter_image_embeds = self.prepare_ip_adapter_image_embeds(
                ip_adapter_image,
                ip_adapter_image_embeds,
                device,
                batch_size * num_images_per_prompt,
                self.do_classifier_free_guidance,
            )
            if self.joint_attention_kwargs is None:
                self._joint_attention_kwargs = {"ip_adapter_image_embeds": ip_adapter_image_embeds}
            else:
                self._joint_attention_kwargs.update(ip_adapter_image_embeds=ip_adapter_image_embeds)

        def transformer(model_input: torch.Tensor, t: torch.Tensor, embeds, pooled, **extra) -> torch.Tensor:
            return self.transformer(
                hidden_states=model_input,
                timestep=t.expand(model_input.shape[0]),
                encoder_hidden_states=embeds,
                pooled_projections=pooled,
                joint_attention_kwargs=self.joint_attention_kwargs,
                return_dict=False,
                **extra,
            )[0]

        def denoise(model_input: torch.Tensor, t: torch.Tensor, with_uncond: bool) -> torch.Tensor:
            n = model_input.shape[0]
            return transformer(model_input, t, prompt_embeds[-n:], pooled_prompt_embeds[-n:])

        # 7. Denoising loop, with the hooks at their points
        self.share_decode(state, undo_scale_shift, image_as_frame)
        chain.validate(state)
        chain.begin(state)
        try:
            latents = chain.init_latents(state, latents)
            with self.progress_bar(total=num_inference_steps) as progress_bar:
                for i, t in enumerate(timesteps):
                    if self.interrupt:
                        continue
                    state.guidance_scale = float(self._guidance_scale)
                    state.update(i, t, latents, model_input=latents)
                    with_uncond = self.use_uncond(chain, state)
                    chain.step_begin(state)
                    noise_pred = denoise(torch.cat([latents] * 2) if with_uncond else latents, t, with_uncond)
                    noise_pred_uncond, noise_pred_text = noise_pred.chunk(2) if with_uncond else (None, noise_pred)
                    noise_pred = chain.guide(state, noise_pred_text, noise_pred_uncond)
                    # Skip-layer guidance, as stock adds it after CFG (strictly inside its step window)
                    in_window = num_inference_steps * skip_layer_guidance_start < i < num_inference_steps * skip_layer_guidance_stop
                    if self.do_classifier_free_guidance and skip_guidance_layers is not None and in_window:
                        noise_pred_skip_layers = transformer(
                            latents, t, original_prompt_embeds, original_pooled_prompt_embeds, skip_layers=skip_guidance_layers
                        )
                        noise_pred = noise_pred + (noise_pred_text - noise_pred_skip_layers) * self._skip_layer_guidance_scale
                    noise_pred = chain.correct(state, noise_pred)

                    latents = self.scheduler.step(noise_pred, t, latents, return_dict=False)[0]
                    state.latents = latents
                    chain.step_end(state)

                    if callback_on_step_end is not None:
                        step_locals = locals()  # (a comprehension would see its own locals)
                        callback_kwargs = {k: step_locals[k] for k in callback_on_step_end_tensor_inputs}
                        callback_outputs = callback_on_step_end(self, i, t, callback_kwargs)
                        latents = callback_outputs.pop("latents", latents)
                        prompt_embeds = callback_outputs.pop("prompt_embeds", prompt_embeds)
                        pooled_prompt_embeds = callback_outputs.pop("pooled_prompt_embeds", pooled_prompt_embeds)
                    if i == len(timesteps) - 1 or ((i + 1) > num_warmup_steps and (i + 1) % self.scheduler.order == 0):
                        progress_bar.update()
        finally:
            chain.end(state)

        # 8. Decode
        if output_type == "latent":
            image = latents
        else:
            latents = (latents / self.vae.config.scaling_factor) + self.vae.config.shift_factor
            image = self.vae.decode(latents, return_dict=False)[0]
            image = self.image_processor.postprocess(image, output_type=output_type)
        self.maybe_free_model_hooks()

        if not return_dict:
            return (image,)
        return StableDiffusion3PipelineOutput(images=image)
