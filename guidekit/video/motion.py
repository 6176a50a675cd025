"""Per-call patches of a diffusers `UNetMotionModel` (AnimateDiff) for long FreeNoise videos.

* `window_group_norm`, `windowed_group_norms`: the motion modules' GroupNorm with statistics taken per
  FreeNoise window instead of over all F frames;
* `chunked_layers`: the UNet's per-frame spatial layers (resnets, spatial transformers, samplers) run over the
  batch×frames axis in chunks, and the temporal transformer blocks over the batch×pixels axis in chunks, so
  that the large intermediate tensors no longer grow with F.

Like `guidekit.attention.freenoise`, the modules' own `forward`s are shadowed by instance attributes for the
duration of a `with` block and put back afterwards; weights and the module tree are never touched.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Any, Callable, ContextManager, Iterable, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ._args import check_int, check_tensor
from .windows import Weighting, WindowAccumulator, plan_windows

__all__ = [
    "NORM_SCOPES",
    "chunked_layers",
    "motion_modules",
    "spatial_layers",
    "window_group_norm",
    "windowed_group_norms",
]

#: Where the motion modules' GroupNorm takes its statistics: "all" frames (diffusers) or each "window".
NORM_SCOPES = ("all", "window")

#: The per-frame spatial layers of the UNet's down, mid and up blocks.
_SPATIAL = ("resnets", "attentions", "downsamplers", "upsamplers")


def motion_modules(unet: nn.Module) -> list[tuple[str, nn.Module]]:
    """The temporal modules of a motion UNet (diffusers' `AnimateDiffTransformer3D`): (name, module) for every
    `*.motion_modules.<i>` that has a GroupNorm `norm`.

    Args:
        unet (`nn.Module`): a diffusers `UNetMotionModel`.
    """
    return [
        (name, module)
        for name, module in unet.named_modules()
        if name.split(".")[-2:-1] == ["motion_modules"] and isinstance(getattr(module, "norm", None), nn.GroupNorm)
    ]


def spatial_layers(unet: nn.Module) -> list[tuple[str, nn.Module]]:
    """The per-frame spatial layers of a motion UNet: every resnet, spatial transformer and down/up sampler of
    its down, mid and up blocks (they see frames as independent images, batch×frames on axis 0).

    Args:
        unet (`nn.Module`): a diffusers `UNetMotionModel`.
    """
    layers = []
    for name, module in unet.named_modules():
        parts = name.split(".")
        if parts[0] in ("down_blocks", "mid_block", "up_blocks") and parts[-2:-1] and parts[-2] in _SPATIAL:
            if parts[-1].isdigit():
                layers.append((name, module))
    return layers


def _temporal_blocks(unet: nn.Module) -> list[tuple[str, nn.Module]]:
    """The transformer blocks of every motion module: they act on each batch×pixel row (frames on axis 1)."""
    return [
        (f"{name}.transformer_blocks.{i}", block)
        for name, module in motion_modules(unet)
        for i, block in enumerate(getattr(module, "transformer_blocks", ()))
    ]


# ----------------------------------------------------------------------------- per-window GroupNorm


def window_group_norm(
    norm: nn.GroupNorm, hidden_states: torch.Tensor, plan: Sequence[tuple[int, int]], weighting: Weighting = "pyramid"
) -> torch.Tensor:
    """A GroupNorm over video features whose statistics are taken per window, the window results fused per frame.

    diffusers' `AnimateDiffTransformer3D` normalises (B, C, F, H, W) with one mean and variance per sample and
    group over all F frames, so every frame's features depend on the whole video. Here each window [s, e) of
    `plan` is normalised on its own (statistics over its frames only, then the affine map), and the frames
    covered by several windows take the weighted mean of their windows' results (weights normalised per
    frame, as FreeNoise fuses attention outputs). One window covering all frames is the plain GroupNorm.

    Args:
        norm (`nn.GroupNorm`): the GroupNorm whose groups, eps and affine parameters are used.
        hidden_states (`torch.Tensor`): (B, C, F, H, W) features.
        plan (`list[tuple[int, int]]`): the windows, e.g. `plan_windows(F, W, S)`; they must cover every frame.
        weighting (`str`, callable or sequence, defaults to `"pyramid"`): per-frame window weights, as
            `guidekit.video.window_weights` accepts them.

    Returns:
        A tensor of the shape and dtype of `hidden_states`.
    """
    check_tensor("hidden_states", hidden_states, 5, "(B, C, F, H, W)")
    fused = WindowAccumulator(hidden_states.size(2), frame_dim=2)
    for start, stop in plan:
        # the functional form: `norm` itself may be the patched module, which would recurse
        window = F.group_norm(hidden_states[:, :, start:stop], norm.num_groups, norm.weight, norm.bias, norm.eps)
        fused.accumulate((start, stop), window, weighting)
    return fused.normalise()


@contextmanager
def _shadowed(modules: Iterable[nn.Module], make_forward: Callable[[nn.Module, Callable], Callable]) -> Iterator[None]:
    """Give each module the forward `make_forward(module, its current forward)` inside a `with` block.

    On exit (also when the body raises) every module gets back exactly what it had: an instance `forward`
    of the user's own is restored, otherwise the class's `forward` shows through again.
    """
    patched: list[tuple[nn.Module, Any]] = []
    try:
        for module in modules:
            previous = module.__dict__.get("forward")
            forward = make_forward(module, module.forward)
            patched.append((module, previous))
            module.forward = forward
        yield
    finally:
        for module, previous in reversed(patched):
            if previous is None:
                del module.__dict__["forward"]
            else:
                module.forward = previous


@contextmanager
def windowed_group_norms(
    unet: nn.Module, context_length: int, context_stride: int, weighting: Weighting = "pyramid"
) -> Iterator[list[str]]:
    """Inside a `with` block, every motion module's GroupNorm takes its statistics per FreeNoise window.

    For F > W frames the norm is `window_group_norm` over `plan_windows(F, W, S)`; for F <= W it is the
    module's own GroupNorm (one window covers every frame). Yields the names of the patched motion modules.

    Args:
        unet (`nn.Module`): a diffusers `UNetMotionModel`.
        context_length (`int`): W, the frames of one window.
        context_stride (`int`): S, the frames between two window starts.
        weighting (`str`, callable or sequence, defaults to `"pyramid"`): the windows' per-frame weights.
    """
    modules = motion_modules(unet)
    if not modules:
        raise ValueError(
            f"unet: {type(unet).__name__} has no motion modules with a GroupNorm; accepted: a diffusers "
            "UNetMotionModel, e.g. the UNet of an AnimateDiffPipeline"
        )
    plan_windows(context_length + 1, context_length, context_stride)  # checks W and S before anything changes

    def make_forward(norm: nn.Module, original: Callable) -> Callable:
        def forward(hidden_states: torch.Tensor) -> torch.Tensor:
            if hidden_states.dim() != 5 or hidden_states.size(2) <= context_length:
                return original(hidden_states)
            plan = plan_windows(hidden_states.size(2), context_length, context_stride)
            return window_group_norm(norm, hidden_states, plan, weighting)

        return forward

    with _shadowed([module.norm for _, module in modules], make_forward):
        yield [name for name, _ in modules]


# ----------------------------------------------------------------------------- chunked layers


def _rows(args: tuple, kwargs: dict) -> Optional[int]:
    """The length of axis 0 of the layer's main input: its first tensor argument, positional or keyword."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value.size(0) if value.dim() > 0 else None
    return None


def _split(value: Any, rows: int, start: int, stop: int) -> Any:
    """Rows [start, stop) of every tensor (also inside tuples and lists) whose axis 0 has `rows` entries.

    Per-row inputs (temb, encoder_hidden_states, IP-Adapter image embeddings, masks) are repeated per frame
    by the UNet, so they share the main input's axis 0; anything else is passed whole.
    """
    if isinstance(value, torch.Tensor):
        return value[start:stop] if value.dim() > 0 and value.size(0) == rows else value
    if isinstance(value, (tuple, list)):
        return type(value)(_split(v, rows, start, stop) for v in value)
    return value


def _join(outputs: list) -> Any:
    """Concatenate the chunks' outputs on axis 0: tensors, tuples of them, or diffusers output dataclasses."""
    first = outputs[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(outputs)
    if isinstance(first, tuple):
        return tuple(_join(list(parts)) for parts in zip(*outputs))
    if isinstance(first, dict):  # diffusers' BaseOutput is an OrderedDict dataclass
        return type(first)(**{key: _join([out[key] for out in outputs]) for key in first})
    return first  # None and other constants are the same for every chunk


ChunkContext = Callable[[int, int, int], ContextManager]


def _chunked(chunk: int, around: Optional[ChunkContext] = None) -> Callable[[nn.Module, Callable], Callable]:
    """A `make_forward` that runs the module over axis 0 in chunks of `chunk` rows, each chunk inside
    `around(start, stop, rows)` when given."""

    def make_forward(module: nn.Module, original: Callable) -> Callable:
        def forward(*args, **kwargs):
            rows = _rows(args, kwargs)
            if rows is None or rows <= chunk:
                return original(*args, **kwargs)
            outputs = []
            for start in range(0, rows, chunk):
                stop = min(start + chunk, rows)
                with around(start, stop, rows) if around is not None else nullcontext():
                    outputs.append(
                        original(
                            *_split(args, rows, start, stop),
                            **{key: _split(value, rows, start, stop) for key, value in kwargs.items()},
                        )
                    )
            return _join(outputs)

        return forward

    return make_forward


@contextmanager
def chunked_layers(
    unet: nn.Module,
    spatial_chunk: Optional[int] = None,
    temporal_chunk: Optional[int] = None,
    spatial_chunk_context: Optional[ChunkContext] = None,
) -> Iterator[None]:
    """Inside a `with` block, run the UNet's row-independent layers in chunks along their batch axis.

    Both splits are exact: the layers treat the rows of axis 0 independently, so the result is the unsplit
    one up to float rounding, while the large intermediates (spatial attention scores, resnet activations,
    the temporal feed-forward) are held for one chunk at a time instead of for all F frames.

    Args:
        unet (`nn.Module`): a diffusers `UNetMotionModel`.
        spatial_chunk (`int`, *optional*): rows of the batch×frames axis per chunk for every resnet, spatial
            transformer and down/up sampler (`spatial_layers`); each frame is an independent image there.
            None: unsplit.
        temporal_chunk (`int`, *optional*): rows of the batch×height×width axis per chunk for every temporal
            transformer block (each row is one pixel's sequence of frames). None: unsplit.
        spatial_chunk_context (callable, *optional*): `(start, stop, rows) -> context manager` entered around
            each spatial chunk [start, stop) of `rows` rows, for attention processors that address rows of the
            whole batch (e.g. motion injection's conditional rows, the last ones of the batch).
    """
    if spatial_chunk is not None:
        check_int("spatial_chunk", spatial_chunk, 1)
    if temporal_chunk is not None:
        check_int("temporal_chunk", temporal_chunk, 1)
    spatial = [module for _, module in spatial_layers(unet)] if spatial_chunk is not None else []
    temporal = [block for _, block in _temporal_blocks(unet)] if temporal_chunk is not None else []
    spatial_forward = _chunked(spatial_chunk or 1, spatial_chunk_context)
    with _shadowed(spatial, spatial_forward), _shadowed(temporal, _chunked(temporal_chunk or 1)):
        yield
