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

    Attention at 16x16 would triple the CPU cost of a training step for little gain on this world.
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


def build_train_scheduler() -> DDPMScheduler:
    return DDPMScheduler(**SCHEDULER_KWARGS)


def build_scheduler() -> DDIMScheduler:
    """The sampling scheduler shipped with the pipeline."""
    return DDIMScheduler(**SCHEDULER_KWARGS, set_alpha_to_one=True, steps_offset=1)
