"""diffusers pipelines whose denoising loops run guidekit hooks (installed as `guidekit.pipelines`)."""

from .guided_sd import GuidedStableDiffusionPipeline
from .guided_sdxl import GuidedStableDiffusionXLPipeline

__all__ = ["GuidedStableDiffusionPipeline", "GuidedStableDiffusionXLPipeline"]
