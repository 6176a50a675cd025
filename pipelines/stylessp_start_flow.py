"""StyleSSP's start point on flow-matching pipelines (SD3 / SD3.5 and Flux.1): the content is encoded with the
pipeline's VAE and normalised as its own encode does, inverted exactly through the schedule the pipeline will
sample with (`guidekit.inversion.flow_invert`), with StyleSSP's negative-guided velocity

    ṽ(z, t) = v(z, t, c⁻) + w_inv · (v(z, t, c⁺) − v(z, t, c⁻)),

then frequency-filtered on the unpacked (B, C, H, W) latent, and packed again for Flux. The result goes straight
into the stock pipeline's ``latents=`` argument.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

from guidekit.hooks import check_flow_scheduler
from guidekit.inversion import flow_invert, flow_levels

from .images import prepare_image

__all__ = ["is_flow_pipeline", "flow_start_point"]

#: The most fixed-point refinements per inversion step (each one transformer call more; the exact inverse of the
#: Euler step is implicit in x), stopping early once a refinement changes x by at most REFINE_TOLERANCE of its
#: scale: float32 precision. On the tiny random test models the change shrinks about tenfold per refinement.
REFINE_STEPS = 8
REFINE_TOLERANCE = 1e-6


def is_flow_pipeline(pipe) -> bool:
    """Whether `pipe` is an SD3 or Flux.1 pipeline (the flow families whose start point guidekit computes)."""
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    return isinstance(pipe, (StableDiffusion3Pipeline, FluxPipeline))


@dataclass
class _Family:
    """What differs between SD3 and Flux for the inversion: the schedule, the conditioning and the layout."""

    schedule: Callable  # (scheduler copy, steps, latent (B, C, h, w)) -> None, sets the timesteps as the pipeline does
    conditions: Callable  # (prompts) -> callable(x, t) -> v
    pack: Callable  # (B, C, h, w) -> the layout `latents=` takes
    unpack: Callable  # inverse of pack


def _sd3_family(pipe, batch: int, device, max_sequence_length: int) -> _Family:
    from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

    def schedule(scheduler, steps, latent):
        kwargs = {}
        if scheduler.config.get("use_dynamic_shifting", None):
            patch = pipe.transformer.config.patch_size
            kwargs["mu"] = calculate_shift(
                (latent.shape[-2] // patch) * (latent.shape[-1] // patch),
                scheduler.config.get("base_image_seq_len", 256),
                scheduler.config.get("max_image_seq_len", 4096),
                scheduler.config.get("base_shift", 0.5),
                scheduler.config.get("max_shift", 1.16),
            )
        scheduler.set_timesteps(steps, device=device, **kwargs)

    def conditions(prompts):
        embeds, pooled = [], []
        for text in prompts:
            e, _, p, _ = pipe.encode_prompt(prompt=text, prompt_2=None, prompt_3=None, device=device,
                                            num_images_per_prompt=batch, do_classifier_free_guidance=False,
                                            max_sequence_length=max_sequence_length)
            embeds.append(e)
            pooled.append(p)
        embeds, pooled = torch.cat(embeds), torch.cat(pooled)

        def velocity(x, t):
            rows = torch.cat([x] * len(prompts))
            return pipe.transformer(hidden_states=rows, timestep=t.expand(rows.shape[0]), encoder_hidden_states=embeds,
                                    pooled_projections=pooled, return_dict=False)[0]

        return velocity

    return _Family(schedule, conditions, pack=lambda z: z, unpack=lambda z: z)


def _flux_family(pipe, batch: int, height: int, width: int, device, max_sequence_length: int,
                 guidance_scale: float) -> _Family:
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    h = 2 * (int(height) // (pipe.vae_scale_factor * 2))
    w = 2 * (int(width) // (pipe.vae_scale_factor * 2))
    image_ids = pipe._prepare_latent_image_ids(batch, h // 2, w // 2, device, pipe.transformer.dtype)

    def schedule(scheduler, steps, latent):
        sigmas = np.linspace(1.0, 1 / steps, steps)
        mu = calculate_shift(
            (h // 2) * (w // 2),
            scheduler.config.get("base_image_seq_len", 256),
            scheduler.config.get("max_image_seq_len", 4096),
            scheduler.config.get("base_shift", 0.5),
            scheduler.config.get("max_shift", 1.15),
        )
        scheduler.set_timesteps(sigmas=sigmas, device=device, mu=mu)

    def conditions(prompts):
        encoded = [pipe.encode_prompt(prompt=text, prompt_2=None, device=device, num_images_per_prompt=batch,
                                      max_sequence_length=max_sequence_length) for text in prompts]
        guidance = None
        if pipe.transformer.config.guidance_embeds:
            guidance = torch.full([batch], guidance_scale, device=device, dtype=torch.float32)

        def velocity(x, t):
            # two passes, one per condition, as Flux's true CFG runs them
            return torch.cat([
                pipe.transformer(hidden_states=x, timestep=t.expand(x.shape[0]).to(x.dtype) / 1000, guidance=guidance,
                                 pooled_projections=pooled, encoder_hidden_states=embeds, txt_ids=text_ids,
                                 img_ids=image_ids, return_dict=False)[0]
                for embeds, pooled, text_ids in encoded
            ])

        return velocity

    def pack(z):
        return pipe._pack_latents(z, z.shape[0], z.shape[1], z.shape[2], z.shape[3])

    def unpack(z):
        return pipe._unpack_latents(z, height, width, pipe.vae_scale_factor)

    return _Family(schedule, conditions, pack, unpack)


def _encode(pipe, image: torch.Tensor) -> torch.Tensor:
    """VAE posterior mean of `image` in [0, 1], normalised as SD3's and Flux's img2img encode does."""
    vae = pipe.vae
    pixels = (image * 2 - 1).to(device=vae.device, dtype=vae.dtype)
    mean = vae.encode(pixels).latent_dist.mean
    return ((mean - vae.config.shift_factor) * vae.config.scaling_factor).to(torch.float32)


def flow_start_point(hook, pipe, content_image, *, prompt: Optional[str], style_prompt: Optional[str],
                     num_inference_steps: int, generator, height: Optional[int], width: Optional[int],
                     max_sequence_length: Optional[int] = None, guidance_scale: float = 3.5) -> torch.Tensor:
    """`StyleSSP.start_point` on an SD3 or Flux.1 pipeline; see its docstring. Returns what ``latents=`` takes:
    (B, C, H/8, W/8) for SD3, packed (B, (H/16)(W/16), 4C) for Flux, in the transformer's dtype."""
    from diffusers import FluxPipeline

    from guidekit.latents.stylessp import draw_noise

    check_flow_scheduler(pipe.scheduler, "pipe.scheduler")
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps: {num_inference_steps!r} is not accepted; accepted: an int >= 1")
    negative = hook._check_style_prompt(style_prompt)
    device = pipe._execution_device
    multiple = pipe.vae_scale_factor * (2 if isinstance(pipe, FluxPipeline) else pipe.transformer.config.patch_size)
    image = prepare_image(content_image, multiple, "content_image")
    batch, _, image_height, image_width = image.shape
    for name, given, actual in (("height", height, image_height), ("width", width, image_width)):
        if given is not None and given != actual:
            raise ValueError(f"{name}: {given!r} differs from content_image's {actual}; accepted: None or {actual} "
                             "(the content is not resized)")
    is_flux = isinstance(pipe, FluxPipeline)
    if max_sequence_length is None:
        max_sequence_length = 512 if is_flux else 256
    family = (_flux_family(pipe, batch, image_height, image_width, device, max_sequence_length, guidance_scale)
              if is_flux else _sd3_family(pipe, batch, device, max_sequence_length))

    with torch.no_grad():
        clean = _encode(pipe, image)
        scheduler = copy.deepcopy(pipe.scheduler)  # the user's scheduler keeps its state
        family.schedule(scheduler, num_inference_steps, clean)
        prompts = [prompt or ""] + ([negative] if negative is not None else [])
        velocity = family.conditions(prompts)
        dtype = pipe.transformer.dtype

        def guided(x, t):
            v = velocity(x.to(dtype), t).to(torch.float32)
            if negative is None:
                return v
            v_pos, v_neg = v.chunk(2)
            return v_neg + hook.inversion_guidance_scale * (v_pos - v_neg)

        inverted = flow_invert(guided, family.pack(clean), flow_levels(scheduler), refine_steps=REFINE_STEPS,
                               tolerance=REFINE_TOLERANCE)
        z = family.unpack(inverted.latents.to(torch.float32))
        if hook.frequency:
            z = hook._filter(z, draw_noise(z.shape, generator, z.device))
    return family.pack(z).to(pipe.transformer.dtype)
