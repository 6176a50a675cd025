"""Architecture of the embedded toy text-to-image model (a standard StableDiffusionPipeline layout)."""

from __future__ import annotations

from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from ..testing.tokenizer import DEFAULT_WORDS, build_clip_tokenizer
from .world import COLOURS, SHAPES, TEXTURES

__all__ = [
    "TOKENIZER_WORDS",
    "MAX_LENGTH",
    "SCHEDULER_KWARGS",
    "build_tokenizer",
    "build_vae",
    "build_text_encoder",
    "build_unet",
    "build_unet_v2",
    "UNET_V2_CHANNELS",
    "UNET_V2_HEAD_WIDTH",
    "build_train_scheduler",
    "build_scheduler",
]

#: Every word of the caption grammar is a single token; other words are spelled out in pieces.
TOKENIZER_WORDS = tuple(dict.fromkeys(tuple(DEFAULT_WORDS) + COLOURS + SHAPES + TEXTURES + ("a", "on", "background")))
MAX_LENGTH = 32  # captions are 9-10 tokens with <bos>/<eos>; free text is truncated here

#: The noise schedule: SD's scaled-linear betas rescaled to zero terminal SNR, v-prediction.
SCHEDULER_KWARGS = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="v_prediction",
    rescale_betas_zero_snr=True,
    timestep_spacing="trailing",
    clip_sample=False,
)


def build_tokenizer(fresh: bool = False):
    """The toy model's tokenizer: the embedded model's own when it is installed, else a newly built one.

    `build_clip_tokenizer` learns its BPE merges with the `tokenizers` trainer, which breaks ties between
    equally frequent pairs in hash order: two builds in one process can give different token ids. So that
    training is reproducible, training reuses the shipped tokenizer (built once by `build_clip_tokenizer`
    with `TOKENIZER_WORDS`); ``fresh=True`` (or no embedded model) builds a new one.
    """
    if not fresh:
        try:
            from transformers import CLIPTokenizer

            from . import default_model_path

            folder = default_model_path() / "tokenizer"
            if (folder / "tokenizer_config.json").exists():
                return CLIPTokenizer.from_pretrained(str(folder))
        except FileNotFoundError:
            pass
    return build_clip_tokenizer(TOKENIZER_WORDS, model_max_length=MAX_LENGTH)


def build_vae() -> AutoencoderKL:
    """x4 downsampling (three blocks), 4 latent channels: 64x64x3 -> 16x16x4."""
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=64,
        mid_block_add_attention=False,
    )
    return vae


def build_text_encoder(tokenizer) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=MAX_LENGTH,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        projection_dim=64,
    )
    return CLIPTextModel(config)


def build_unet() -> UNet2DConditionModel:
    """A small UNet on 16x16x4 latents; self- and cross-attention (attn1/attn2) at 8x8 and 4x4 (and the mid block).

    The shipped model's architecture.  Its ``attention_head_dim=32`` is, in diffusers, 32 *heads* (of 1-3
    channels); with those heads, attention at 16x16 too would more than double the CPU cost of a training
    step (measured 1.24 vs 0.56 CPU-s at batch 32); :func:`build_unet_v2` adds it with fewer, wider heads.
    """
    return UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64, 96),
        layers_per_block=1,
        cross_attention_dim=64,
        attention_head_dim=32,
        norm_num_groups=16,
        transformer_layers_per_block=1,
    )


#: Block widths of :func:`build_unet_v2` (see its docstring for the measured cost).
UNET_V2_CHANNELS = (48, 64, 96)
#: Width of one attention head in :func:`build_unet_v2`.
UNET_V2_HEAD_WIDTH = 32


def _heads_of_width(channels: int, width: int) -> int:
    """The most heads of at least ``width`` channels that split ``channels`` evenly (at least one)."""
    heads = max(1, channels // width)
    while channels % heads:
        heads -= 1
    return heads


def build_unet_v2(block_out_channels=UNET_V2_CHANNELS, attention_heads=None) -> UNet2DConditionModel:
    """The v2 UNet: like :func:`build_unet`, plus self- and cross-attention at the full 16x16 latent resolution.

    Every down and up block is a cross-attention block, so each resolution (16x16, 8x8, 4x4 and the mid block)
    sees the prompt, which is where the shape's outline is drawn.  ``attention_heads`` (one per block, or one
    for all) defaults to the most heads of at least ``UNET_V2_HEAD_WIDTH`` channels that split each block.  (diffusers' ``attention_head_dim`` of
    this model class is, for historical reasons, the number of heads: :func:`build_unet`'s 32 means 32
    heads of 1-3 channels, which at 256 tokens would make 16x16 attention several times dearer for nothing.)
    Not the shipped model's architecture: its weights load with :func:`build_unet`'s config.

    Cost, measured on one CPU thread (forward + backward + AdamW step of UNet and text encoder, batch 32, 15
    steps after 3 of warm-up; CPU seconds per step, two runs): :func:`build_unet` 0.56-0.57 (2.73 M
    parameters); v2 (32, 64, 96) 0.51-0.55 (2.80 M: its few wide heads make 16x16 attention cheaper than
    v1's 32 narrow heads at 8x8); v2 (48, 64, 96), the default, 0.64-0.74 (3.10 M, 12.4 MB); v2 (48, 80, 112)
    0.83 (4.14 M, 16.6 MB: with the VAE and text encoder, 20.7 MB, at the edge of the shipped model's 20 MiB).
    """
    widths = tuple(int(c) for c in block_out_channels)
    if len(widths) != 3 or any(c <= 0 or c % 16 for c in widths):
        raise ValueError(f"block_out_channels: got {block_out_channels!r}; expected three positive multiples of 16 "
                         "(the group-norm groups), e.g. (48, 64, 96)")
    if attention_heads is None:
        heads = tuple(_heads_of_width(c, UNET_V2_HEAD_WIDTH) for c in widths)
    else:
        heads = (attention_heads,) * 3 if isinstance(attention_heads, int) else tuple(attention_heads)
        if len(heads) != 3 or any(not isinstance(h, int) or h <= 0 or c % h for h, c in zip(heads, widths)):
            raise ValueError(f"attention_heads: got {attention_heads!r}; expected a positive int or three, each "
                             f"dividing its block's width {widths}")
    return UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3,
        up_block_types=("CrossAttnUpBlock2D",) * 3,
        block_out_channels=widths,
        layers_per_block=1,
        cross_attention_dim=64,
        attention_head_dim=heads,  # the number of heads per block, see above
        norm_num_groups=16,
        transformer_layers_per_block=1,
    )


def build_train_scheduler() -> DDPMScheduler:
    return DDPMScheduler(**SCHEDULER_KWARGS)


def build_scheduler() -> DDIMScheduler:
    """The sampling scheduler shipped with the pipeline."""
    return DDIMScheduler(**SCHEDULER_KWARGS, set_alpha_to_one=True, steps_offset=1)
