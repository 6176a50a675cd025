"""Real images in and out of the guidekit pipelines that start from images (UAM, StyleID).

* `prepare_image(image, vae_scale_factor, name="image")`: PIL image(s), numpy (H, W, 3) / (B, H, W, 3) (uint8
  or floats in [0, 1]) or a torch tensor (B, 3, H, W) / (3, H, W) in [0, 1] → a validated float32 tensor
  (B, 3, H, W) in [0, 1] whose width and height are multiples of the VAE factor. Bad input raises a
  `ValueError` that names the argument (`name`), the value and what is accepted.
* `ImageLatentsMixin`: the same input check as a pipeline method, plus the VAE encode (posterior mean,
  normalised as the UNet expects) and decode, and the conversion of decoded images to the `output_type`.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Dict, List, Optional, Union

import numpy as np
import PIL.Image
import torch

from guidekit.checks import check_choice

__all__ = ["ImageInput", "prepare_image", "ImageLatentsMixin", "OUTPUT_TYPES"]

ImageInput = Union[PIL.Image.Image, np.ndarray, torch.Tensor, List[PIL.Image.Image], List[np.ndarray]]

#: The `output_type` values of the image pipelines.
OUTPUT_TYPES = ("pil", "np", "pt")


def _array01(arr: np.ndarray, name: str) -> np.ndarray:
    if arr.ndim not in (3, 4) or arr.shape[-1] != 3:
        raise ValueError(f"{name}: array of shape {arr.shape} is not accepted; accepted: RGB (H, W, 3) or (B, H, W, 3)")
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    arr = arr.astype(np.float32)
    if arr.size and (arr.min() < 0 or arr.max() > 1):
        raise ValueError(f"{name}: float array values outside [0, 1]; accepted: uint8 or floats in [0, 1]")
    return arr


def prepare_image(image: ImageInput, vae_scale_factor: int, name: str = "image") -> torch.Tensor:
    """The input image(s) as a float32 tensor (B, 3, H, W) in [0, 1], validated.

    Args:
        image: PIL RGB image(s), numpy (H, W, 3) / (B, H, W, 3) (uint8, or floats in [0, 1]), a list of such
            arrays, or a torch tensor (B, 3, H, W) / (3, H, W) in [0, 1].
        vae_scale_factor (`int`): width and height must be multiples of it.
        name (`str`, defaults to ``"image"``): the argument name the error messages use.
    """
    if isinstance(image, PIL.Image.Image):
        image = [image]
    if isinstance(image, (list, tuple)):
        if len(image) == 0:
            raise ValueError(f"{name}: an empty list; accepted: one or more RGB images")
        arrays = []
        for im in image:
            if isinstance(im, PIL.Image.Image):
                if im.mode != "RGB":
                    raise ValueError(
                        f"{name}: PIL mode {im.mode!r} is not accepted; accepted: 'RGB' (use image.convert('RGB'))"
                    )
                arrays.append(np.asarray(im, dtype=np.float32) / 255.0)
            else:
                arrays.append(_array01(np.asarray(im), name))
        shapes = {a.shape for a in arrays}
        if len(shapes) != 1:
            raise ValueError(f"{name}: images of different sizes {sorted(shapes)}; accepted: one size per call")
        tensor = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    elif isinstance(image, np.ndarray):
        arr = _array01(image, name)
        tensor = torch.from_numpy(arr if arr.ndim == 4 else arr[None]).permute(0, 3, 1, 2)
    elif isinstance(image, torch.Tensor):
        tensor = image.detach().float().cpu()
        tensor = tensor[None] if tensor.ndim == 3 else tensor
        if tensor.ndim != 4 or tensor.shape[1] != 3:
            raise ValueError(
                f"{name}: tensor of shape {tuple(image.shape)} is not accepted; accepted: (B, 3, H, W) or (3, H, W) RGB in [0, 1]"
            )
        if tensor.numel() and (tensor.min() < 0 or tensor.max() > 1):
            raise ValueError(f"{name}: tensor values outside [0, 1]; accepted: RGB in [0, 1]")
    else:
        raise ValueError(
            f"{name}: {type(image).__name__} is not accepted; accepted: PIL image(s), numpy (H, W, 3) / (B, H, W, 3) "
            "or torch (B, 3, H, W)"
        )
    height, width = tensor.shape[-2:]
    if tensor.shape[0] == 0 or height == 0 or width == 0:
        raise ValueError(f"{name}: empty image of shape {tuple(tensor.shape)}; accepted: at least one non-empty RGB image")
    f = vae_scale_factor
    if height % f or width % f:
        raise ValueError(
            f"{name}: size {width}x{height} is not divisible by the VAE factor {f}; accepted: width and height "
            f"multiples of {f} (e.g. {width // f * f}x{height // f * f}, crop or resize first)"
        )
    return tensor.contiguous()


class ImageLatentsMixin:
    """Image input, VAE encode/decode, one UNet call and output conversion for a diffusers pipeline with `vae`, `unet`,
    `image_processor`, `vae_scale_factor` and `_execution_device`."""

    def _unet_pred(self, latents: torch.Tensor, t: int, cond: Dict[str, Any]) -> torch.Tensor:
        """One UNet call on `latents` with the conditioning rows `cond` (encoder states, SDXL added kwargs)."""
        return self.unet(
            latents.to(self.unet.dtype),
            t,
            encoder_hidden_states=cond["encoder_hidden_states"],
            added_cond_kwargs=cond.get("added_cond_kwargs"),
            return_dict=False,
        )[0]

    #: Whether per-channel `latents_mean`/`latents_std` in the VAE config (Playground v2.5's SDXL VAE has them)
    #: normalise the latents. Each pipeline follows its stock counterpart: SDXL applies them, SD 1.x/2.x does not.
    uses_vae_latent_stats = False

    def _prepare_image(self, image: ImageInput, name: str = "image") -> torch.Tensor:
        """The input image(s) as a float32 tensor (B, 3, H, W) in [0, 1], validated (see `prepare_image`)."""
        return prepare_image(image, self.vae_scale_factor, name)

    @contextmanager
    def _vae_precision(self):
        """Run a half-precision VAE that asks for it (`force_upcast`, SDXL's VAE) in float32, then put it back."""
        vae = self.vae
        dtype = vae.dtype
        upcast = dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
        if upcast:
            vae.to(torch.float32)
        try:
            yield vae
        finally:
            if upcast:
                vae.to(dtype)

    def _latent_stats(self, vae, like: torch.Tensor):
        """(mean, std), each (1, C, 1, 1) like `like`, when this pipeline uses them and the VAE config sets both
        (the stock pipelines' condition); None otherwise."""
        mean = getattr(vae.config, "latents_mean", None)
        std = getattr(vae.config, "latents_std", None)
        if not self.uses_vae_latent_stats or mean is None or std is None:
            return None
        return tuple(torch.tensor(v).view(1, -1, 1, 1).to(like.device, like.dtype) for v in (mean, std))

    def _normalize_latents(self, vae, latents: torch.Tensor) -> torch.Tensor:
        """VAE latents → UNet latents: ``(z − mean) · scaling_factor / std`` (stock SDXL img2img) when the VAE
        has latent statistics, else ``(z − shift_factor) · scaling_factor``."""
        stats = self._latent_stats(vae, latents)
        if stats is not None:
            mean, std = stats
            return (latents - mean) * vae.config.scaling_factor / std
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return (latents - shift) * vae.config.scaling_factor

    def _denormalize_latents(self, vae, latents: torch.Tensor) -> torch.Tensor:
        """UNet latents → VAE latents, the inverse of `_normalize_latents` (stock SDXL's decode)."""
        stats = self._latent_stats(vae, latents)
        if stats is not None:
            mean, std = stats
            return latents * std / vae.config.scaling_factor + mean
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return latents / vae.config.scaling_factor + shift

    def _encode_image(self, image01: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """z_0: the mean of the VAE posterior (deterministic), normalised as the UNet expects, in `dtype`
        (default: the UNet's)."""
        with self._vae_precision() as vae:
            x = (image01 * 2 - 1).to(self._execution_device, vae.dtype)
            latents = self._normalize_latents(vae, vae.encode(x).latent_dist.mean)
        return latents.to(self.unet.dtype if dtype is None else dtype)

    def _decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents → RGB in [0, 1], float32 (B, 3, H, W)."""
        with self._vae_precision() as vae:
            z = self._denormalize_latents(vae, latents.to(vae.dtype))
            image = vae.decode(z, return_dict=False)[0]
        return (image.float() / 2 + 0.5).clamp(0, 1)

    def _to_output(self, image01: torch.Tensor, output_type: str):
        check_choice("output_type", output_type, OUTPUT_TYPES)
        if output_type == "pt":
            return image01.cpu()
        arr = image01.cpu().permute(0, 2, 3, 1).numpy()
        return arr if output_type == "np" else self.image_processor.numpy_to_pil(arr)
