"""Tiny random diffusers components, built offline, for tests, examples and benchmarks.

Every builder saves the components with `save_pretrained` and loads them back with `from_pretrained`,
so the code path users hit with real checkpoints is the one exercised.
"""

from .tiny import (
    guidance_pairs,
    make_tiny_sd,
    make_tiny_sdxl,
    make_mid_unet,
    sd_ddim_scheduler,
    tiny_sd_pipeline,
    tiny_sdxl_pipeline,
    tiny_vae,
)
from .ip_adapter import TINY_IP_ADAPTER_WEIGHTS, save_tiny_ip_adapter, tiny_image_encoder
from .classifiers import CONVNEXT_PROCESSOR, PLAIN_PROCESSOR, TinyReLUClassifier, make_tiny_classifier
from .tokenizer import build_clip_tokenizer
from .flux import make_tiny_flux, tiny_flux_components
from .qwenimage import build_qwen2_tokenizer, make_tiny_qwenimage, tiny_qwenimage_components
from .wan import make_tiny_wan, tiny_wan_pipeline, wan_scheduler

__all__ = [
    "CONVNEXT_PROCESSOR",
    "PLAIN_PROCESSOR",
    "TinyReLUClassifier",
    "make_tiny_classifier",
    "tiny_vae",
    "build_clip_tokenizer",
    "guidance_pairs",
    "make_tiny_sd",
    "make_tiny_sdxl",
    "make_mid_unet",
    "sd_ddim_scheduler",
    "tiny_sd_pipeline",
    "tiny_sdxl_pipeline",
    "TINY_IP_ADAPTER_WEIGHTS",
    "save_tiny_ip_adapter",
    "tiny_image_encoder",
    "make_tiny_flux",
    "tiny_flux_components",
    "build_qwen2_tokenizer",
    "make_tiny_qwenimage",
    "tiny_qwenimage_components",
    "make_tiny_wan",
    "tiny_wan_pipeline",
    "wan_scheduler",
]
