"""FreeNoise (Qiu et al., ICLR 2024): the torch-only math core of long and multi-prompt video sampling.

* `plan_windows`: the temporal windows, shared by the noise rescheduling and the fusion; `fused_spans`: the
  frames each window contributes (the tail window all or only its new ones, `TAILS`);
* `reschedule_noise`, `shuffle_sources`: the official block shuffle of the initial noise (and "repeat", "random");
* `window_weights`, `fuse_windows`, `fusion_weights`, `WindowAccumulator`: weighted fusion of window outputs;
* `interpolate_prompt_schedule`, `official_two_prompt_schedule`, `blend_embeddings`: per-frame prompt embeddings;
* `uses_fixed_prompt`: the motion-injection step rule;
* `window_group_norm`, `windowed_group_norms`, `chunked_layers`: per-window GroupNorm statistics and exact
  chunking of a motion UNet's layers (`guidekit.video.motion`);
* `save_video`: frames to an animated GIF or WebP file (Pillow).
"""

from .export import save_video
from .motion import NORM_SCOPES, chunked_layers, window_group_norm, windowed_group_norms
from .noise import NOISE_MODES, reschedule_noise, shuffle_sources
from .prompts import (
    PromptBlend,
    blend_embeddings,
    interpolate_prompt_schedule,
    official_two_prompt_schedule,
    uses_fixed_prompt,
)
from .windows import (
    TAILS,
    WEIGHTINGS,
    WindowAccumulator,
    fuse_windows,
    fused_spans,
    fusion_weights,
    plan_windows,
    window_weights,
)

__all__ = [
    "NOISE_MODES",
    "NORM_SCOPES",
    "PromptBlend",
    "TAILS",
    "WEIGHTINGS",
    "WindowAccumulator",
    "blend_embeddings",
    "chunked_layers",
    "fuse_windows",
    "fused_spans",
    "fusion_weights",
    "interpolate_prompt_schedule",
    "official_two_prompt_schedule",
    "plan_windows",
    "reschedule_noise",
    "save_video",
    "shuffle_sources",
    "uses_fixed_prompt",
    "window_group_norm",
    "window_weights",
    "windowed_group_norms",
]
