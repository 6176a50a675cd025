"""Flux.1 text-to-image with guidekit hooks (APG, CFG, ...) on its true-CFG path, a drop-in for the stock pipeline."""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch
from diffusers import FluxPipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps
from diffusers.pipelines.flux.pipeline_output import FluxPipelineOutput
from diffusers.utils.torch_utils import get_module_execution_device

from guidekit.hooks import SamplerHook

from .hooked_flow import FlowHookedPipelineMixin, image_as_frame, undo_scale_shift


class GuidedFluxPipeline(FlowHookedPipelineMixin, FluxPipeline):
    """`FluxPipeline` (Flux.1) whose denoising loop runs guidekit hooks.

    Loads with `from_pretrained` / `from_pipe` like the stock pipeline and takes every stock argument, plus
    `hooks`. With no hook (or `guidekit.CFG()`) it gives the stock pipeline's image for the same seed.

    Flux has two kinds of guidance. The guidance slot (CFG, APG, ...) is *true* CFG: a negative prompt and
    `true_cfg_scale` > 1 run a second, unconditional transformer pass, and the slot mixes the two velocities
    with the scale w = `true_cfg_scale`. A guidance-distilled model (Flux.1-dev, `guidance_embeds=True`) also
    takes `guidance_scale` as a model input on every pass; that value is never the slot's scale.

    Example:
        >>> import guidekit
        >>> from guidekit.pipelines import GuidedFluxPipeline
        >>> pipe = GuidedFluxPipeline.from_pretrained("path/or/hub-id")
        >>> image = pipe("a red circle", negative_prompt="blurry", true_cfg_scale=4.0, hooks=[guidekit.APG()]).images[0]
    """

    #: The stock default of `true_cfg_scale`, the guidance slot's scale.
    default_guidance_scale = 1.0

    #: The arguments that give a negative without text, for the message of `check_true_cfg`.
    negative_embeds_names = "negative_prompt_embeds and negative_pooled_prompt_embeds"

    @torch.no_grad()
    def __call__(
        self,
        prompt: Union[str, list[str]] = None,
        prompt_2: Optional[Union[str, list[str]]] = None,
        negative_prompt: Union[str, list[str]] = None,
        negative_prompt_2: Optional[Union[str, list[str]]] = None,
        true_cfg_scale: Optional[float] = None,
        height: Optional[int] = None,
        width: Optional[int] = None,
        num_inference_steps: int = 28,
        sigmas: Optional[list[float]] = None,
        guidance_scale: float = 3.5,
        num_images_per_prompt: Optional[int] = 1,
        generator: Optional[Union[torch.Generator, list[torch.Generator]]] = None,
        latents: Optional[torch.FloatTensor] = None,
        prompt_embeds: Optional[torch.FloatTensor] = None,
        pooled_prompt_embeds: Optional[torch.FloatTensor] = None,
        ip_adapter_image=None,
        ip_adapter_image_embeds: Optional[list[torch.Tensor]] = None,
        negative_ip_adapter_image=None,
        negative_ip_adapter_image_embeds: Optional[list[torch.Tensor]] = None,
        negative_prompt_embeds: Optional[torch.FloatTensor] = None,
        negative_pooled_prompt_embeds: Optional[torch.FloatTensor] = None,
        output_type: Optional[str] = "pil",
        return_dict: bool = True,
        joint_attention_kwargs: Optional[dict[str, Any]] = None,
        callback_on_step_end: Optional[Callable] = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],
        max_sequence_length: int = 512,
        hooks: Optional[Sequence[SamplerHook]] = None,
    ):
        r"""Generate images; the stock arguments mean what they mean in `FluxPipeline.__call__`.

        Args:
            true_cfg_scale (`float`, *optional*, effective default 1.0): the guidance slot's scale w. `None` takes
                the guidance hook's scale, else 1.0 (the stock default). True CFG (a second, unconditional pass per
                step) runs when w > 1 and a negative prompt (or negative embeddings) is given, as in stock.
            guidance_scale (`float`, defaults to 3.5): the embedded guidance of a guidance-distilled model
                (`transformer.config.guidance_embeds`), passed to the transformer on every pass; ignored by other
                models, as in stock. It is not a hook's scale.
            latents (`torch.FloatTensor`, *optional*): packed start latents, shape (B, (H/16)(W/16), 64) for
                Flux.1 (3-D tokens, as stock takes them).
            hooks (`SamplerHook` or `list[SamplerHook]`, *optional*): guidekit hooks for this call, e.g.
                `[guidekit.APG()]`. At most one guidance hook (CFG when none); the others run in the order given.
                A guidance hook other than CFG needs true CFG (a negative prompt and w > 1) and is refused without
                it. The hooks see the packed latents and the velocity v; `state.to_x0(v)` is latents - sigma v.
                `None` uses the hooks given to `guidekit.attach`, if any.
        """
        chain, state = self.start_flow_hooks(hooks, true_cfg_scale, generator)
        true_cfg_scale = state.guidance_scale

        height = height or self.default_sample_size * self.vae_scale_factor
        width = width or self.default_sample_size * self.vae_scale_factor

        # 1. Check inputs
        self.check_inputs(
            prompt,
            prompt_2,
            height,
            width,
            negative_prompt=negative_prompt,
            negative_prompt_2=negative_prompt_2,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds,
            negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            max_sequence_length=max_sequence_length,
        )
        self._guidance_scale = guidance_scale  # the embedded guidance, as stock
        self._joint_attention_kwargs = joint_attention_kwargs
        self._current_timestep = None
        self._interrupt = False

        # 2. Call parameters; true CFG needs a negative prompt and w > 1
        if prompt is not None and isinstance(prompt, str):
            batch_size = 1
        elif prompt is not None and isinstance(prompt, list):
            batch_size = len(prompt)
        else:
            batch_size = prompt_embeds.shape[0]
        device = self._execution_device
        lora_scale = self.joint_attention_kwargs.get("scale", None) if self.joint_attention_kwargs is not None else None
        has_negative = negative_prompt is not None or (
            negative_prompt_embeds is not None and negative_pooled_prompt_embeds is not None
        )
        do_true_cfg = true_cfg_scale > 1 and has_negative
        self.check_true_cfg(chain, do_true_cfg, true_cfg_scale, has_negative)
        if do_true_cfg and prompt_embeds is not None and negative_prompt_embeds is not None:
            if prompt_embeds.shape != negative_prompt_embeds.shape:
                raise ValueError(
                    f"negative_prompt_embeds: shape {tuple(negative_prompt_embeds.shape)} differs from prompt_embeds' "
                    f"{tuple(prompt_embeds.shape)}; accepted: the same shape when both are passed"
                )

        # 3. Encode the prompt, and the negative one only for true CFG
        prompt_embeds, pooled_prompt_embeds, text_ids = self.encode_prompt(
            prompt=prompt,
            prompt_2=prompt_2,
            prompt_embeds=prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds,
            device=device,
            num_images_per_prompt=num_images_per_prompt,
            max_sequence_length=max_sequence_length,
            lora_scale=lora_scale,
        )
        if do_true_cfg:
            negative_prompt_embeds, negative_pooled_prompt_embeds, negative_text_ids = self.encode_prompt(
                prompt=negative_prompt,
                prompt_2=negative_prompt_2,
                prompt_embeds=negative_prompt_embeds,
                pooled_prompt_embeds=negative_pooled_prompt_embeds,
                device=device,
                num_images_per_prompt=num_images_per_prompt,
                max_sequence_length=max_sequence_length,
                lora_scale=lora_scale,
            )

        # 4. Start latents, packed into (B, tokens, 4C), and their image ids
        num_channels_latents = self.transformer.config.in_channels // 4
        latents, latent_image_ids = self.prepare_latents(
            batch_size * num_images_per_prompt,
            num_channels_latents,
            height,
            width,
            prompt_embeds.dtype,
            device,
            generator,
            latents,
        )

        # 5. Timesteps: sigmas 1 .. 1/n, shifted by mu from the number of image tokens
        sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps) if sigmas is None else sigmas
        if hasattr(self.scheduler.config, "use_flow_sigmas") and self.scheduler.config.use_flow_sigmas:
            sigmas = None
        mu = calculate_shift(
            latents.shape[1],
            self.scheduler.config.get("base_image_seq_len", 256),
            self.scheduler.config.get("max_image_seq_len", 4096),
            self.scheduler.config.get("base_shift", 0.5),
            self.scheduler.config.get("max_shift", 1.15),
        )
        timesteps, num_inference_steps = retrieve_timesteps(
            self.scheduler, num_inference_steps, device, sigmas=sigmas, mu=mu
        )
        num_warmup_steps = max(len(timesteps) - num_inference_steps * self.scheduler.order, 0)
        self._num_timesteps = len(timesteps)
        state.num_steps = len(timesteps)

        # Embedded guidance (guidance-distilled models only): a model input on both passes
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full([1], guidance_scale, device=device, dtype=torch.float32).expand(latents.shape[0])

        # IP-Adapter: a missing positive or negative image is a black one, as stock
        if (ip_adapter_image is not None or ip_adapter_image_embeds is not None) and (
            negative_ip_adapter_image is None and negative_ip_adapter_image_embeds is None
        ):
            black = np.zeros((width, height, 3), dtype=np.uint8)
            negative_ip_adapter_image = [black] * self.transformer.encoder_hid_proj.num_ip_adapters
        elif (ip_adapter_image is None and ip_adapter_image_embeds is None) and (
            negative_ip_adapter_image is not None or negative_ip_adapter_image_embeds is not None
        ):
            black = np.zeros((width, height, 3), dtype=np.uint8)
            ip_adapter_image = [black] * self.transformer.encoder_hid_proj.num_ip_adapters
        if self.joint_attention_kwargs is None:
            self._joint_attention_kwargs = {}
        image_embeds = negative_image_embeds = None
        if ip_adapter_image is not None or ip_adapter_image_embeds is not None:
            image_embeds = self.prepare_ip_adapter_image_embeds(
                ip_adapter_image, ip_adapter_image_embeds, device, batch_size * num_images_per_prompt
            )
        if negative_ip_adapter_image is not None or negative_ip_adapter_image_embeds is not None:
            negative_image_embeds = self.prepare_ip_adapter_image_embeds(
                negative_ip_adapter_image, negative_ip_adapter_image_embeds, device, batch_size * num_images_per_prompt
            )

        def velocity(context, latents, timestep, embeds, pooled, ids, ip_embeds) -> torch.Tensor:
            # One transformer pass; the IP-Adapter embeddings ride in the (shared) attention kwargs, as stock.
            if ip_embeds is not None:
                self._joint_attention_kwargs["ip_adapter_image_embeds"] = ip_embeds
            with self.transformer.cache_context(context):
                return self.transformer(
                    hidden_states=latents,
                    timestep=timestep / 1000,
                    guidance=guidance,
                    pooled_projections=pooled,
                    encoder_hidden_states=embeds,
                    txt_ids=ids,
                    img_ids=latent_image_ids,
                    joint_attention_kwargs=self.joint_attention_kwargs,
                    return_dict=False,
                )[0]

        # 6. Denoising loop, with the hooks at their points: conditional pass, then the unconditional one when
        # the guidance hook asks for it, the guidance slot on the velocities, corrections, the Euler step.
        self.scheduler.set_begin_index(0)
        self.share_decode(
            state,
            lambda z, vae: undo_scale_shift(self._unpack_latents(z, height, width, self.vae_scale_factor), vae),
            image_as_frame,
        )
        chain.validate(state)
        chain.begin(state)
        try:
            latents = chain.init_latents(state, latents)
            with self.progress_bar(total=num_inference_steps) as progress_bar:
                for i, t in enumerate(timesteps):
                    if self.interrupt:
                        continue
                    self._current_timestep = t
                    timestep = t.expand(latents.shape[0]).to(latents.dtype)
                    cond = lambda: velocity(  # noqa: E731
                        "cond", latents, timestep, prompt_embeds, pooled_prompt_embeds, text_ids, image_embeds
                    )
                    uncond = None
                    if do_true_cfg:
                        uncond = lambda: velocity(  # noqa: E731
                            "uncond",
                            latents,
                            timestep,
                            negative_prompt_embeds,
                            negative_pooled_prompt_embeds,
                            negative_text_ids,
                            negative_image_embeds,
                        )
                    noise_pred = self.guided_velocity(chain, state, i, t, latents, cond, uncond, true_cfg_scale)

                    latents_dtype = latents.dtype
                    latents = self.scheduler.step(noise_pred, t, latents, return_dict=False)[0]
                    if latents.dtype != latents_dtype and torch.backends.mps.is_available():
                        latents = latents.to(latents_dtype)  # MPS may upcast in `step` (pytorch#99272)
                    state.latents = latents
                    chain.step_end(state)

                    if callback_on_step_end is not None:
                        step_locals = locals()  # (a comprehension would see its own locals)
                        callback_kwargs = {k: step_locals[k] for k in callback_on_step_end_tensor_inputs}
                        callback_outputs = callback_on_step_end(self, i, t, callback_kwargs)
                        latents = callback_outputs.pop("latents", latents)
                        prompt_embeds = callback_outputs.pop("prompt_embeds", prompt_embeds)
                    if i == len(timesteps) - 1 or ((i + 1) > num_warmup_steps and (i + 1) % self.scheduler.order == 0):
                        progress_bar.update()
        finally:
            chain.end(state)
        self._current_timestep = None

        # 7. Decode: unpack the tokens, undo the VAE's scale and shift
        if output_type == "latent":
            image = latents
        else:
            latents = self._unpack_latents(latents, height, width, self.vae_scale_factor)
            latents = (latents / self.vae.config.scaling_factor) + self.vae.config.shift_factor
            latents = latents.to(get_module_execution_device(self.vae))
            image = self.vae.decode(latents, return_dict=False)[0]
            image = self.image_processor.postprocess(image, output_type=output_type)
        self.maybe_free_model_hooks()

        if not return_dict:
            return (image,)
        return FluxPipelineOutput(images=image)
