"""A tiny random Qwen-Image checkpoint, built offline with the configs of diffusers' own Qwen-Image fast test; the
Qwen2 tokenizer is built here instead of downloaded."""

from __future__ import annotations

import os
import re
from collections import Counter
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKLQwenImage,
    FlowMatchEulerDiscreteScheduler,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
)
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer

from .tokenizer import _merge

__all__ = ["QWEN_TEMPLATE_PREFIX_TOKENS", "build_qwen2_tokenizer", "tiny_qwenimage_components", "make_tiny_qwenimage"]

#: QwenImagePipeline drops this many leading tokens of its chat template (the system prompt and "user" turn
#: opener) from the text encoder's output. The tokenizer must split that prefix into exactly this many tokens,
#: as Qwen's own does: with more, the kept embeddings would start inside the system prompt, which prompt and
#: negative prompt share, and true CFG would see identical conditions (no effect at all).
QWEN_TEMPLATE_PREFIX_TOKENS = 34

_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def _byte_symbols() -> dict[int, str]:
    """Byte-level BPE's printable stand-in for each byte (GPT-2's convention, as in Qwen2: space "Ġ", newline "Ċ")."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols, shifted = {}, 0
    for byte in range(256):
        if byte in printable:
            symbols[byte] = chr(byte)
        else:
            symbols[byte] = chr(256 + shifted)
            shifted += 1
    return symbols


def _template_words(template: str) -> list[str]:
    # The words of the template as the Qwen2 pre-tokenizer cuts them: letters with at most one leading space.
    text = template.replace("<|im_start|>", "\n").replace("<|im_end|>", "\n")
    return list(dict.fromkeys(re.findall(r" ?[^\W\d_]+", text)))


def build_qwen2_tokenizer(template: str | None = None) -> Qwen2Tokenizer:
    """An offline byte-level Qwen2 tokenizer in which each word of Qwen-Image's prompt template is one token.

    Vocabulary: the 256 byte symbols, the merges that spell each template word (learned here greedily, ties to
    the smallest pair, so the ids are the same in every process), and the specials <|endoftext|> (padding),
    <|im_start|>, <|im_end|>. The template prefix that `QwenImagePipeline` drops then has exactly
    `QWEN_TEMPLATE_PREFIX_TOKENS` tokens, as with Qwen's tokenizer; prompt text outside the template is spelled
    out byte by byte (or in the few learned pieces).

    Args:
        template (`str`, *optional*): the pipeline's `prompt_template_encode`; defaults to `QwenImagePipeline`'s.
    """
    if template is None:
        template = _stock_template()
    symbols = _byte_symbols()
    corpus = [[symbols[b] for b in word.encode("utf-8")] for word in _template_words(template)]
    merges: list[tuple[str, str]] = []
    while any(len(word) > 1 for word in corpus):
        counts = Counter(pair for word in corpus for pair in zip(word, word[1:]))
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        merges.append(best)
        corpus = [_merge(word, best) for word in corpus]
    vocab: dict[str, int] = {}
    for byte in range(256):
        vocab.setdefault(symbols[byte], len(vocab))
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    for special in _SPECIALS:
        vocab[special] = len(vocab)
    tokenizer = Qwen2Tokenizer(
        vocab=vocab, merges=merges, unk_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    return tokenizer


def _stock_template() -> str:
    # The template is set in the pipeline's constructor, which accepts empty components.
    empty = QwenImagePipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, transformer=None)
    return empty.prompt_template_encode


def tiny_qwen_text_encoder(seed: int = 0) -> Qwen2_5_VLForConditionalGeneration:
    """diffusers' fast-test Qwen2.5-VL (hidden size 16, two layers, random weights)."""
    torch.manual_seed(seed)
    config = Qwen2_5_VLConfig(
        text_config={
            "hidden_size": 16,
            "intermediate_size": 16,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
            "rope_theta": 1000000.0,
        },
        vision_config={"depth": 2, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 16},
        hidden_size=16,
        vocab_size=152064,
        vision_end_token_id=151653,
        vision_start_token_id=151652,
        vision_token_id=151654,
    )
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def tiny_qwenimage_components(seed: int = 0) -> dict:
    """The components of diffusers' Qwen-Image fast test (random weights), with the offline tokenizer.

    The VAE has factor 4 and 4 latent channels: a 32x32 image is 16 packed tokens of 16 channels. The
    scheduler is Qwen-Image's: dynamic shift (base 0.5, max 0.9, max sequence 8192) ending at sigma 0.02.
    """
    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=16,
        out_channels=4,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=3,
        joint_attention_dim=16,
        guidance_embeds=False,
        axes_dims_rope=(8, 4, 4),
    )
    torch.manual_seed(seed)
    vae = AutoencoderKLQwenImage(
        base_dim=24,
        z_dim=4,
        dim_mult=[1, 2, 4],
        num_res_blocks=1,
        temperal_downsample=[False, True],
        latents_mean=[0.0] * 4,
        latents_std=[1.0] * 4,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9, max_image_seq_len=8192, shift_terminal=0.02
    )
    return dict(
        transformer=transformer,
        vae=vae,
        scheduler=scheduler,
        text_encoder=tiny_qwen_text_encoder(seed),
        tokenizer=build_qwen2_tokenizer(),
    )


def make_tiny_qwenimage(folder: str | os.PathLike, seed: int = 0) -> Path:
    """Save a tiny random `QwenImagePipeline` to `folder` (loadable with `from_pretrained`)."""
    folder = Path(folder)
    QwenImagePipeline(**tiny_qwenimage_components(seed)).save_pretrained(folder)
    return folder
