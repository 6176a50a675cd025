"""AnimateDiff SDXL text-to-video with guidekit hooks (FreeNoise, APG, CFG, ...), a drop-in for the stock
pipeline."""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import torch
from diffusers import AnimateDiffSDXLPipeline, UNet2DConditionModel
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.pipelines.animatediff.pipeline_animatediff_sdxl import retrieve_timesteps
from diffusers.pipelines.animatediff.pipeline_output import AnimateDiffPipelineOutput

from guidekit.freenoise import FreeNoise
from guidekit.hooks import SamplerHook

from ._prompt_schedule import blend_prompt_schedule, check_prompt_schedule
from .hooked import HookedPipelineMixin

__all__ = ["GuidedAnimateDiffSDXLPipeline", "per_frame_text_embeds"]


@contextmanager
def per_frame_text_embeds(unet: torch.nn.Module, text_embeds: torch.Tensor) -> Iterator[None]:
    """Inside the block, every `UNetMotionModel` call conditions each frame on its own pooled text embedding.

    SDXL adds one vector per sample to the timestep embedding: `add_embedding` applied to the pooled text
    embedding and the size/crop ids. `UNetMotionModel` computes it once per video and repeats it over the
    frames, so it has no way to take one pooled embedding per frame. Here the UNet's own `time_embedding`
    and `add_embedding` outputs are kept, `add_embedding` is run once more on the per-frame pooled
    embeddings (with the video's size/crop ids), and every down, mid and up block receives
    time embedding + per-frame added embedding. The `text_embeds` given to the UNet call itself are then
    unused; with every frame of a video on one pooled embedding the result is the plain call's.

    Args:
        unet (`nn.Module`): a diffusers `UNetMotionModel` with `addition_embed_type="text_time"` (SDXL).
        text_embeds (`torch.Tensor`): (rows, F, P), the pooled text embedding of every frame of every row
            (video) of the UNet batch the calls inside the block run, in batch order.
    """
    if getattr(unet, "add_embedding", None) is None or unet.config.get("addition_embed_type") != "text_time":
        raise ValueError(
            f"unet: {type(unet).__name__} has no SDXL added embedding; accepted: a UNetMotionModel with "
            "addition_embed_type='text_time' (AnimateDiff SDXL)"
        )
    rows, num_frames, width = text_embeds.shape
    seen: dict[str, torch.Tensor] = {}

    def keep_time_embedding(module, args, output):
        seen["time"] = output

    def add_per_frame(module, args, output):
        (add_embeds,) = args
        if add_embeds.shape[0] != rows:
            raise ValueError(
                f"text_embeds: {rows} rows are not accepted for a UNet batch of {add_embeds.shape[0]} videos; "
                "accepted: one row per video"
            )
        ids = add_embeds[:, width:].repeat_interleave(num_frames, dim=0)  # size/crop ids: one per video
        frames = text_embeds.reshape(rows * num_frames, width).to(add_embeds)
        # `forward`, not the module call: this hook must not run again on its own input
        added = module.forward(torch.cat([frames, ids], dim=-1))
        seen["temb"] = seen.pop("time").repeat_interleave(num_frames, dim=0) + added
        return output

    def use_per_frame(module, args, kwargs):
        # down and up blocks get `temb=` by keyword, the mid block positionally after the hidden states
        if "temb" in kwargs:
            kwargs["temb"] = seen["temb"]
        else:
            args = (args[0], seen["temb"], *args[2:])
        return args, kwargs

    handles = [
        unet.time_embedding.register_forward_hook(keep_time_embedding),
        unet.add_embedding.register_forward_hook(add_per_frame),
    ]
    blocks = [*unet.down_blocks, unet.mid_block, *unet.up_blocks]
    try:
        for block in blocks:
            if block is not None:
                handles.append(block.register_forward_pre_hook(use_per_frame, with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


class GuidedAnimateDiffSDXLPipeline(HookedPipelineMixin, AnimateDiffSDXLPipeline):
    """`AnimateDiffSDXLPipeline` whose denoising loop runs guidekit hooks.

    Loads with `from_pretrained` / `from_pipe` like the stock pipeline and takes every stock argument, plus
    `hooks`. With no hook (or `guidekit.CFG()`) it gives the stock pipeline's video for the same seed.
    `guidekit.FreeNoise()` makes videos longer than the motion model's training length; guidance hooks such
    as `guidekit.APG()` compose with it. FreeNoise on AnimateDiff SDXL is a guidekit extension: diffusers'
    own `enable_free_noise` exists for the SD 1.5 AnimateDiff pipelines only.

    `prompt` may be a `{frame: prompt}` schedule. Both text encoders' token embeddings (cross-attention) and
    the pooled embedding (SDXL's added conditioning) are blended linearly per frame between the key frames;
    FreeNoise's motion injection (`FreeNoise(motion_injection=...)`) swaps the token embeddings of the down
    and mid cross-attention layers only and keeps the per-frame pooled embeddings.

    When built from an SDXL image UNet (`from_pretrained(sdxl_model, motion_adapter=adapter)`), the image
    UNet's added-embedding weights (`add_embedding`, which reads the pooled text embedding and the size/crop
    ids) are carried over to the motion UNet; diffusers' `UNetMotionModel.from_unet2d` leaves them at their
    random initialisation.

    Example:
        >>> import torch
        >>> import guidekit
        >>> from diffusers import DDIMScheduler, MotionAdapter
        >>> from guidekit.pipelines import GuidedAnimateDiffSDXLPipeline
        >>> adapter = MotionAdapter.from_pretrained(
        ...     "guoyww/animatediff-motion-adapter-sdxl-beta", torch_dtype=torch.float16
        ... )
        >>> pipe = GuidedAnimateDiffSDXLPipeline.from_pretrained(
        ...     "stabilityai/stable-diffusion-xl-base-1.0", motion_adapter=adapter, torch_dtype=torch.float16
        ... ).to("cuda")
        >>> pipe.scheduler = DDIMScheduler.from_config(
        ...     pipe.scheduler.config,
        ...     beta_schedule="linear",
        ...     clip_sample=False,
        ...     timestep_spacing="linspace",
        ...     steps_offset=1,
        ... )
        >>> frames = pipe(
        ...     {0: "a red panda in a forest, autumn", 32: "a red panda in a forest, winter snow"},
        ...     num_frames=48,
        ...     height=1024,
        ...     width=1024,
        ...     hooks=[guidekit.FreeNoise(context_length=16, context_stride=4), guidekit.APG()],
        ...     guidance_scale=8.0,
        ... ).frames[0]
    """

    default_guidance_scale = 5.0

    def __init__(
        self,
        vae,
        text_encoder,
        text_encoder_2,
        tokenizer,
        tokenizer_2,
        unet,
        motion_adapter,
        scheduler,
        image_encoder=None,
        feature_extractor=None,
        force_zeros_for_empty_prompt: bool = True,
    ):
        image_unet = unet if isinstance(unet, UNet2DConditionModel) else None
        super().__init__(
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer_2,
            unet=unet,
            motion_adapter=motion_adapter,
            scheduler=scheduler,
            image_encoder=image_encoder,
            feature_extractor=feature_extractor,
            force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
        )
        # The stock constructor turns an image UNet into a motion UNet without the SDXL added embedding's
        # weights; without them the pooled prompt and the size/crop ids would go through a random MLP.
        if image_unet is not None and getattr(image_unet, "add_embedding", None) is not None:
            self.unet.add_embedding.load_state_dict(image_unet.add_embedding.state_dict())

    def _encode_prompt_schedule(
        self,
        prompt: dict,
        prompt_2: Optional[dict],
        num_frames: int,
        device: torch.device,
        negative_prompt: Optional[str],
        negative_prompt_2: Optional[str],
        lora_scale: Optional[float],
    ):
        """Per-frame embeddings of a `{frame: prompt}` schedule, linearly blended between key frames.

        Returns (positive tokens per frame (F, T, D), negative tokens per frame or None, positive pooled per
        frame (F, P), negative pooled (1, P) or None, the last key frame's token embedding (T, D)); the last one
        is what FreeNoise's motion injection reads.
        """
        check_prompt_schedule(
            prompt, num_frames, {"negative_prompt": negative_prompt, "negative_prompt_2": negative_prompt_2}
        )
        if prompt_2 is not None:
            if not isinstance(prompt_2, dict) or set(prompt_2) != set(prompt):
                raise ValueError(
                    f"prompt_2: {type(prompt_2).__name__} is not accepted with a {{frame: prompt}} dict prompt; "
                    f"accepted: None (each prompt goes to both text encoders) or a dict with the same frame keys "
                    f"{sorted(prompt)}"
                )
            check_prompt_schedule(prompt_2, num_frames, name="prompt_2")
        # each key frame's (text encoder 1, text encoder 2) pair; each distinct pair is encoded once
        pairs = {frame: (text, (prompt_2 or prompt)[frame]) for frame, text in prompt.items()}
        distinct = list(dict.fromkeys(pairs.values()))
        positive, negative, pooled, negative_pooled = self.encode_prompt(
            prompt=[text for text, _ in distinct],
            prompt_2=[text_2 for _, text_2 in distinct],
            device=device,
            num_videos_per_prompt=1,
            do_classifier_free_guidance=self.do_classifier_free_guidance,
            negative_prompt=negative_prompt,
            negative_prompt_2=negative_prompt_2,
            lora_scale=lora_scale,
            clip_skip=self.clip_skip,
        )
        keys = {frame: distinct.index(pair) for frame, pair in pairs.items()}
        frames = blend_prompt_schedule(keys, num_frames, dict(enumerate(positive)))
        pooled_frames = blend_prompt_schedule(keys, num_frames, dict(enumerate(pooled)))
        negative_frames = negative_pooled_one = None
        if self.do_classifier_free_guidance:
            negative_frames = negative[:1].expand(num_frames, *negative.shape[1:])
            negative_pooled_one = negative_pooled[:1]
        last = positive[keys[max(prompt)]]
        return frames, negative_frames, pooled_frames, negative_pooled_one, last

    @torch.no_grad()
    def __call__(
        self,
        prompt: Union[str, list[str], dict[int, str]] = None,
        prompt_2: Optional[Union[str, list[str], dict[int, str]]] = None,
        num_frames: int = 16,
        height: Optional[int] = None,
        width: Optional[int] = None,
        num_inference_steps: int = 50,
        timesteps: Optional[list[int]] = None,
        sigmas: Optional[list[float]] = None,
        denoising_end: Optional[float] = None,
        guidance_scale: Optional[float] = None,
        negative_prompt: Optional[Union[str, list[str]]] = None,
        negative_prompt_2: Optional[Union[str, list[str]]] = None,
        num_videos_per_prompt: Optional[int] = 1,
        eta: float = 0.0,
        generator: Optional[Union[torch.Generator, list[torch.Generator]]] = None,
        latents: Optional[torch.Tensor] = None,
        prompt_embeds: Optional[torch.Tensor] = None,
        negative_prompt_embeds: Optional[torch.Tensor] = None,
        pooled_prompt_embeds: Optional[torch.Tensor] = None,
        negative_pooled_prompt_embeds: Optional[torch.Tensor] = None,
        ip_adapter_image=None,
        ip_adapter_image_embeds: Optional[list[torch.Tensor]] = None,
        output_type: Optional[str] = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: Optional[dict[str, Any]] = None,
        guidance_rescale: float = 0.0,
        original_size: Optional[tuple[int, int]] = None,
        crops_coords_top_left: tuple[int, int] = (0, 0),
        target_size: Optional[tuple[int, int]] = None,
        negative_original_size: Optional[tuple[int, int]] = None,
        negative_crops_coords_top_left: tuple[int, int] = (0, 0),
        negative_target_size: Optional[tuple[int, int]] = None,
        clip_skip: Optional[int] = None,
        callback_on_step_end: Optional[Callable] = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],
        hooks: Optional[Sequence[SamplerHook]] = None,
    ):
        r"""Generate videos; the stock arguments mean what they mean in `AnimateDiffSDXLPipeline.__call__`.

        Args:
            prompt (`str`, `list[str]` or `dict[int, str]`): the prompt(s), or a `{frame: prompt}` schedule (one
                video) whose per-frame embeddings, token and pooled, are linearly blended between the key frames
                (frames before the first key take the first prompt, frames after the last key the last one).
            prompt_2 (`str`, `list[str]` or `dict[int, str]`, *optional*): the prompt(s) of the second text
                encoder; `None` sends `prompt` to both. With a schedule: `None` or a dict with the same frame keys.
            num_frames (`int`, defaults to `16`): F. Above the motion model's `motion_max_seq_length` only with
                `hooks=[guidekit.FreeNoise()]`.
            guidance_scale (`float`, *optional*, effective default 5.0): the guidance scale w. `None` takes the
                guidance hook's scale, else 5.0 (the stock default).
            negative_prompt, negative_prompt_2 (`str` or `list[str]`, *optional*): as stock; with a schedule, one
                str (or None) for every frame.
            guidance_rescale (`float`, defaults to `0.0`): as stock, applied by the guidance hook (CFG, APG).
            hooks (`SamplerHook` or `list[SamplerHook]`, *optional*): guidekit hooks for this call, e.g.
                `[guidekit.APG(), guidekit.FreeNoise()]`. At most one guidance hook (CFG when none); the others
                run in the order given. `None` uses the hooks given to `guidekit.attach`, if any.

        On steps where the guidance hook skips the unconditional pass, every row gets the positive
        micro-conditioning (`original_size`, ...), never the negative one. FreeInit (`pipe.enable_free_init()`)
        is not run by this pipeline and raises a `ValueError`.
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        if self.free_init_enabled:
            raise ValueError(
                "FreeInit: enabled on this pipeline, which GuidedAnimateDiffSDXLPipeline does not run; accepted: "
                "pipe.disable_free_init() first, or the stock AnimateDiffSDXLPipeline"
            )
        chain, state = self.start_hooks(hooks, guidance_scale, guidance_rescale, generator)
        state.extras["user_latents"] = latents is not None
        state.extras["num_frames"] = num_frames  # FreeNoise extends user latents of W frames to F
        limit = self.unet.config.get("motion_max_seq_length")
        windowed = any(isinstance(hook, FreeNoise) for hook in chain.others)
        if limit is not None and isinstance(num_frames, int) and num_frames > limit and not windowed:
            # the positional embedding has `limit` entries: stock fails deep inside the UNet
            raise ValueError(
                f"num_frames: {num_frames} is above the motion model's motion_max_seq_length {limit}; accepted: "
                f"at most {limit} frames, or longer videos with hooks=[guidekit.FreeNoise()]"
            )

        # 0. Default height and width to unet
        height = height or self.default_sample_size * self.vae_scale_factor
        width = width or self.default_sample_size * self.vae_scale_factor
        num_videos_per_prompt = 1  # as stock: one video per prompt
        original_size = original_size or (height, width)
        target_size = target_size or (height, width)

        # 1. Check inputs (the stock check refuses a dict prompt; the schedule is checked when it is encoded)
        schedule = isinstance(prompt, dict)
        self.check_inputs(
            prompt if not schedule else "",
            prompt_2 if not isinstance(prompt_2, dict) else None,
            height,
            width,
            negative_prompt,
            negative_prompt_2,
            prompt_embeds,
            negative_prompt_embeds,
            pooled_prompt_embeds,
            negative_pooled_prompt_embeds,
            callback_on_step_end_tensor_inputs,
        )
        if isinstance(prompt_2, dict) and not schedule:
            raise ValueError(
                "prompt_2: a {frame: prompt} dict is accepted only with a {frame: prompt} dict prompt; accepted: "
                "a str, a list of str or None"
            )
        self._guidance_scale = state.guidance_scale
        self._guidance_rescale = guidance_rescale
        self._clip_skip = clip_skip
        self._cross_attention_kwargs = cross_attention_kwargs
        self._denoising_end = denoising_end
        self._interrupt = False

        # 2. Call parameters
        if prompt is not None and isinstance(prompt, (str, dict)):
            batch_size = 1
        elif prompt is not None and isinstance(prompt, list):
            batch_size = len(prompt)
        else:
            batch_size = prompt_embeds.shape[0]
        device = self._execution_device

        # 3. Encode the prompts (both text encoders); a schedule gives per-frame token and pooled embeddings
        lora_scale = cross_attention_kwargs.get("scale", None) if cross_attention_kwargs is not None else None
        frame_pooled = None  # (F, P): the pooled embedding of every frame, when the frames' differ
        if schedule:
            given = [
                name
                for name, value in (
                    ("prompt_embeds", prompt_embeds),
                    ("negative_prompt_embeds", negative_prompt_embeds),
                    ("pooled_prompt_embeds", pooled_prompt_embeds),
                    ("negative_pooled_prompt_embeds", negative_pooled_prompt_embeds),
                )
                if value is not None
            ]
            if given:
                raise ValueError(
                    f"prompt: a {{frame: prompt}} dict is not accepted together with {', '.join(given)}; accepted: "
                    "either the dict or precomputed embeddings"
                )
            (
                prompt_embeds,
                negative_prompt_embeds,
                frame_pooled,
                negative_pooled_prompt_embeds,
                state.extras["fixed_prompt_embeds"],
            ) = self._encode_prompt_schedule(
                prompt, prompt_2, num_frames, device, negative_prompt, negative_prompt_2, lora_scale
            )
            # the UNet's own per-video pooled input; the per-frame ones replace it below when they differ
            pooled_prompt_embeds = frame_pooled[:1]
            if bool((frame_pooled == frame_pooled[:1]).all()):
                frame_pooled = None
        else:
            prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds = (
                self.encode_prompt(
                    prompt=prompt,
                    prompt_2=prompt_2,
                    device=device,
                    num_videos_per_prompt=num_videos_per_prompt,
                    do_classifier_free_guidance=self.do_classifier_free_guidance,
                    negative_prompt=negative_prompt,
                    negative_prompt_2=negative_prompt_2,
                    prompt_embeds=prompt_embeds,
                    negative_prompt_embeds=negative_prompt_embeds,
                    pooled_prompt_embeds=pooled_prompt_embeds,
                    negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
                    lora_scale=lora_scale,
                    clip_skip=self.clip_skip,
                )
            )

        # 4. Timesteps
        timesteps, num_inference_steps = retrieve_timesteps(
            self.scheduler, num_inference_steps, device, timesteps, sigmas
        )

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

        # 6. Added time ids and pooled embeddings; with guidance the batch is [negative, positive]
        add_text_embeds = pooled_prompt_embeds
        if self.text_encoder_2 is None:
            text_encoder_projection_dim = int(pooled_prompt_embeds.shape[-1])
        else:
            text_encoder_projection_dim = self.text_encoder_2.config.projection_dim
        add_time_ids = self._get_add_time_ids(
            original_size,
            crops_coords_top_left,
            target_size,
            dtype=prompt_embeds.dtype,
            text_encoder_projection_dim=text_encoder_projection_dim,
        )
        if negative_original_size is not None and negative_target_size is not None:
            negative_add_time_ids = self._get_add_time_ids(
                negative_original_size,
                negative_crops_coords_top_left,
                negative_target_size,
                dtype=prompt_embeds.dtype,
                text_encoder_projection_dim=text_encoder_projection_dim,
            )
        else:
            negative_add_time_ids = add_time_ids
        # Cond-only steps use these rows: the stock layout below interleaves [neg, pos] per sample.
        cond_time_ids = add_time_ids.to(device).repeat(batch_size * num_videos_per_prompt, 1)
        self._uncond_encoded = self.do_classifier_free_guidance
        if self.do_classifier_free_guidance:
            prompt_embeds = torch.cat([negative_prompt_embeds, prompt_embeds], dim=0)
            add_text_embeds = torch.cat([negative_pooled_prompt_embeds, add_text_embeds], dim=0)
            add_time_ids = torch.cat([negative_add_time_ids, add_time_ids], dim=0)
        if not schedule:
            # one embedding per video, repeated per frame (a schedule's rows are per frame already)
            prompt_embeds = prompt_embeds.repeat_interleave(repeats=num_frames, dim=0)
        prompt_embeds = prompt_embeds.to(device)
        add_text_embeds = add_text_embeds.to(device)
        add_time_ids = add_time_ids.to(device).repeat(batch_size * num_videos_per_prompt, 1)
        frame_text_embeds = None  # (rows, F, P), rows as in add_text_embeds
        if frame_pooled is not None:
            frame_text_embeds = frame_pooled[None].to(device)
            if self.do_classifier_free_guidance:
                negative_frames = negative_pooled_prompt_embeds[:, None].expand(-1, num_frames, -1).to(device)
                frame_text_embeds = torch.cat([negative_frames, frame_text_embeds], dim=0)
        image_embeds = None
        if ip_adapter_image is not None or ip_adapter_image_embeds is not None:
            image_embeds = self.prepare_ip_adapter_image_embeds(
                ip_adapter_image,
                ip_adapter_image_embeds,
                device,
                batch_size * num_videos_per_prompt,
                self.do_classifier_free_guidance,
            )

        # 7. denoising_end: stop early, as the stock pipeline does
        if isinstance(denoising_end, float) and 0 < denoising_end < 1:
            cutoff = int(round(self.scheduler.config.num_train_timesteps * (1 - denoising_end)))
            num_inference_steps = len([ts for ts in timesteps if ts >= cutoff])
            timesteps = timesteps[:num_inference_steps]
        state.num_steps = len(timesteps)

        timestep_cond = None
        if self.unet.config.time_cond_proj_dim is not None:
            guidance_scale_tensor = torch.tensor(self.guidance_scale - 1).repeat(batch_size * num_videos_per_prompt)
            timestep_cond = self.get_guidance_scale_embedding(
                guidance_scale_tensor, embedding_dim=self.unet.config.time_cond_proj_dim
            ).to(device=device, dtype=latents.dtype)

        def denoise(model_input: torch.Tensor, t: torch.Tensor, with_uncond: bool) -> torch.Tensor:
            # rows are [negative videos, positive videos]; prompt_embeds has each video's frames together
            n = model_input.shape[0]
            time_ids = add_time_ids if with_uncond or add_time_ids.shape[0] == n else cond_time_ids
            added = {"text_embeds": add_text_embeds[-n:], "time_ids": time_ids[-n:]}
            if image_embeds is not None:
                added["image_embeds"] = [e[-n:] for e in image_embeds]
            per_frame = nullcontext()
            if frame_text_embeds is not None:
                per_frame = per_frame_text_embeds(self.unet, frame_text_embeds[-n:])
            with per_frame:
                return self.unet(
                    model_input,
                    t,
                    encoder_hidden_states=prompt_embeds[-n * num_frames:],
                    timestep_cond=timestep_cond,
                    cross_attention_kwargs=self.cross_attention_kwargs,
                    added_cond_kwargs=added,
                    return_dict=False,
                )[0]

        # 8. Denoising loop, with the hooks at their points
        self._num_timesteps = len(timesteps)
        chain.validate(state)
        chain.begin(state)
        try:
            latents = chain.init_latents(state, latents)
            with self.progress_bar(total=self._num_timesteps) as progress_bar:
                for i, t in enumerate(timesteps):
                    if self.interrupt:
                        continue
                    noise_pred = self.guided_prediction(chain, state, i, t, latents, denoise)
                    latents = self.scheduler.step(noise_pred, t, latents, **extra_step_kwargs, return_dict=False)[0]
                    state.latents = latents
                    chain.step_end(state)

                    if callback_on_step_end is not None:
                        step_locals = locals()  # (a comprehension would see its own locals)
                        callback_kwargs = {k: step_locals[k] for k in callback_on_step_end_tensor_inputs}
                        callback_outputs = callback_on_step_end(self, i, t, callback_kwargs)
                        latents = callback_outputs.pop("latents", latents)
                        prompt_embeds = callback_outputs.pop("prompt_embeds", prompt_embeds)
                        negative_prompt_embeds = callback_outputs.pop("negative_prompt_embeds", negative_prompt_embeds)
                        add_text_embeds = callback_outputs.pop("add_text_embeds", add_text_embeds)
                        negative_pooled_prompt_embeds = callback_outputs.pop(
                            "negative_pooled_prompt_embeds", negative_pooled_prompt_embeds
                        )
                        add_time_ids = callback_outputs.pop("add_time_ids", add_time_ids)
                        negative_add_time_ids = callback_outputs.pop("negative_add_time_ids", negative_add_time_ids)
                    progress_bar.update()
        finally:
            chain.end(state)

        # 9. Decode (the VAE in float32 when it overflows in float16, as stock does)
        needs_upcasting = self.vae.dtype == torch.float16 and self.vae.config.force_upcast
        if needs_upcasting:
            self.upcast_vae()
            latents = latents.to(next(iter(self.vae.post_quant_conv.parameters())).dtype)
        if output_type == "latent":
            video = latents
        else:
            video_tensor = self.decode_latents(latents)
            video = self.video_processor.postprocess_video(video=video_tensor, output_type=output_type)
        if needs_upcasting:
            self.vae.to(dtype=torch.float16)
        self.maybe_free_model_hooks()

        if not return_dict:
            return (video,)
        return AnimateDiffPipelineOutput(frames=video)
