"""StyleID style transfer for Stable Diffusion XL: the same inversion, start point and injected sampling as
`pipelines/styleid_sd.py` (`StyleIDPipelineMixin`), with SDXL's two text encoders, pooled text embedding and
added time ids, and the SDXL VAE's per-channel latent statistics and fp32 upcast.

Injection layers on SDXL (guidekit's extension; the paper and its official code cover SD 1.4 / 2.x only).
The SD rule, "every self-attention layer of the last two up blocks" (`guidekit.attention.styleid_layers`),
is applied unchanged. SDXL base has three up blocks, and the last one (``up_blocks.2``, full latent
resolution) has no attention. So the rule keeps the 6 self-attention layers of ``up_blocks.1``
(3 attentions × 2 transformer blocks):

    up_blocks.1.attentions.{0,1,2}.transformer_blocks.{0,1}.attn1

They sit at 1/2 of the latent resolution (64² latent tokens for a 1024² image), 640 channels. On SD 1.x the
paper's 6 layers are split between the 1/2 and 1/1 levels. ``layers="diffusers"`` drops the first decoder layer,
the whole module ``up_blocks.1.attentions.0`` (both its transformer blocks), leaving 4: the official diffusers
port counts decoder layers as ``up_blocks[i // 3].attentions[i % 3]`` and leaves out layer 6, one attention
module (``transformer_blocks[0]`` is all it hooks, the only block on SD). Neither official port runs on SDXL
(both index SD's four up blocks), so this mapping is guidekit's. The first up block (``up_blocks.0``, 1/4 resolution, 30 layers) is never chosen by the rule; pass
``layers=[...]`` to try others.
"""

from __future__ import annotations

from diffusers import StableDiffusionXLPipeline

from .styleid_sd import StyleIDPipelineMixin
from .uam_sdxl import UAMStableDiffusionXLPipeline

__all__ = ["StyleIDStableDiffusionXLPipeline"]


class StyleIDStableDiffusionXLPipeline(StyleIDPipelineMixin, StableDiffusionXLPipeline):
    """`StableDiffusionXLPipeline` with StyleID style transfer, `transfer(content, style)`.

    Loads like the stock pipeline (`from_pretrained`, `from_pipe`); `__call__` is the stock text-to-image.
    `transfer` is `StyleIDPipelineMixin.transfer`: inversion and sampling with the empty prompt and no CFG.
    On SDXL the empty prompt is all zeros (text and pooled embeddings) when the checkpoint sets
    `force_zeros_for_empty_prompt` (SDXL base does): the stock pipeline's unconditional input. The added time
    ids of each UNet call describe the image being inverted or generated, uncropped: (H, W, 0, 0, H, W). A VAE
    whose config sets `latents_mean` and `latents_std` has its latents normalised per channel, and a float16
    VAE with `force_upcast` (SDXL's) encodes and decodes in float32, as stock SDXL does.

    The style cache holds the style's K/V in the 6 injection layers at every step: about 3.1 GB in float16 at
    1024² and 50 steps (`style_cache_size`, `clear_style_cache`).

    Example:
        >>> from guidekit.pipelines import StyleIDStableDiffusionXLPipeline
        >>> pipe = StyleIDStableDiffusionXLPipeline.from_pretrained("path/or/hub-id", torch_dtype=torch.float16)
        >>> out = pipe.to("cuda").transfer(content, style)  # 1024² images; γ = 0.75, T = 1.5
        >>> out.images[0]
    """

    uses_vae_latent_stats = True

    # The SDXL conditioning rows (prompt embeddings, pooled embeddings, time ids; zeros for "" when the
    # checkpoint asks for it) are the UAM SDXL pipeline's, shared rather than rewritten.
    _encode_rows = UAMStableDiffusionXLPipeline._encode_rows
