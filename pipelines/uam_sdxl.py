"""Uniform Attention Maps for Stable Diffusion XL: the same inversion, reconstruction and editing loops as
`pipelines/uam_sd.py` (`UAMPipelineMixin`), with SDXL's two text encoders and added time conditioning.

MasaCtrl layer choice on SDXL: `start_layer=None` means layer 64 of 70, i.e. the last 6 self-attention layers,
the decoder's highest-resolution attention block — see `UAMPipelineMixin.edit` for why.
"""

from __future__ import annotations

from typing import Any, Dict, List

import torch
from diffusers import StableDiffusionXLPipeline

from .uam_sd import UAMPipelineMixin

__all__ = ["UAMStableDiffusionXLPipeline"]


class UAMStableDiffusionXLPipeline(UAMPipelineMixin, StableDiffusionXLPipeline):
    """`StableDiffusionXLPipeline` with UAM `invert`, `reconstruct` and `edit` (see `UAMPipelineMixin`).

    Loads like the stock pipeline (`from_pretrained`, `from_pipe`); `__call__` is the stock text-to-image.
    The null prompt "" is encoded as zeros when the checkpoint sets `force_zeros_for_empty_prompt` (SDXL base
    does), which is what the stock pipeline feeds its unconditional branch. A VAE whose config sets
    `latents_mean` and `latents_std` (Playground v2.5) has its latents normalised per channel on encode and
    decode, as stock SDXL does.
    """

    uses_vae_latent_stats = True

    def _encode_rows(self, prompts: List[str], height: int, width: int) -> Dict[str, Any]:
        device = self._execution_device
        embeds, _, pooled, _ = self.encode_prompt(
            prompt=prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        if self.config.force_zeros_for_empty_prompt:
            empty = torch.tensor([p == "" for p in prompts], device=embeds.device)
            embeds = torch.where(empty[:, None, None], torch.zeros_like(embeds), embeds)
            pooled = torch.where(empty[:, None], torch.zeros_like(pooled), pooled)
        if self.text_encoder_2 is None:
            projection_dim = int(pooled.shape[-1])
        else:
            projection_dim = self.text_encoder_2.config.projection_dim
        time_ids = self._get_add_time_ids(
            (int(height), int(width)), (0, 0), (int(height), int(width)), dtype=embeds.dtype,
            text_encoder_projection_dim=projection_dim,
        ).to(device)
        return {
            "encoder_hidden_states": embeds,
            "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids.repeat(len(prompts), 1)},
        }
