"""FreeNoise window fusion inside the motion modules of a diffusers `UNetMotionModel` (AnimateDiff).

In every temporal transformer block the temporal self-attentions run on each window of
`plan_windows(F, W, S)`, each window with its own positions 0…W−1, and the window outputs are fused with
the core's `WindowAccumulator` (per-frame weights normalised to sum to exactly 1, the tail window included):

* "block" fusion (the AnimateDiff port of FreeNoise, diffusers' `FreeNoiseTransformerBlock`): both attentions
  with their residuals run per window, the windows' residual streams are fused, and the feed-forward runs
  once on the fused sequence;
* "attention" fusion (the official VideoCrafter code): each attention's output is fused over the windows,
  then added to the full residual stream, so the second attention sees the fused first one.

Clone-then-patch: the blocks' own `forward`s are shadowed for one call and put back afterwards; the
weights, processors and module tree are never touched, so `end` leaves the model exactly as it was.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Optional

import torch
from torch import nn

from ..hooks import HookConflictError
from ..video import WindowAccumulator, plan_windows
from .install import attention_layers
from .wrapping import WrappingProcessor

__all__ = [
    "InjectionControl",
    "MotionInjectionProcessor",
    "injection_layers",
    "motion_blocks",
    "motion_max_length",
    "windowed_block_forward",
    "windowed_motion_blocks",
]

#: Marks a block whose `forward` is shadowed by a FreeNoise fusion, so that two fusions never stack.
_MARK = "_guidekit_freenoise"


def motion_blocks(unet: nn.Module) -> list[tuple[str, nn.Module]]:
    """The temporal transformer blocks of a motion UNet: (name, block) for every block under `motion_modules`.

    Args:
        unet (`nn.Module`): a diffusers `UNetMotionModel` (or any model whose temporal blocks live in
            `*.motion_modules.*.transformer_blocks`).
    """
    return [
        (name, module)
        for name, module in unet.named_modules()
        if ".motion_modules." in f".{name}." and name.split(".")[-2:-1] == ["transformer_blocks"]
    ]


def motion_max_length(unet: nn.Module) -> Optional[int]:
    """The motion model's positional limit (`motion_max_seq_length`), or None if its config has none."""
    config = getattr(unet, "config", None)
    value = config.get("motion_max_seq_length") if config is not None else None
    return int(value) if value is not None else None


def _self_attention(attn: nn.Module, norm: Optional[nn.Module], pos_embed: Optional[nn.Module],
                    hidden_states: torch.Tensor, encoder_hidden_states, attention_mask,
                    cross_attention_kwargs: dict) -> torch.Tensor:
    """One attention of a layer-norm `BasicTransformerBlock`: norm → (+ positions from 0) → attention output."""
    norm_hidden_states = norm(hidden_states)
    if pos_embed is not None:
        norm_hidden_states = pos_embed(norm_hidden_states)
    return attn(norm_hidden_states, encoder_hidden_states=encoder_hidden_states, attention_mask=attention_mask,
                **cross_attention_kwargs)


def _attend(block: nn.Module, hidden_states: torch.Tensor, attention_mask, encoder_hidden_states,
            encoder_attention_mask, cross_attention_kwargs: dict) -> torch.Tensor:
    """The attention half of a layer-norm `BasicTransformerBlock` on one window (positions restart at 0)."""
    attn_output = _self_attention(
        block.attn1, block.norm1, block.pos_embed, hidden_states,
        encoder_hidden_states if block.only_cross_attention else None, attention_mask, cross_attention_kwargs,
    )
    hidden_states = attn_output + hidden_states
    if hidden_states.ndim == 4:
        hidden_states = hidden_states.squeeze(1)
    if block.attn2 is not None:
        attn_output = _self_attention(
            block.attn2, block.norm2, block.pos_embed, hidden_states, encoder_hidden_states,
            encoder_attention_mask, cross_attention_kwargs,
        )
        hidden_states = attn_output + hidden_states
    return hidden_states


def _fused_attention(attn: nn.Module, norm: nn.Module, pos_embed: Optional[nn.Module], hidden_states: torch.Tensor,
                     plan, weighting, encoder_hidden_states, attention_mask, cross_attention_kwargs: dict):
    """One attention run per window, the window outputs fused per frame (VideoCrafter's FreeNoise attention).

    VideoCrafter fuses before `to_out`; `to_out` is affine, and the fusion weights of a frame sum to 1, so
    fusing after it is the same map.
    """
    fused = WindowAccumulator(hidden_states.size(1), frame_dim=1)
    for start, stop in plan:
        output = _self_attention(
            attn, norm, pos_embed, hidden_states[:, start:stop], encoder_hidden_states, attention_mask,
            cross_attention_kwargs,
        )
        fused.accumulate((start, stop), output, weighting)
    return fused.normalise()


def windowed_block_forward(
    block: nn.Module,
    hidden_states: torch.Tensor,
    context_length: int,
    context_stride: int,
    weighting: Any = "pyramid",
    attention_mask: Optional[torch.Tensor] = None,
    encoder_hidden_states: Optional[torch.Tensor] = None,
    encoder_attention_mask: Optional[torch.Tensor] = None,
    cross_attention_kwargs: Optional[dict] = None,
    fusion: str = "block",
) -> torch.Tensor:
    """One temporal `BasicTransformerBlock` with FreeNoise window fusion.

    Args:
        block (`nn.Module`): a diffusers `BasicTransformerBlock` with `norm_type="layer_norm"` (AnimateDiff's).
        hidden_states (`torch.Tensor`): (B·H·W, F, C), frames on axis 1.
        context_length (`int`): W, the frames of one window.
        context_stride (`int`): S, the frames between two window starts.
        weighting (`str`, callable or sequence, defaults to `"pyramid"`): per-frame window weights, as
            `guidekit.video.window_weights` accepts them.
        attention_mask, encoder_hidden_states, encoder_attention_mask, cross_attention_kwargs: passed to the
            attentions as the stock block passes them.
        fusion (`str`, defaults to `"block"`): "block": both attentions (with their residuals) run per window
            and the windows' residual streams are fused once (AnimateDiff port, diffusers); "attention": each
            attention's output is fused over the windows before its residual (VideoCrafter).
    """
    cross_attention_kwargs = dict(cross_attention_kwargs or {})
    num_frames = hidden_states.size(1)
    plan = plan_windows(num_frames, context_length, context_stride)
    if fusion == "block":
        fused = WindowAccumulator(num_frames, frame_dim=1)
        for start, stop in plan:
            window = _attend(
                block, hidden_states[:, start:stop], attention_mask, encoder_hidden_states, encoder_attention_mask,
                cross_attention_kwargs,
            )
            fused.accumulate((start, stop), window, weighting)
        hidden_states = fused.normalise()
    elif fusion == "attention":
        attn_output = _fused_attention(
            block.attn1, block.norm1, block.pos_embed, hidden_states, plan, weighting,
            encoder_hidden_states if block.only_cross_attention else None, attention_mask, cross_attention_kwargs,
        )
        hidden_states = attn_output + hidden_states
        if hidden_states.ndim == 4:
            hidden_states = hidden_states.squeeze(1)
        if block.attn2 is not None:
            attn_output = _fused_attention(
                block.attn2, block.norm2, block.pos_embed, hidden_states, plan, weighting, encoder_hidden_states,
                encoder_attention_mask, cross_attention_kwargs,
            )
            hidden_states = attn_output + hidden_states
    else:
        raise ValueError(f"fusion: {fusion!r} is not accepted; accepted: 'block', 'attention'")

    norm_hidden_states = block.norm3(hidden_states)
    if block._chunk_size is not None:
        from diffusers.models.attention import _chunked_feed_forward

        ff_output = _chunked_feed_forward(block.ff, norm_hidden_states, block._chunk_dim, block._chunk_size)
    else:
        ff_output = block.ff(norm_hidden_states)
    hidden_states = ff_output + hidden_states
    if hidden_states.ndim == 4:
        hidden_states = hidden_states.squeeze(1)
    return hidden_states


def _patched_forward(block: nn.Module, original, context_length: int, context_stride: int, weighting, fusion: str):
    def forward(hidden_states, attention_mask=None, encoder_hidden_states=None, encoder_attention_mask=None,
                timestep=None, cross_attention_kwargs=None, class_labels=None, added_cond_kwargs=None):
        # one window covers everything: the stock block, so F <= W gives exactly the plain model
        if hidden_states.size(1) <= context_length:
            return original(
                hidden_states, attention_mask=attention_mask, encoder_hidden_states=encoder_hidden_states,
                encoder_attention_mask=encoder_attention_mask, timestep=timestep,
                cross_attention_kwargs=cross_attention_kwargs, class_labels=class_labels,
                added_cond_kwargs=added_cond_kwargs,
            )
        return windowed_block_forward(
            block, hidden_states, context_length, context_stride, weighting, attention_mask,
            encoder_hidden_states, encoder_attention_mask, cross_attention_kwargs, fusion,
        )

    return forward


@contextmanager
def windowed_motion_blocks(
    unet: nn.Module,
    context_length: int,
    context_stride: int,
    weighting: Any = "pyramid",
    owner: Any = None,
    fusion: str = "block",
) -> Iterator[list[str]]:
    """Run every temporal transformer block of `unet` with FreeNoise window fusion inside a `with` block.

    Yields the names of the patched blocks. On exit (also when the body raises) each block's own `forward`
    is back.

    Args:
        unet (`nn.Module`): a diffusers `UNetMotionModel`.
        context_length (`int`): W.
        context_stride (`int`): S.
        weighting (`str`, callable or sequence, defaults to `"pyramid"`): the window weights.
        owner (*optional*): who installs the fusion, named in the error when another fusion is already there.
        fusion (`str`, defaults to `"block"`): "block" or "attention" (see `windowed_block_forward`).

    Raises:
        ValueError: the UNet has no temporal blocks, or a block is not a layer-norm `BasicTransformerBlock`
            (e.g. diffusers' own `FreeNoiseTransformerBlock` after `pipe.enable_free_noise()`).
        HookConflictError: the blocks already run another FreeNoise fusion.
    """
    if fusion not in ("block", "attention"):
        raise ValueError(f"fusion: {fusion!r} is not accepted; accepted: 'block', 'attention'")
    blocks = motion_blocks(unet)
    if not blocks:
        raise ValueError(
            f"unet: {type(unet).__name__} has no temporal transformer blocks (motion modules); accepted: a "
            "diffusers UNetMotionModel, e.g. the UNet of an AnimateDiffPipeline"
        )
    for name, block in blocks:
        if type(block).__name__ == "FreeNoiseTransformerBlock":
            raise HookConflictError(
                f"unet: diffusers' own FreeNoise is enabled ({name}); call pipe.disable_free_noise() before using "
                "guidekit.FreeNoise"
            )
        if getattr(block, "norm_type", None) != "layer_norm" or not hasattr(block, "ff"):
            raise ValueError(
                f"unet: block {name} ({type(block).__name__}) is not accepted; accepted: layer-norm "
                "BasicTransformerBlocks, as in AnimateDiff motion modules"
            )
        if _MARK in block.__dict__:
            raise HookConflictError(
                f"unet: {name} already runs the FreeNoise fusion of {block.__dict__[_MARK]!r}; pass one FreeNoise hook"
            )
    patched: list[tuple[nn.Module, Any]] = []
    try:
        for _, block in blocks:
            # an instance attribute of the user's own, if any, is restored as it was
            previous = block.__dict__.get("forward")
            original = block.forward
            block.forward = _patched_forward(block, original, context_length, context_stride, weighting, fusion)
            block.__dict__[_MARK] = owner
            patched.append((block, previous))
        yield [name for name, _ in blocks]
    finally:
        for block, previous in reversed(patched):
            del block.__dict__[_MARK]
            if previous is None:
                del block.__dict__["forward"]
            else:
                block.forward = previous


class InjectionControl:
    """Per-step switch of motion injection, shared by the processors of one call.

    Attributes:
        fixed (`torch.Tensor` or None): the fixed prompt's embedding (tokens, dim), or None when off.
        rows (`int`): the conditional rows of the UNet batch (B·F), the last rows of `encoder_hidden_states`.
        active (`bool`): whether the injected layers read `fixed` at this step.
    """

    def __init__(self, fixed: torch.Tensor, rows: int):
        self.fixed = fixed
        self.rows = rows
        self.active = False


class MotionInjectionProcessor(WrappingProcessor):
    """Cross-attention processor of FreeNoise's motion injection (official `use_injection`).

    While `control.active`, the conditional rows of `encoder_hidden_states` are replaced by the fixed prompt's
    embedding before the layer's own processor runs; the unconditional rows are never changed.

    Args:
        original: the layer's processor, which does the attention.
        control (`InjectionControl`): the call's switch and fixed embedding.
    """

    def __init__(self, original, control: InjectionControl):
        super().__init__(original)
        self.control = control

    def _call(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        control = self.control
        if control.active and encoder_hidden_states is not None:
            encoder_hidden_states = encoder_hidden_states.clone()
            fixed = control.fixed.to(dtype=encoder_hidden_states.dtype, device=encoder_hidden_states.device)
            encoder_hidden_states[-control.rows:] = fixed
        return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)


def injection_layers(unet: nn.Module) -> list[str]:
    """The layers motion injection reads the fixed prompt in: spatial cross-attention of the down and mid blocks.

    The official code builds these with `injection=True` (input and middle blocks); the up blocks keep the
    per-frame prompts.
    """
    return [name for name in attention_layers(unet, "cross") if name.split(".")[0] in ("down_blocks", "mid_block")]
