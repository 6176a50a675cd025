"""The inverted content latent behind `guidekit.StyleSSP.start_point`, for any diffusers Stable Diffusion 1.x/2.x or
SDXL pipeline (text-to-image, ControlNet, IP-Adapter flows): the content image is encoded with the pipeline's VAE,
then DDIM-inverted with StyleSSP's negative-guided classifier-free guidance (METHODS.md §5.3)

    ε̃(z, t) = ε(z, t, c⁻) + w_inv · (ε(z, t, c⁺) − ε(z, t, c⁻)),

c⁺ the content's caption and c⁻ what the style image shows. The work is split in two so that every input is
checked before the first model call: `plan_content_inversion` checks and prepares, `ContentInversion.invert` runs.

The encoding and the prompt rows come from the guidekit pipeline of the same family (`UAMStableDiffusionPipeline`,
`UAMStableDiffusionXLPipeline`), built with `from_pipe` on the user's pipeline: it shares the modules as they are
(nothing converted or moved), and brings the VAE handling of the stock pipelines (SDXL's `force_upcast` and
per-channel `latents_mean` / `latents_std`) and SDXL's pooled text embeddings and time ids.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from diffusers import UNet2DConditionModel

from guidekit.checks import check_image_size
from guidekit.inversion import DDIMLevels, check_invertible, ddim_invert, ddim_levels

from .images import ImageInput
from .uam_sd import UAMStableDiffusionPipeline, _check_steps, _take
from .uam_sdxl import UAMStableDiffusionXLPipeline

__all__ = ["ContentInversion", "negative_guided_cfg", "plan_content_inversion", "scheduler_warning"]

#: UNet `encoder_hid_dim_type` values whose forward needs image embeddings (an IP-Adapter is loaded).
_IMAGE_EMBEDDING_TYPES = ("ip_image_proj", "image_proj", "text_image_proj")

_ACCEPTED_PIPES = (
    "a diffusers Stable Diffusion 1.x/2.x or SDXL pipeline (a UNet2DConditionModel, a VAE and CLIP text encoders), "
    "e.g. StableDiffusionPipeline, StableDiffusionXLPipeline or their ControlNet variants"
)


def negative_guided_cfg(eps_positive: torch.Tensor, eps_negative: torch.Tensor, scale: float) -> torch.Tensor:
    """StyleSSP's inversion guidance (METHODS.md §5.3): ε(c⁻) + w_inv · (ε(c⁺) − ε(c⁻)).

    Args:
        eps_positive (`torch.Tensor`): ε(z, t, c⁺), the prediction with the content's caption.
        eps_negative (`torch.Tensor`): ε(z, t, c⁻), the prediction with what the style image shows.
        scale (`float`): w_inv; 1 gives ε(c⁺), larger pushes the inversion away from c⁻.
    """
    return eps_negative + scale * (eps_positive - eps_negative)


def _is_sdxl(unet) -> bool:
    """SDXL's UNet takes pooled text embeddings and size/crop time ids besides the token embeddings."""
    return getattr(unet.config, "addition_embed_type", None) == "text_time"


def _check_pipe(pipe) -> None:
    """Refuse pipelines whose UNet, VAE or text encoders are not those of Stable Diffusion 1.x/2.x or SDXL."""
    unet = getattr(pipe, "unet", None)
    if not isinstance(unet, UNet2DConditionModel) or getattr(pipe, "vae", None) is None:
        raise ValueError(f"pipe: a {type(pipe).__name__} is not accepted; accepted: {_ACCEPTED_PIPES}")
    needed = ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2") if _is_sdxl(unet) else ("tokenizer", "text_encoder")
    missing = [name for name in needed if getattr(pipe, name, None) is None]
    if missing:
        raise ValueError(
            f"pipe: a {type(pipe).__name__} without {', '.join(missing)} is not accepted (the inversion encodes "
            f"prompts with every text encoder the UNet was trained with); accepted: {_ACCEPTED_PIPES}"
        )
    if getattr(pipe.config, "requires_aesthetics_score", False):
        raise ValueError(
            "pipe: an SDXL refiner (requires_aesthetics_score=True) is not accepted; accepted: an SDXL base model"
        )
    if unet.config.in_channels != pipe.vae.config.latent_channels:
        raise ValueError(
            f"pipe: its UNet takes {unet.config.in_channels} input channels and its VAE makes "
            f"{pipe.vae.config.latent_channels} (an inpainting or depth model); accepted: a model whose UNet input "
            "is the VAE latent alone"
        )
    hid_type = getattr(unet.config, "encoder_hid_dim_type", None)
    if getattr(unet, "encoder_hid_proj", None) is not None and hid_type in _IMAGE_EMBEDDING_TYPES:
        # The official negative inversion puts IP-Adapter-Instruct image tokens into the text cross-attention of
        # a UNet without IP-Adapter layers; a standard IP-Adapter is another model, so no equivalent is guessed.
        raise ValueError(
            "pipe: an IP-Adapter is loaded on its UNet, and start_point does not support image embeddings in the "
            "inversion; accepted: call start_point before pipe.load_ip_adapter(...) (or after "
            "pipe.unload_ip_adapter()), then load the adapter and sample with ip_adapter_image"
        )


def _family_pipe(pipe):
    """The guidekit pipeline of `pipe`'s family sharing its modules (its encode and prompt-row helpers)."""
    cls = UAMStableDiffusionXLPipeline if _is_sdxl(pipe.unet) else UAMStableDiffusionPipeline
    family = cls.from_pipe(pipe)
    family.set_progress_bar_config(disable=True)
    return family


def _check_prompt(name: str, value) -> str:
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{name}: {value!r} is not accepted; accepted: a string or None")
    return value or ""


def _check_size(image01: torch.Tensor, height, width, factor: int) -> None:
    """The image's size against guidekit's bound and, when given, the size the caller will sample at."""
    h, w = (int(s) for s in image01.shape[-2:])
    check_image_size(w, h, multiple_of=factor, names=("content_image width", "content_image height"))
    for name, asked, actual in (("height", height, h), ("width", width, w)):
        if asked is None:
            continue
        if isinstance(asked, bool) or not isinstance(asked, int) or asked != actual:
            raise ValueError(
                f"{name}: {asked!r} is not accepted for a content image of {w}x{h} (width x height); accepted: the "
                f"image's own size, {actual}, or None (nothing is resized: resize the image first)"
            )


@dataclass
class ContentInversion:
    """A checked content inversion, ready to run (`plan_content_inversion` builds it; no model has run yet).

    Attributes:
        family (`Any`): the guidekit pipeline sharing the user's modules (encode, prompt rows, UNet call).
        image (`torch.Tensor`): the content image(s), float32 (B, 3, H, W) in [0, 1].
        positive (`str`): c⁺, the content's caption ("" for None).
        negative (`str` or `None`): c⁻, what the style image shows; None for the plain inversion.
        levels (`DDIMLevels`): the DDIM schedule the inversion walks up.
    """

    family: Any
    image: torch.Tensor
    positive: str
    negative: Optional[str]
    levels: DDIMLevels

    @property
    def latent_shape(self) -> tuple:
        """(B, C, H/f, W/f): the shape of the inverted latent."""
        b, _, h, w = self.image.shape
        f = self.family.vae_scale_factor
        return (b, self.family.unet.config.in_channels, h // f, w // f)

    @property
    def device(self) -> torch.device:
        return self.family._execution_device

    def invert(self, inversion_guidance_scale: Optional[float]) -> torch.Tensor:
        """z_T of the content: the plain DDIM inversion with c⁺ (None), or the negative-guided one with w_inv.

        With w_inv, each inversion step runs one UNet call on 2B rows (c⁺ then c⁻) and inverts with
        `negative_guided_cfg`; the plain inversion runs B rows with c⁺.
        """
        family, batch = self.family, self.image.shape[0]
        height, width = self.image.shape[-2:]
        z0 = family._encode_image(self.image)
        if inversion_guidance_scale is None:
            rows = _take(family._encode_rows([self.positive], height, width), torch.zeros(batch, dtype=torch.long))

            def model(x, t):
                return family._unet_pred(x, t, rows)

        else:
            pair = family._encode_rows([self.positive, self.negative], height, width)
            rows = _take(pair, torch.arange(2).repeat_interleave(batch))  # [c⁺ × B, c⁻ × B]

            def model(x, t):
                positive, negative = family._unet_pred(torch.cat([x, x]), t, rows).to(x.dtype).chunk(2)
                return negative_guided_cfg(positive, negative, inversion_guidance_scale)

        return ddim_invert(model, z0, self.levels, family._prediction_type).latents


def plan_content_inversion(
    pipe,
    content_image: ImageInput,
    *,
    prompt: Optional[str] = None,
    style_prompt: Optional[str] = None,
    num_inference_steps: int = 50,
    height: Optional[int] = None,
    width: Optional[int] = None,
) -> ContentInversion:
    """Check every input of a content inversion and prepare it (no model call).

    Args:
        pipe: a diffusers Stable Diffusion 1.x/2.x or SDXL pipeline (its UNet, VAE, text encoders, scheduler).
        content_image: RGB image(s) as `guidekit.pipelines.images.prepare_image` accepts; width and height
            multiples of the VAE factor.
        prompt (`str`, *optional*): c⁺, a caption of the content ("" when None).
        style_prompt (`str`, *optional*): c⁻, what the style image shows; None plans the plain inversion.
        num_inference_steps (`int`, defaults to `50`): DDIM inversion steps.
        height, width (`int`, *optional*): the size the caller will sample at; the image must have it.
    """
    _check_pipe(pipe)
    steps = _check_steps(num_inference_steps)
    positive = _check_prompt("prompt", prompt)
    if style_prompt is not None:
        _check_prompt("style_prompt", style_prompt)
    if content_image is None:
        raise ValueError("content_image: None is not accepted; accepted: one or more RGB images (PIL, numpy or torch)")
    family = _family_pipe(pipe)
    image01 = family._prepare_image(content_image, "content_image")
    _check_size(image01, height, width, family.vae_scale_factor)
    levels = ddim_levels(family._uam_scheduler(steps))
    check_invertible(levels, family._prediction_type)
    return ContentInversion(family=family, image=image01, positive=positive, negative=style_prompt, levels=levels)


def scheduler_warning(pipe) -> Optional[str]:
    """A warning text when `pipe`'s scheduler multiplies `latents=` by an `init_noise_sigma` other than 1, else None."""
    sigma = float(getattr(getattr(pipe, "scheduler", None), "init_noise_sigma", 1.0))
    if sigma == 1.0:
        return None
    return (
        f"pipe.scheduler ({type(pipe.scheduler).__name__}) has init_noise_sigma {sigma:g}, and diffusers multiplies "
        "latents= by it, which would rescale the DDIM start point; sample with "
        "pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config) and the same num_inference_steps"
    )
