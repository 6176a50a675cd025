"""diffusers pipelines whose denoising loops run guidekit hooks (installed as `guidekit.pipelines`)."""

from .guided_animatediff import GuidedAnimateDiffPipeline
from .guided_animatediff_sdxl import GuidedAnimateDiffSDXLPipeline
from .guided_ddpm import GuidedDDPMPipeline
from .guided_dit import GuidedDiTPipeline
from .guided_flux import GuidedFluxPipeline
from .guided_qwenimage import GuidedQwenImagePipeline
from .guided_sd import GuidedStableDiffusionPipeline
from .guided_sd3 import GuidedStableDiffusion3Pipeline
from .guided_sdxl import GuidedStableDiffusionXLPipeline
from .guided_wan import GuidedWanPipeline
from .styleid_sd import StyleIDStableDiffusionPipeline
from .styleid_sdxl import StyleIDStableDiffusionXLPipeline
from .uam_sd import UAMStableDiffusionPipeline
from .uam_sdxl import UAMStableDiffusionXLPipeline

__all__ = [
    "GuidedAnimateDiffPipeline",
    "GuidedAnimateDiffSDXLPipeline",
    "GuidedDDPMPipeline",
    "GuidedDiTPipeline",
    "GuidedFluxPipeline",
    "GuidedQwenImagePipeline",
    "GuidedStableDiffusionPipeline",
    "GuidedStableDiffusion3Pipeline",
    "GuidedStableDiffusionXLPipeline",
    "GuidedWanPipeline",
    "StyleIDStableDiffusionPipeline",
    "StyleIDStableDiffusionXLPipeline",
    "UAMStableDiffusionPipeline",
    "UAMStableDiffusionXLPipeline",
]
