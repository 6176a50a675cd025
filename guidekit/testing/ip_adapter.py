"""A tiny random IP-Adapter (and CLIP image encoder) for a tiny UNet, written to a folder the way
`pipe.load_ip_adapter(folder, subfolder="", weight_name=...)` reads a real one."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

__all__ = ["TINY_IP_ADAPTER_WEIGHTS", "save_tiny_ip_adapter", "tiny_image_encoder"]

#: The weight file name `save_tiny_ip_adapter` writes by default.
TINY_IP_ADAPTER_WEIGHTS = "ip-adapter.safetensors"


def tiny_image_encoder(image_embed_dim: int = 8, image_size: int = 32, seed: int = 0) -> CLIPVisionModelWithProjection:
    """A tiny random CLIP vision model with a projection to `image_embed_dim` (what IP-Adapter's image
    projection takes), for `image_size`² inputs in 8×8 patches."""
    torch.manual_seed(seed)
    config = CLIPVisionConfig(
        hidden_size=16,
        intermediate_size=32,
        projection_dim=image_embed_dim,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=8,
    )
    return CLIPVisionModelWithProjection(config).eval()


def save_tiny_ip_adapter(
    unet,
    folder: str | os.PathLike,
    *,
    image_embed_dim: int = 8,
    seed: int = 0,
    weight_name: str = TINY_IP_ADAPTER_WEIGHTS,
    image_encoder: bool = True,
) -> Path:
    """Write a random IP-Adapter for `unet` (the original, non-"plus" kind: 4 image tokens projected from a pooled
    CLIP image embedding) to `folder`, with a tiny CLIP image encoder in ``folder/image_encoder``.

    Load it with ``pipe.load_ip_adapter(folder, subfolder="", weight_name=weight_name)`` (add
    ``image_encoder_folder=None`` to skip the encoder, then pass ``ip_adapter_image_embeds`` of width
    `image_embed_dim`). Loading it twice, ``weight_name=[weight_name, weight_name]``, gives two adapters with the
    same weights.

    Args:
        unet (`UNet2DConditionModel` or `UNetMotionModel`): the UNet the adapter is for (its cross-attention
            layers and width).
        folder (`str` or `os.PathLike`): where to write; created if missing.
        image_embed_dim (`int`, defaults to `8`): the width of the image embeddings the adapter takes.
        seed (`int`, defaults to `0`): the seed of the random weights.
        weight_name (`str`, defaults to ``"ip-adapter.safetensors"``): the weight file's name.
        image_encoder (`bool`, defaults to `True`): also write a tiny `CLIPVisionModelWithProjection` whose
            projection has width `image_embed_dim`.

    Returns:
        `Path`: `folder`.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    dim = unet.config.cross_attention_dim
    weights = {
        "image_proj.proj.weight": torch.randn(4 * dim, image_embed_dim, generator=g) / image_embed_dim**0.5,
        "image_proj.proj.bias": torch.zeros(4 * dim),
        "image_proj.norm.weight": torch.ones(dim),
        "image_proj.norm.bias": torch.zeros(dim),
    }
    # diffusers numbers the adapter's cross-attention layers 1, 3, 5, ... in `unet.attn_processors` order
    # (the numbering of the original checkpoints, which also counted the self-attention layers); a motion UNet's
    # temporal attentions take no image tokens, and diffusers skips them too.
    key_id = 1
    for name in unet.attn_processors:
        if name.endswith("attn1.processor") or "motion_modules" in name:
            continue
        hidden = unet.get_submodule(name[: -len(".processor")]).to_q.out_features
        weights[f"ip_adapter.{key_id}.to_k_ip.weight"] = torch.randn(hidden, dim, generator=g) / dim**0.5
        weights[f"ip_adapter.{key_id}.to_v_ip.weight"] = torch.randn(hidden, dim, generator=g) / dim**0.5
        key_id += 2
    save_file(weights, str(folder / weight_name))
    if image_encoder:
        tiny_image_encoder(image_embed_dim, seed=seed).save_pretrained(str(folder / "image_encoder"))
    return folder
