"""AnimateDiff (SD 1.x motion adapter) text-to-video with guidekit hooks (FreeNoise, APG, CFG, ...), a drop-in
for the stock pipeline."""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, Union

import torch
from diffusers import AnimateDiffPipeline
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.pipelines.animatediff.pipeline_output import AnimateDiffPipelineOutput

from guidekit.freenoise import FreeNoise
from guidekit.hooks import SamplerHook

from ._prompt_schedule import blend_prompt_schedule, check_prompt_schedule
from .hooked import HookedPipelineMixin


class GuidedAnimateDiffPipeline(HookedPipelineMixin, AnimateDiffPipeline):
    """`AnimateDiffPipeline` whose denoising loop runs guidekit hooks.

    Loads with `from_pretrained` / `from_pipe` like the stock pipeline and takes every stock argument, plus
    `hooks`. With no hook (or `guidekit.CFG()`) it gives the stock pipeline's video for the same seed.
    `guidekit.FreeNoise()` makes videos longer than the motion model's training length; guidance hooks such
    as `guidekit.APG()` compose with it.

    Example:
        >>> import guidekit
        >>> from guidekit.pipelines import GuidedAnimateDiffPipeline
        >>> pipe = GuidedAnimateDiffPipeline.from_pretrained("path/or/hub-id", motion_adapter=adapter)
        >>> frames = pipe("a red ball rolling", num_frames=48, hooks=[guidekit.FreeNoise()]).frames[0]
    """

    default_guidance_scale = 7.5

    def _encode_prompt_schedule(
        self,
        prompt: dict,
        num_frames: int,
        device: torch.device,
        negative_prompt: Optional[str],
        lora_scale: Optional[float],
    ) -> tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
        """Per-frame embeddings of a `{frame: prompt}` schedule, linearly blended between key frames.

        Returns (positive per frame, negative per frame or None, the last key frame's prompt embedding); the
        last one is what FreeNoise's motion injection reads.
        """
        check_prompt_schedule(prompt, num_frames, {"negative_prompt": negative_prompt})
        texts = list(dict.fromkeys(prompt.values()))  # each distinct prompt is encoded once
        positive, negative = self.encode_prompt(
            texts,
            device,
            1,
            self.do_classifier_free_guidance,
            None if negative_prompt is None else [negative_prompt] * len(texts),
            lora_scale=lora_scale,
            clip_skip=self.clip_skip,
        )
        frames = blend_prompt_schedule(prompt, num_frames, {text: positive[i] for i, text in enumerate(texts)})
        negative_frames = None
        if self.do_classifier_free_guidance:
            negative_frames = negative[:1].expand(num_frames, *negative.shape[1:])
        last = positive[texts.index(prompt[max(prompt)])]
        return frames, negative_frames, last

    @torch.no_grad()
    def __call__(
        self,
        prompt: Union[str, list[str], dict[int, str]] = None,
        num_frames: Optional[int] = 16,
        height: Optional[int] = None,
        width: Optional[int] = None,
        num_inference_steps: int = 50,
        guidance_scale: Optional[float] = None,
        negative_prompt: Optional[Union[str, list[str]]] = None,
        num_videos_per_prompt: Optional[int] = 1,
        eta: float = 0.0,
        generator: Optional[Union[torch.Generator, list[torch.Generator]]] = None,
        latents: Optional[torch.Tensor] = None,
        prompt_embeds: Optional[torch.Tensor] = None,
        negative_prompt_embeds: Optional[torch.Tensor] = None,
        ip_adapter_image=None,
        ip_adapter_image_embeds: Optional[list[torch.Tensor]] = None,
        output_type: Optional[str] = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: Optional[dict[str, Any]] = None,
        clip_skip: Optional[int] = None,
        callback_on_step_end: Optional[Callable] = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],
        decode_chunk_size: int = 16,
        hooks: Optional[Sequence[SamplerHook]] = None,
        **kwargs,
    ):
        r"""Generate videos; the stock arguments mean what they mean in `AnimateDiffPipeline.__call__`.

        Args:
            prompt (`str`, `list[str]` or `dict[int, str]`): the prompt(s), or a `{frame: prompt}` schedule whose
                per-frame embeddings are linearly blended between the key frames (frames before the first key
                take the first prompt, frames after the last key the last one).
            guidance_scale (`float`, *optional*, effective default 7.5): the guidance scale w. `None` takes the
                guidance hook's scale, else 7.5 (the stock default).
            hooks (`SamplerHook` or `list[SamplerHook]`, *optional*): guidekit hooks for this call, e.g.
                `[guidekit.APG(), guidekit.FreeNoise()]`. At most one guidance hook (CFG when none); the others
                run in the order given. `None` uses the hooks given to `guidekit.attach`, if any.
        """
        callback = kwargs.pop("callback", None)
        callback_steps = kwargs.pop("callback_steps", None)
        self.warn_deprecated_callbacks(callback, callback_steps)
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        if self.free_init_enabled:
            raise ValueError(
                "FreeInit: enabled on this pipeline, which GuidedAnimateDiffPipeline does not run; accepted: "
                "pipe.disable_free_init() first, or the stock AnimateDiffPipeline"
            )
        chain, state = self.start_hooks(hooks, guidance_scale, 0.0, generator)
        state.extras["user_latents"] = latents is not None
        state.extras["num_frames"] = num_frames  # FreeNoise extends user latents of W frames to F
        limit = self.unet.config.get("motion_max_seq_length")
        windowed = self.free_noise_enabled or any(isinstance(hook, FreeNoise) for hook in chain.others)
        if limit is not None and isinstance(num_frames, int) and num_frames > limit and not windowed:
            # the positional embedding has `limit` entries: stock fails deep inside the UNet
            raise ValueError(
                f"num_frames: {num_frames} is above the motion model's motion_max_seq_length {limit}; accepted: "
                f"at most {limit} frames, or longer videos with hooks=[guidekit.FreeNoise()]"
            )

        # 0. Default height and width to unet
        height = height or self.unet.config.sample_size * self.vae_scale_factor
        width = width or self.unet.config.sample_size * self.vae_scale_factor
        num_videos_per_prompt = 1  # as stock: one video per prompt

        # 1. Check inputs (the stock check refuses a dict prompt unless diffusers' FreeNoise is enabled)
        schedule = isinstance(prompt, dict) and not self.free_noise_enabled
        self.check_inputs(
            prompt if not schedule else "",
            height,
            width,
            callback_steps,
            negative_prompt,
            prompt_embeds,
            negative_prompt_embeds,
            ip_adapter_image,
            ip_adapter_image_embeds,
            callback_on_step_end_tensor_inputs,
        )
        self._guidance_scale = state.guidance_scale
        self._clip_skip = clip_skip
        self._cross_attention_kwargs = cross_attention_kwargs
        self._interrupt = False

        # 2. Call parameters
        if prompt is not None and isinstance(prompt, (str, dict)):
            batch_size = 1
        elif prompt is not None and isinstance(prompt, list):
            batch_size = len(prompt)
        else:
            batch_size = prompt_embeds.shape[0]
        device = self._execution_device

        # 3. Encode the prompt; with guidance the batch is [negative, positive], each repeated per frame
        lora_scale = self.cross_attention_kwargs.get("scale", None) if self.cross_attention_kwargs is not None else None
        if self.free_noise_enabled:
            prompt_embeds, negative_prompt_embeds = self._encode_prompt_free_noise(
                prompt=prompt,
                num_frames=num_frames,
                device=device,
                num_videos_per_prompt=num_videos_per_prompt,
                do_classifier_free_guidance=self.do_classifier_free_guidance,
                negative_prompt=negative_prompt,
                prompt_embeds=prompt_embeds,
                negative_prompt_embeds=negative_prompt_embeds,
                lora_scale=lora_scale,
                clip_skip=self.clip_skip,
            )
        elif schedule:
            if prompt_embeds is not None or negative_prompt_embeds is not None:
                raise ValueError(
                    "prompt: a {frame: prompt} dict is not accepted together with prompt_embeds or "
                    "negative_prompt_embeds; accepted: one of them"
                )
            prompt_embeds, negative_prompt_embeds, state.extras["fixed_prompt_embeds"] = self._encode_prompt_schedule(
                prompt, num_frames, device, negative_prompt, lora_scale
            )
            if self.do_classifier_free_guidance:
                prompt_embeds = torch.cat([negative_prompt_embeds, prompt_embeds])
        else:
            prompt_embeds, negative_prompt_embeds = self.encode_prompt(
                prompt,
                device,
                num_videos_per_prompt,
                self.do_classifier_free_guidance,
                negative_prompt,
                prompt_embeds=prompt_embeds,
                negative_prompt_embeds=negative_prompt_embeds,
                lora_scale=lora_scale,
                clip_skip=self.clip_skip,
            )
            if self.do_classifier_free_guidance:
                prompt_embeds = torch.cat([negative_prompt_embeds, prompt_embeds])
            prompt_embeds = prompt_embeds.repeat_interleave(repeats=num_frames, dim=0)
        self._uncond_encoded = self.do_classifier_free_guidance
        image_embeds = None
        if ip_adapter_image is not None or ip_adapter_image_embeds is not None:
            image_embeds = self.prepare_ip_adapter_image_embeds(
                ip_adapter_image,
                ip_adapter_image_embeds,
                device,
                batch_size * num_videos_per_prompt,
                self.do_classifier_free_guidance,
            )

        # 4. Timesteps
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        state.num_steps = len(timesteps)

        # 5. Start latents (B, C, F, H, W)
        latents = self.prepare_latents(
            batch_size * num_videos_per_prompt,
            self.unet.config.in_channels,
            num_frames,
            height,
            width,
            prompt_embeds.dtype,
            device,
            generator,
            latents,
        )
        extra_step_kwargs = self.prepare_extra_step_kwargs(generator, eta)
        state.extras["eta"] = eta  # DDIM's η: EluCD maps its correction through the step with it

        def denoise(model_input: torch.Tensor, t: torch.Tensor, with_uncond: bool) -> torch.Tensor:
            # prompt_embeds rows are [negative videos, positive videos], each video's frames together
            n = model_input.shape[0]
            added = None
            if image_embeds is not None:
                added = {"image_embeds": [e[-n:] for e in image_embeds]}
            return self.unet(
                model_input,
                t,
                encoder_hidden_states=prompt_embeds[-n * num_frames:],
                cross_attention_kwargs=cross_attention_kwargs,
                added_cond_kwargs=added,
            ).sample

        # 6. Denoising loop, with the hooks at their points
        self._num_timesteps = len(timesteps)
        num_warmup_steps = len(timesteps) - num_inference_steps * self.scheduler.order
        chain.validate(state)
        chain.begin(state)
        try:
            latents = chain.init_latents(state, latents)
            with self.progress_bar(total=self._num_timesteps) as progress_bar:
                for i, t in enumerate(timesteps):
                    if self.interrupt:
                        continue
                    noise_pred = self.guided_prediction(chain, state, i, t, latents, denoise)
                    latents = self.scheduler.step(noise_pred, t, latents, **extra_step_kwargs).prev_sample
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
                        if callback is not None and i % callback_steps == 0:
                            callback(i, t, latents)
        finally:
            chain.end(state)

        # 7. Decode
        if output_type == "latent":
            video = latents
        else:
            video_tensor = self.decode_latents(latents, decode_chunk_size)
            video = self.video_processor.postprocess_video(video=video_tensor, output_type=output_type)
        self.maybe_free_model_hooks()

        if not return_dict:
            return (video,)
        return AnimateDiffPipelineOutput(frames=video)
