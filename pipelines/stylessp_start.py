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

With IP-Adapters loaded on the UNet, every inversion call also gets image embeddings, one entry per adapter and
one set per side (`IPAdapterRows`): the image-embedding form of the guidance. The official code puts four
IP-Adapter-Instruct embeddings into the text contexts (c⁺ = [style of the style image ; composition of the
content ; caption], c⁻ = [style of the content ; composition of the style image ; zero text]); with standard
IP-Adapters the style / composition split is InstantStyle's per-block scales, so two adapters (the same weights
loaded twice, the first scaled to the style blocks, the second to the layout blocks) take c⁺ = (style image,
content image) and c⁻ = (content image, style image). diffusers passes them to the UNet as
``added_cond_kwargs["image_embeds"]``: a list with one tensor per adapter, rows aligned with the latent rows,
each (rows, num_images, dim) or (rows, num_images, tokens, dim).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import numpy as np
import PIL.Image
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.embeddings import ImageProjection, MultiIPAdapterImageProjection

from guidekit.checks import check_image_size
from guidekit.inversion import DDIMLevels, check_invertible, ddim_invert, ddim_levels

from .images import ImageInput, prepare_image
from .uam_sd import UAMStableDiffusionPipeline, _check_steps, _take
from .uam_sdxl import UAMStableDiffusionXLPipeline

__all__ = [
    "ContentInversion",
    "IPAdapterRows",
    "loaded_ip_adapters",
    "negative_guided_cfg",
    "plan_content_inversion",
    "plan_ip_adapter_rows",
    "scheduler_warning",
]

#: UNet `encoder_hid_dim_type` values of image-conditioned UNets that are not SD/SDXL with IP-Adapters (their
#: forward needs image embeddings in place of, or merged into, the text).
_IMAGE_EMBEDDING_TYPES = ("image_proj", "text_image_proj")

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
        raise ValueError(
            f"pipe: its UNet has encoder_hid_dim_type={hid_type!r} (an image-conditioned model, not Stable Diffusion "
            f"with IP-Adapters); accepted: {_ACCEPTED_PIPES}, with or without IP-Adapters loaded"
        )


def loaded_ip_adapters(pipe) -> int:
    """How many IP-Adapters `pipe.load_ip_adapter` has loaded on `pipe`'s UNet (0 when none, or when `pipe` is not
    a diffusers pipeline)."""
    unet = getattr(pipe, "unet", None)
    projection = getattr(unet, "encoder_hid_proj", None)
    if isinstance(projection, MultiIPAdapterImageProjection) and unet.config.encoder_hid_dim_type == "ip_image_proj":
        return projection.num_ip_adapters
    return 0


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


# ---------------------------------------------------------------------------- IP-Adapter image embeddings

_IP_ACCEPTED = (
    "style_image=<the style image> with two adapters loaded (the first scaled to the style blocks, the second to "
    "the layout blocks), or ip_adapter_image / ip_adapter_image_embeds (c⁺) and negative_ip_adapter_image / "
    "negative_ip_adapter_image_embeds (c⁻) with one entry per loaded adapter"
)


@dataclass(frozen=True, eq=False)
class _Images:
    """One adapter's image input as the pipeline's ``ip_adapter_image`` takes it (an image, or a list of images
    for that adapter): encoded to one row that every content image shares, as diffusers does."""

    value: Any

    @property
    def count(self) -> int:
        if isinstance(self.value, (list, tuple)):
            return len(self.value)
        if isinstance(self.value, (np.ndarray, torch.Tensor)) and self.value.ndim == 4:
            return int(self.value.shape[0])
        return 1


@dataclass(frozen=True, eq=False)
class _OnePerRow:
    """The content images, encoded one row each (B, 1, ...): row b of the inversion sees content image b."""

    images: List[PIL.Image.Image]

    count = 1


def _images_per_entry(entry) -> int:
    """The number of images an entry gives its adapter (the embeddings' second axis)."""
    return int(entry.shape[1]) if isinstance(entry, torch.Tensor) else entry.count


def _to_pil(image01: torch.Tensor) -> List[PIL.Image.Image]:
    """(B, 3, H, W) in [0, 1] as 8-bit PIL images, what the image encoder's feature extractor takes (exact for an
    image that came in as 8-bit)."""
    array = (image01.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    return [PIL.Image.fromarray(a) for a in array]


def _with_image_embeds(rows: Dict[str, Any], image_embeds: List[torch.Tensor]) -> Dict[str, Any]:
    """`rows` with the IP-Adapter embeddings added to the UNet's ``added_cond_kwargs``, as the stock pipelines pass
    them (SD: ``{"image_embeds": ...}``; SDXL: next to ``text_embeds`` and ``time_ids``)."""
    added = dict(rows.get("added_cond_kwargs") or {})
    added["image_embeds"] = image_embeds
    return {**rows, "added_cond_kwargs": added}


@dataclass
class IPAdapterRows:
    """The IP-Adapter inputs of the inversion's c⁺ and c⁻ rows, one entry per loaded adapter (in load order),
    checked and not yet encoded (`plan_ip_adapter_rows` builds it).

    An entry is a tensor of image embeddings (1 or B rows, num_images, dim) or (1 or B rows, num_images, tokens,
    dim), an image input for one adapter (encoded to one row shared by every content image), or the content images
    (one row each).

    Attributes:
        positive (`list`): c⁺'s entries.
        negative (`list` or `None`): c⁻'s entries; None when only c⁺ runs (the plain inversion).
        names (`tuple`): the arguments the two sides came from, for error messages.
    """

    positive: List[Any]
    negative: Optional[List[Any]]
    names: tuple = ("ip_adapter_image", "negative_ip_adapter_image")

    def embeds(self, family, batch: int) -> tuple:
        """(c⁺ embeddings, c⁻ embeddings or None): per adapter a tensor of `batch` rows in the UNet's dtype on the
        execution device. Each distinct image input is encoded once."""
        device, dtype = family._execution_device, family.unet.dtype
        layers = family.unet.encoder_hid_proj.image_projection_layers
        encoded: Dict[tuple, torch.Tensor] = {}

        def rows(entry, index: int) -> torch.Tensor:
            if isinstance(entry, torch.Tensor):
                embeds = entry
            else:
                # As diffusers' prepare_ip_adapter_image_embeds: the pooled image embedding for the original
                # IP-Adapter (ImageProjection), the penultimate hidden states for the others ("plus" adapters).
                hidden = not isinstance(layers[index], ImageProjection)
                key = (id(entry), hidden)
                if key not in encoded:
                    if isinstance(entry, _OnePerRow):
                        encoded[key] = family.encode_image(entry.images, device, 1, hidden)[0][:, None]
                    else:
                        encoded[key] = family.encode_image(entry.value, device, 1, hidden)[0][None]
                embeds = encoded[key]
            embeds = embeds.to(device=device, dtype=dtype)
            return embeds.expand(batch, *embeds.shape[1:]) if embeds.shape[0] == 1 else embeds

        positive = [rows(entry, i) for i, entry in enumerate(self.positive)]
        if self.negative is None:
            return positive, None
        negative = [rows(entry, i) for i, entry in enumerate(self.negative)]
        for i, (p, n) in enumerate(zip(positive, negative)):
            if p.shape[1:] != n.shape[1:]:
                raise ValueError(
                    f"{self.names[1]}: adapter {i} gets image embeddings of shape {tuple(n.shape[1:])} for c⁻ and "
                    f"{tuple(p.shape[1:])} for c⁺ ({self.names[0]}); accepted: the same number of images and the "
                    "same embedding shape on both sides"
                )
        return positive, negative


def _check_image_encoder(pipe, name: str, embeds_name: str) -> None:
    if getattr(pipe, "image_encoder", None) is None or getattr(pipe, "feature_extractor", None) is None:
        raise ValueError(
            f"{name}: pipe has no image_encoder and feature_extractor to encode it (an adapter loaded with "
            f"image_encoder_folder=None); accepted: {embeds_name} (precomputed image embeddings), or an image "
            "encoder loaded with the adapter"
        )


def _side(pipe, count: int, batch: int, image_name: str, images, embeds_name: str, embeds) -> Optional[List[Any]]:
    """One side's checked entries (one per adapter) from its image or embedding argument; None when both are None."""
    if images is not None and embeds is not None:
        raise ValueError(f"{image_name}: given together with {embeds_name}; accepted: one of them")
    if images is not None:
        _check_image_encoder(pipe, image_name, embeds_name)
        # A single image stands for a list of one, as in diffusers' ip_adapter_image.
        entries = list(images) if isinstance(images, (list, tuple)) else [images]
        if len(entries) != count or any(e is None for e in entries):
            raise ValueError(
                f"{image_name}: {len(entries)} entries for {count} loaded IP-Adapter(s); accepted: one image (or a "
                "list of images) per adapter, in the order the adapters were loaded"
            )
        return [_Images(e) for e in entries]
    if embeds is None:
        return None
    if not isinstance(embeds, (list, tuple)) or len(embeds) != count:
        given = f"a list of {len(embeds)}" if isinstance(embeds, (list, tuple)) else f"a {type(embeds).__name__}"
        raise ValueError(
            f"{embeds_name}: {given} is not accepted with {count} loaded IP-Adapter(s); accepted: a list with one "
            "tensor per adapter, in the order the adapters were loaded"
        )
    for i, e in enumerate(embeds):
        if (
            not isinstance(e, torch.Tensor)
            or not e.is_floating_point()
            or e.ndim not in (3, 4)
            or e.shape[0] not in (1, batch)
            or e.shape[1] == 0
        ):
            what = f"shape {tuple(e.shape)}" if isinstance(e, torch.Tensor) else type(e).__name__
            raise ValueError(
                f"{embeds_name}[{i}]: {what} is not accepted; accepted: a float tensor (rows, num_images, dim) or "
                f"(rows, num_images, tokens, dim) with 1 row (shared by every content image) or {batch} (one per "
                "content image), without diffusers' classifier-free-guidance rows"
            )
    return list(embeds)


def plan_ip_adapter_rows(
    pipe,
    content_image: torch.Tensor,
    *,
    guided: bool,
    style_image=None,
    ip_adapter_image=None,
    negative_ip_adapter_image=None,
    ip_adapter_image_embeds=None,
    negative_ip_adapter_image_embeds=None,
) -> Optional[IPAdapterRows]:
    """Check the IP-Adapter inputs of a content inversion against the adapters loaded on `pipe` (no model call).

    Returns None when no adapter is loaded (the text-only inversion; every IP-Adapter input must be None then).
    With adapters loaded, c⁺'s images are required, and c⁻'s too when `guided`. See `StyleSSP.start_point` for
    the arguments.

    Args:
        pipe: the user's pipeline.
        content_image (`torch.Tensor`): the content image(s), (B, 3, H, W) in [0, 1].
        guided (`bool`): whether the negative-guided inversion runs (c⁻ needed); otherwise c⁻'s inputs are checked
            when given, then left out.
    """
    inputs = (
        ("style_image", style_image),
        ("ip_adapter_image", ip_adapter_image),
        ("ip_adapter_image_embeds", ip_adapter_image_embeds),
        ("negative_ip_adapter_image", negative_ip_adapter_image),
        ("negative_ip_adapter_image_embeds", negative_ip_adapter_image_embeds),
    )
    given = [name for name, value in inputs if value is not None]
    count = loaded_ip_adapters(pipe)
    if count == 0:
        if given:
            raise ValueError(
                f"{given[0]}: given, but no IP-Adapter is loaded on pipe's UNet; accepted: None (the text-only "
                "inversion), or the adapters loaded first (pipe.load_ip_adapter(...))"
            )
        return None
    if not given:
        raise ValueError(
            f"ip_adapter_image: None is not accepted: an IP-Adapter is loaded on pipe's UNet ({count} adapter(s)), "
            f"and every UNet call of the inversion needs its image embeddings; accepted: {_IP_ACCEPTED}; or call "
            "start_point before pipe.load_ip_adapter(...) (or after pipe.unload_ip_adapter()) for the text-only "
            "inversion"
        )
    batch = content_image.shape[0]
    if style_image is not None:
        return _style_transfer_rows(pipe, count, given, content_image, style_image, guided)

    positive = _side(pipe, count, batch, "ip_adapter_image", ip_adapter_image, "ip_adapter_image_embeds",
                     ip_adapter_image_embeds)
    if positive is None:
        raise ValueError(
            f"ip_adapter_image: None is not accepted with {given[0]} given; accepted: c⁺'s images too "
            "(ip_adapter_image or ip_adapter_image_embeds, one entry per loaded adapter)"
        )
    negative = _side(pipe, count, batch, "negative_ip_adapter_image", negative_ip_adapter_image,
                     "negative_ip_adapter_image_embeds", negative_ip_adapter_image_embeds)
    names = (
        "ip_adapter_image" if ip_adapter_image is not None else "ip_adapter_image_embeds",
        "negative_ip_adapter_image" if negative_ip_adapter_image is not None else "negative_ip_adapter_image_embeds",
    )
    if negative is None:
        if guided:
            raise ValueError(
                "negative_ip_adapter_image: None is not accepted with StyleSSP's negative-guided inversion and "
                "IP-Adapters loaded; accepted: c⁻'s images, one entry per adapter (negative_ip_adapter_image or "
                "negative_ip_adapter_image_embeds; e.g. the content image for the style adapter and the style image "
                "for the layout adapter), style_image=..., or StyleSSP(negative_inversion=False)"
            )
        return IPAdapterRows(positive, None, names)
    for i, (p, n) in enumerate(zip(positive, negative)):
        if _images_per_entry(p) != _images_per_entry(n):
            raise ValueError(
                f"{names[1]}: adapter {i} gets {_images_per_entry(n)} image(s) for c⁻ and {_images_per_entry(p)} for "
                f"c⁺ ({names[0]}); accepted: the same number on both sides"
            )
    return IPAdapterRows(positive, negative if guided else None, names)


def _style_transfer_rows(pipe, count, given, content_image, style_image, guided) -> IPAdapterRows:
    """The style-transfer default: two adapters, [style blocks, layout blocks]; c⁺ = (style image, content),
    c⁻ = (content, style image)."""
    others = [name for name in given if name != "style_image"]
    if others:
        raise ValueError(
            f"style_image: given together with {others[0]}; accepted: style_image alone (it sets the images of both "
            "c⁺ and c⁻), or the per-adapter arguments without it"
        )
    if count != 2:
        raise ValueError(
            f"style_image: needs two IP-Adapters loaded, the first scaled to the style blocks and the second to the "
            f"layout blocks, and pipe's UNet has {count}; accepted: pipe.load_ip_adapter(..., weight_name=[w, w]) "
            "then pipe.set_ip_adapter_scale([style_blocks, layout_blocks]), or ip_adapter_image and "
            "negative_ip_adapter_image with one image per loaded adapter"
        )
    _check_image_encoder(pipe, "style_image", "ip_adapter_image_embeds and negative_ip_adapter_image_embeds")
    style01 = prepare_image(style_image, 1, "style_image")
    if style01.shape[0] != 1:
        raise ValueError(f"style_image: {style01.shape[0]} images are not accepted; accepted: one style image")
    style, content = _Images(_to_pil(style01)), _OnePerRow(_to_pil(content_image))
    # c⁺: the style image's style and the content's layout. c⁻: the content's style and the style image's layout
    # (what the style image shows), which the guidance pushes the start point away from.
    return IPAdapterRows([style, content], [content, style] if guided else None, ("style_image", "style_image"))


# ---------------------------------------------------------------------------- the inversion


@dataclass
class ContentInversion:
    """A checked content inversion, ready to run (`plan_content_inversion` builds it; no model has run yet).

    Attributes:
        family (`Any`): the guidekit pipeline sharing the user's modules (encode, prompt rows, UNet call).
        image (`torch.Tensor`): the content image(s), float32 (B, 3, H, W) in [0, 1].
        positive (`str`): c⁺, the content's caption ("" for None).
        negative (`str` or `None`): c⁻'s text (what the style image shows; "" in the image-embedding form by
            default); None for the plain inversion.
        levels (`DDIMLevels`): the DDIM schedule the inversion walks up.
        ip_adapter (`IPAdapterRows`, *optional*): the image inputs of c⁺ and c⁻ when IP-Adapters are loaded.
    """

    family: Any
    image: torch.Tensor
    positive: str
    negative: Optional[str]
    levels: DDIMLevels
    ip_adapter: Optional[IPAdapterRows] = None

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
        """z_T of the content, float32 (or the UNet's dtype when wider): the plain DDIM inversion with c⁺ (None),
        or the negative-guided one with w_inv.

        With w_inv, each inversion step runs one UNet call on 2B rows (c⁺ then c⁻) and inverts with
        `negative_guided_cfg`; the plain inversion runs B rows with c⁺. With IP-Adapters, each row also gets its
        side's image embeddings.
        """
        family, batch = self.family, self.image.shape[0]
        height, width = self.image.shape[-2:]
        # The image embeddings first: a mismatch between the two sides is reported before the VAE runs.
        image_embeds = None if self.ip_adapter is None else self.ip_adapter.embeds(family, batch)
        # the trajectory in float32 (or wider) whatever the UNet's dtype: each UNet call gets its input cast
        z0 = family._encode_image(self.image, torch.promote_types(family.unet.dtype, torch.float32))
        if inversion_guidance_scale is None:
            rows = _take(family._encode_rows([self.positive], height, width), torch.zeros(batch, dtype=torch.long))
            if image_embeds is not None:
                rows = _with_image_embeds(rows, image_embeds[0])

            def model(x, t):
                return family._unet_pred(x, t, rows)

        else:
            pair = family._encode_rows([self.positive, self.negative], height, width)
            rows = _take(pair, torch.arange(2).repeat_interleave(batch))  # [c⁺ × B, c⁻ × B]
            if image_embeds is not None:
                positive, negative = image_embeds
                rows = _with_image_embeds(rows, [torch.cat([p, n]) for p, n in zip(positive, negative)])

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
    style_image=None,
    ip_adapter_image=None,
    negative_ip_adapter_image=None,
    ip_adapter_image_embeds=None,
    negative_ip_adapter_image_embeds=None,
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
        style_image, ip_adapter_image, negative_ip_adapter_image, ip_adapter_image_embeds,
        negative_ip_adapter_image_embeds: the IP-Adapter inputs (`plan_ip_adapter_rows`, `StyleSSP.start_point`);
            c⁻'s are used when `style_prompt` is not None.
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
    ip_adapter = plan_ip_adapter_rows(
        pipe, image01, guided=style_prompt is not None, style_image=style_image, ip_adapter_image=ip_adapter_image,
        negative_ip_adapter_image=negative_ip_adapter_image, ip_adapter_image_embeds=ip_adapter_image_embeds,
        negative_ip_adapter_image_embeds=negative_ip_adapter_image_embeds,
    )
    levels = ddim_levels(family._uam_scheduler(steps))
    check_invertible(levels, family._prediction_type)
    return ContentInversion(
        family=family, image=image01, positive=positive, negative=style_prompt, levels=levels, ip_adapter=ip_adapter
    )


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
