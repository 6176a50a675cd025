"""Qwen-Image text-to-image with guidekit hooks (APG, CFG, ...) on its true-CFG path, a drop-in for the stock
pipeline."""

from __future__ import annotations

import warnings
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch
from diffusers import QwenImagePipeline
from diffusers.pipelines.qwenimage.pipeline_output import QwenImagePipelineOutput
from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift, retrieve_timesteps

from guidekit.hooks import SamplerHook

from .hooked_flow import FlowHookedPipelineMixin, first_frame, undo_per_channel


def rescale_to_cond_norm(guided: torch.Tensor, pred_cond: torch.Tensor) -> torch.Tensor:
    """Qwen-Image's guidance rescale: scale each token of `guided` to the norm of the same token of `pred_cond`.

    Norms over the last dim, i.e. per packed token over its 4C channels. The same operations, in the same
    order, as the stock pipeline, so outputs stay bit-equal.
    """
    cond_norm = torch.norm(pred_cond, dim=-1, keepdim=True)
    guided_norm = torch.norm(guided, dim=-1, keepdim=True)
    return guided * (cond_norm / guided_norm)


class GuidedQwenImagePipeline(FlowHookedPipelineMixin, QwenImagePipeline):
    """`QwenImagePipeline` whose denoising loop runs guidekit hooks.

    Loads with `from_pretrained` / `from_pipe` like the stock pipeline and takes every stock argument, plus
    `hooks` and `norm_rescale`. With no hook (or `guidekit.CFG()`) it gives the stock pipeline's image for the
    same seed.

    The guidance slot (CFG, APG, ...) is Qwen-Image's true CFG: a negative prompt and `true_cfg_scale` > 1 run a
    second, unconditional transformer pass, and the slot mixes the two velocities with w = `true_cfg_scale`.

    Where the norm rescale sits: stock Qwen-Image follows CFG with a per-token rescale, `guided * ||v_cond|| /
    ||guided||` (norms over the 4C packed channels of each token). Here it is applied, as in stock, to whatever
    the guidance slot returns, before the correction hooks; so each token of the guided velocity keeps the
    conditional velocity's norm and only its direction is guided. With APG in its default x0 space, APG works on
    x0 = latents - sigma v and its result, converted back to a velocity, is then rescaled in v space: the rescale
    changes APG's output (it is not APG's own radius r). `norm_rescale=False` turns the rescale off, for the
    guidance slot's output as is (stock has no such switch, so that is not the stock image even with CFG).

    Example:
        >>> import guidekit
        >>> from guidekit.pipelines import GuidedQwenImagePipeline
        >>> pipe = GuidedQwenImagePipeline.from_pretrained("path/or/hub-id")
        >>> image = pipe("a red circle", negative_prompt=" ", hooks=[guidekit.APG()]).images[0]
    """

    #: The stock default of `true_cfg_scale`, the guidance slot's scale.
    default_guidance_scale = 4.0

    #: The arguments that give a negative without text, for the message of `check_true_cfg`.
    negative_embeds_names = "negative_prompt_embeds"

    @torch.no_grad()
    def __call__(
        self,
        prompt: Union[str, list[str]] = None,
        negative_prompt: Union[str, list[str]] = None,
        true_cfg_scale: Optional[float] = None,
        height: Optional[int] = None,
        width: Optional[int] = None,
        num_inference_steps: int = 50,
        sigmas: Optional[list[float]] = None,
        guidance_scale: Optional[float] = None,
        num_images_per_prompt: int = 1,
        generator: Optional[Union[torch.Generator, list[torch.Generator]]] = None,
        latents: Optional[torch.Tensor] = None,
        prompt_embeds: Optional[torch.Tensor] = None,
        prompt_embeds_mask: Optional[torch.Tensor] = None,
        negative_prompt_embeds: Optional[torch.Tensor] = None,
        negative_prompt_embeds_mask: Optional[torch.Tensor] = None,
        output_type: Optional[str] = "pil",
        return_dict: bool = True,
        attention_kwargs: Optional[dict[str, Any]] = None,
        callback_on_step_end: Optional[Callable] = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],
        max_sequence_length: int = 512,
        hooks: Optional[Sequence[SamplerHook]] = None,
        norm_rescale: bool = True,
    ):
        r"""Generate images; the stock arguments mean what they mean in `QwenImagePipeline.__call__`.

        Args:
            true_cfg_scale (`float`, *optional*, effective default 4.0): the guidance slot's scale w. `None` takes
                the guidance hook's scale, else 4.0 (the stock default). True CFG (a second, unconditional pass per
                step) runs when w > 1 and a negative prompt (or negative embeddings) is given, as in stock.
            guidance_scale (`float`, *optional*): the embedded guidance of a guidance-distilled model
                (`transformer.config.guidance_embeds`), as in stock; never a hook's scale.
            latents (`torch.Tensor`, *optional*): packed start latents, shape (B, (H/16)(W/16), 64) for Qwen-Image
                (3-D tokens, as stock takes them).
            hooks (`SamplerHook` or `list[SamplerHook]`, *optional*): guidekit hooks for this call, e.g.
                `[guidekit.APG()]`. At most one guidance hook (CFG when none); the others run in the order given.
                A guidance hook other than CFG needs true CFG (a negative prompt and w > 1) and is refused without
                it. The hooks see the packed latents and the velocity v; `state.to_x0(v)` is latents - sigma v.
                `None` uses the hooks given to `guidekit.attach`, if any.
            norm_rescale (`bool`, defaults to `True`): rescale the guidance slot's result per token to the norm of
                the conditional velocity, as stock does after CFG (see the class docstring for where it sits).
                `False` keeps the slot's result as it is.
        """
        if not isinstance(norm_rescale, bool):
            raise ValueError(f"norm_rescale: {norm_rescale!r} is not accepted; accepted: True or False")
        chain, state = self.start_flow_hooks(hooks, true_cfg_scale, generator)
        true_cfg_scale = state.guidance_scale

        height = height or self.default_sample_size * self.vae_scale_factor
        width = width or self.default_sample_size * self.vae_scale_factor

        # 1. Check inputs
        self.check_inputs(
            prompt,
            height,
            width,
            negative_prompt=negative_prompt,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            prompt_embeds_mask=prompt_embeds_mask,
            negative_prompt_embeds_mask=negative_prompt_embeds_mask,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            max_sequence_length=max_sequence_length,
        )
        self._guidance_scale = guidance_scale  # the embedded guidance, as stock
        self._attention_kwargs = attention_kwargs
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
        has_negative = negative_prompt is not None or negative_prompt_embeds is not None
        do_true_cfg = true_cfg_scale > 1 and has_negative
        self.check_true_cfg(chain, do_true_cfg, true_cfg_scale, has_negative)

        # 3. Encode the prompt, and the negative one only for true CFG
        prompt_embeds, prompt_embeds_mask = self.encode_prompt(
            prompt=prompt,
            prompt_embeds=prompt_embeds,
            prompt_embeds_mask=prompt_embeds_mask,
            device=device,
            num_images_per_prompt=num_images_per_prompt,
            max_sequence_length=max_sequence_length,
        )
        if do_true_cfg:
            negative_prompt_embeds, negative_prompt_embeds_mask = self.encode_prompt(
                prompt=negative_prompt,
                prompt_embeds=negative_prompt_embeds,
                prompt_embeds_mask=negative_prompt_embeds_mask,
                device=device,
                num_images_per_prompt=num_images_per_prompt,
                max_sequence_length=max_sequence_length,
            )

        # 4. Start latents, packed into (B, tokens, 4C); the image shape stands in for image ids (RoPE)
        num_channels_latents = self.transformer.config.in_channels // 4
        latents = self.prepare_latents(
            batch_size * num_images_per_prompt,
            num_channels_latents,
            height,
            width,
            prompt_embeds.dtype,
            device,
            generator,
            latents,
        )
        img_shapes = [[(1, height // self.vae_scale_factor // 2, width // self.vae_scale_factor // 2)]] * batch_size

        # 5. Timesteps: sigmas 1 .. 1/n, shifted by mu from the number of image tokens
        sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps) if sigmas is None else sigmas
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
            if guidance_scale is None:
                raise ValueError(
                    "guidance_scale: None is not accepted for a guidance-distilled transformer (guidance_embeds=True); "
                    "accepted: a number (the embedded guidance)"
                )
            guidance = torch.full([1], guidance_scale, device=device, dtype=torch.float32).expand(latents.shape[0])
        elif guidance_scale is not None:
            warnings.warn(
                f"guidance_scale={guidance_scale} is ignored: this transformer is not guidance-distilled "
                "(guidance_embeds=False); the guidance slot's scale is true_cfg_scale",
                UserWarning,
                stacklevel=3,
            )
        if self.attention_kwargs is None:
            self._attention_kwargs = {}

        def velocity(context, latents, timestep, embeds, mask) -> torch.Tensor:
            with self.transformer.cache_context(context):
                return self.transformer(
                    hidden_states=latents,
                    timestep=timestep / 1000,
                    guidance=guidance,
                    encoder_hidden_states_mask=mask,
                    encoder_hidden_states=embeds,
                    img_shapes=img_shapes,
                    attention_kwargs=self.attention_kwargs,
                    return_dict=False,
                )[0]

        # 6. Denoising loop, with the hooks at their points: conditional pass, then the unconditional one when
        # the guidance hook asks for it, the guidance slot and its norm rescale, corrections, the Euler step.
        self.scheduler.set_begin_index(0)
        self.share_decode(
            state,
            lambda z, vae: undo_per_channel(self._unpack_latents(z, height, width, self.vae_scale_factor), vae),
            first_frame,
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
                    cond = lambda: velocity("cond", latents, timestep, prompt_embeds, prompt_embeds_mask)  # noqa: E731
                    uncond = None
                    if do_true_cfg:
                        uncond = lambda: velocity(  # noqa: E731
                            "uncond", latents, timestep, negative_prompt_embeds, negative_prompt_embeds_mask
                        )
                    # stock rescales its CFG result per token at this point; here the guidance slot's result
                    noise_pred = self.guided_velocity(
                        chain, state, i, t, latents, cond, uncond, true_cfg_scale,
                        after_guidance=rescale_to_cond_norm if norm_rescale else None,
                    )

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

        # 7. Decode: unpack to (B, C, 1, H, W), undo the per-channel normalisation, take the single frame
        if output_type == "latent":
            image = latents
        else:
            latents = self._unpack_latents(latents, height, width, self.vae_scale_factor).to(self.vae.dtype)
            z_dim = self.vae.config.z_dim
            latents_mean = torch.tensor(self.vae.config.latents_mean).view(1, z_dim, 1, 1, 1)
            latents_mean = latents_mean.to(latents.device, latents.dtype)
            latents_std = 1.0 / torch.tensor(self.vae.config.latents_std).view(1, z_dim, 1, 1, 1).to(
                latents.device, latents.dtype
            )
            latents = latents / latents_std + latents_mean
            image = self.vae.decode(latents, return_dict=False)[0][:, :, 0]
            image = self.image_processor.postprocess(image, output_type=output_type)
        self.maybe_free_model_hooks()

        if not return_dict:
            return (image,)
        return QwenImagePipelineOutput(images=image)
