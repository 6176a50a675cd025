"""FreeNoise window fusion inside the motion modules of a diffusers `UNetMotionModel` (AnimateDiff).

In every temporal transformer block the temporal self-attentions run on each window of
`plan_windows(F, W, S)`, each window with its own positions 0…W−1, and the window outputs are fused with
the core's `WindowAccumulator` (per-frame weights normalised to sum to exactly 1, the tail window included;
the tail window contributes all its frames or only the frames no other window covers, `fused_spans`):

* "block" fusion (the AnimateDiff port of FreeNoise, diffusers' `FreeNoiseTransformerBlock`): both attentions
  with their residuals run per window, the windows' residual streams are fused, and the feed-forward runs
  once on the fused sequence; by default the tail window writes only its new frames, as in diffusers;
* "attention" fusion (the official VideoCrafter code): each attention's output is fused over the windows,
  then added to the full residual stream, so the second attention sees the fused first one; by default the
  tail window is fused over all its frames.

With the stock attention processors, "attention" fusion computes each frame's layer norm and query, key,
value and output projections once instead of once per window (`_shared_projection_attention`): only the
positional term differs between a frame's windows, and the projections are affine. The windows then attend as
one batch in chunks of pixel rows, each gathered tensor within `attention_budget` bytes on every device. Any other processor,
mask or attention option runs the per-window loop (`_windowed_attention`), the reference form.

Clone-then-patch: the blocks' own `forward`s are shadowed for one call and put back afterwards; the
weights, processors and module tree are never touched, so `end` leaves the model exactly as it was.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Optional

import torch
from torch import nn

from ..hooks import HookConflictError
from ..video import TAILS, WindowAccumulator, fused_spans, fusion_weights
from ..video.windows import span_weights
from .install import attention_layers
from .wrapping import WrappingProcessor

__all__ = [
    "InjectionControl",
    "MotionInjectionProcessor",
    "INJECTION_BLOCKS",
    "DEFAULT_ATTENTION_BUDGET",
    "FUSIONS",
    "budget_rows",
    "default_tail",
    "record_window_tensors",
    "window_tensor_bytes",
    "injection_layers",
    "motion_blocks",
    "motion_max_length",
    "watch_guidance",
    "windowed_block_forward",
    "windowed_motion_blocks",
]

#: Marks a block whose `forward` is shadowed by a FreeNoise fusion, so that two fusions never stack.
_MARK = "_guidekit_freenoise"

#: Where the window outputs are fused: per temporal transformer block (AnimateDiff port, diffusers) or per
#: temporal-attention output (VideoCrafter, the paper's code).
FUSIONS = ("block", "attention")


#: The default `attention_budget` (bytes): the most any one gathered query, key, value or score tensor of the
#: shared-projection attention fusion may take (a fixed size, so that peak memory does not grow with the number
#: of windows; 64 MiB is about one window's query at SD 1.5's largest temporal layer, 512 px, fp16, with guidance).
DEFAULT_ATTENTION_BUDGET = 64 * 2**20

#: Tensors the CPU keeps in cache while it gathers, attends and fuses a chunk of windows (elements per tensor).
_CPU_CACHE_ELEMENTS = 1 << 18


def window_tensor_bytes(rows: int, num_windows: int, window: int, inner: int, heads: int, itemsize: int) -> int:
    """Bytes of the largest tensor the windows' batched attention holds for `rows` pixel rows: the gathered query
    (key and value are the same size), rows·n·W·inner, or the attention scores, rows·n·heads·W·W, whichever is
    larger (a fused kernel may never hold the scores; counting them keeps the bound kernel-independent).

    Args:
        rows (`int`): the pixel rows attended together (batch × height × width, or a chunk of them).
        num_windows (`int`): n, the windows of the plan.
        window (`int`): W, the frames of one window.
        inner (`int`): the attention's inner width (heads × head dim).
        heads (`int`): the attention heads.
        itemsize (`int`): bytes per element.
    """
    return rows * num_windows * window * max(inner, heads * window) * itemsize


def budget_rows(rows: int, row_bytes: int, budget: Optional[int]) -> int:
    """The pixel rows per chunk that keep every gathered tensor within `budget` bytes (at least one row; all
    rows for `budget=None`), `row_bytes` being one row's `window_tensor_bytes`."""
    if budget is None:
        return rows
    return max(1, min(rows, budget // max(1, row_bytes)))


class _WindowTensorRecord:
    """The largest gathered tensor of the windowed temporal attentions while `record_window_tensors` is open."""

    def __init__(self):
        self.largest = 0  # bytes, with the call's `attention_budget`
        self.unbounded = 0  # bytes, had all rows been attended in one batch
        self.full_query = 0  # bytes of the largest full-length (all F frames) query, for comparison

    def add(self, largest: int, unbounded: int, full_query: int) -> None:
        self.largest = max(self.largest, largest)
        self.unbounded = max(self.unbounded, unbounded)
        self.full_query = max(self.full_query, full_query)


_records: list[_WindowTensorRecord] = []


@contextmanager
def record_window_tensors() -> Iterator[_WindowTensorRecord]:
    """Inside a `with` block, record the bytes of the largest tensor any windowed temporal attention gathers.

    The count is device-independent: it is the size the `attention_budget` chunking gives on every device (on the
    CPU the chunks are smaller still, to stay in cache), `window_tensor_bytes` of the rows attended together. A
    per-window attention (block fusion, or a processor other than diffusers' stock ones) counts one window.

    Yields:
        A record with `largest` (bytes), `unbounded` (bytes with all rows in one batch) and `full_query` (bytes of
        the largest query over all F frames, what the stock temporal attention holds).
    """
    record = _WindowTensorRecord()
    _records.append(record)
    try:
        yield record
    finally:
        _records.remove(record)


def _record(largest: int, unbounded: int, full_query: int) -> None:
    for record in _records:
        record.add(largest, unbounded, full_query)


def default_tail(fusion: str) -> str:
    """The tail window's default fusion for `fusion`: "new" for "block", "full" for "attention".

    Block fusion is diffusers' `FreeNoiseTransformerBlock` fusion, whose tail window writes only the frames no
    other window covers; "new" keeps that design (with the weights normalised exactly), so block fusion equals
    diffusers wherever diffusers is correct. The official VideoCrafter code, which attention fusion follows,
    has no tail window; there the tail is fused like every other window ("full"), so that the last frames blend
    into the video as smoothly as the others.
    """
    return "new" if fusion == "block" else "full"


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
    if _records and hidden_states.dim() == 3:
        rows, frames = hidden_states.shape[:2]
        size = window_tensor_bytes(rows, 1, frames, attn.inner_dim, attn.heads, hidden_states.element_size())
        _record(size, size, rows * frames * attn.inner_dim * hidden_states.element_size())
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


def _accumulate(fused: WindowAccumulator, window: tuple[int, int], span: tuple[int, int], output: torch.Tensor,
                weighting) -> None:
    """Add the frames `span` of one window's output (frames on axis 1) to the fusion, with their weights."""
    if span == window:
        fused.accumulate(window, output, weighting)
    else:
        offset = span[0] - window[0]
        fused.accumulate(span, output[:, offset:], span_weights(window, span, weighting))


def _windowed_attention(attn: nn.Module, norm: nn.Module, pos_embed: Optional[nn.Module], hidden_states: torch.Tensor,
                        plan, weighting, encoder_hidden_states, attention_mask, cross_attention_kwargs: dict,
                        spans=None):
    """One attention run per window, the window outputs fused per frame (VideoCrafter's FreeNoise attention).

    VideoCrafter fuses before `to_out`; `to_out` is affine, and the fusion weights of a frame sum to 1, so
    fusing after it is the same map. This loop is the reference form of the fusion: it runs any processor.
    `spans` (one per window, from `fused_spans`) are the frames each window contributes; None: all of them.
    """
    fused = WindowAccumulator(hidden_states.size(1), frame_dim=1)
    for index, (start, stop) in enumerate(plan):
        output = _self_attention(
            attn, norm, pos_embed, hidden_states[:, start:stop], encoder_hidden_states, attention_mask,
            cross_attention_kwargs,
        )
        _accumulate(fused, (start, stop), (start, stop) if spans is None else spans[index], output, weighting)
    return fused.normalise()


def _stock_processors() -> tuple[type, ...]:
    """diffusers' plain attention processors, whose whole computation `_shared_projection_attention` mirrors."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    return AttnProcessor, AttnProcessor2_0


def _is_plain_self_attention(attn: nn.Module) -> bool:
    """Whether `attn` is a stock-processor self-attention: to_q/to_k/to_v → attention → to_out, nothing else."""
    if type(getattr(attn, "processor", None)) not in _stock_processors():
        return False
    # the processors apply these when set; the shared form does not
    for name in ("norm_q", "norm_k", "group_norm", "spatial_norm", "norm_cross"):
        if getattr(attn, name, None) is not None:
            return False
    if attn.is_cross_attention or attn.residual_connection or attn.rescale_output_factor != 1:
        return False
    # affine layers only: a projection must split into the frame's part plus the positional part
    to_out = attn.to_out
    if any(type(layer) is not nn.Linear for layer in (attn.to_q, attn.to_k, attn.to_v)):
        return False
    if len(to_out) != 2 or type(to_out[0]) is not nn.Linear or type(to_out[1]) is not nn.Dropout:
        return False
    return not (to_out[1].training and to_out[1].p > 0)  # dropout once per frame differs from once per window


def _shares_projections(attn: nn.Module, norm: nn.Module, pos_embed: Optional[nn.Module], hidden_states: torch.Tensor,
                        plan, encoder_hidden_states, attention_mask, cross_attention_kwargs: dict) -> bool:
    """Whether `_shared_projection_attention` is exactly the map of `_windowed_attention` for this call."""
    from diffusers.models.embeddings import SinusoidalPositionalEmbedding

    if hidden_states.ndim != 3 or encoder_hidden_states is not None or attention_mask is not None:
        return False
    if cross_attention_kwargs or type(norm) is not nn.LayerNorm or not _is_plain_self_attention(attn):
        return False
    lengths = {stop - start for start, stop in plan}
    if len(lengths) != 1:
        return False
    dtypes = {hidden_states.dtype, attn.to_q.weight.dtype, attn.to_k.weight.dtype, attn.to_v.weight.dtype}
    if pos_embed is not None:
        # the positions 0…W−1 must exist, and be added in the stream's dtype, as the module's `x + pe` does
        if type(pos_embed) is not SinusoidalPositionalEmbedding or pos_embed.pe.size(1) < lengths.pop():
            return False
        dtypes.add(pos_embed.pe.dtype)
    return len(dtypes) == 1


def _window_frames(plan, device: torch.device) -> torch.Tensor:
    """The frame indices of every window of the plan, (n_windows, W): the windows' slices as one gather."""
    starts = torch.tensor([start for start, _ in plan], device=device)
    length = plan[0][1] - plan[0][0]
    return starts[:, None] + torch.arange(length, device=device)


def _window_frame_weights(plan, num_frames: int, weighting, frames: torch.Tensor, like: torch.Tensor,
                          spans=None) -> torch.Tensor:
    """The fusion weight of every window frame, (n_windows·W, 1), in `like`'s dtype and device.

    They are `fusion_weights`' (each frame's weights normalised to sum to 1, as `WindowAccumulator` normalises
    them, the tail window included), read at each window's frames: 0 at the frames a window does not
    contribute (outside its span).
    """
    normalised = fusion_weights(plan, num_frames, weighting, spans)
    return normalised.gather(1, frames.cpu()).reshape(-1, 1).to(dtype=like.dtype, device=like.device)


def _row_chunks(rows: int, row_bytes: int, row_elements: int, budget: Optional[int], device: torch.device) -> list[slice]:
    """Row slices for the windowed tensors: on every device at most `budget` bytes per gathered tensor
    (`budget_rows`); on the CPU also at most about 2^18 elements, so that the gathered windows, their attention
    and their fusion stay in cache."""
    chunk = budget_rows(rows, row_bytes, budget)
    if device.type == "cpu":
        chunk = min(chunk, max(1, _CPU_CACHE_ELEMENTS // max(1, row_elements)))
    return [slice(start, min(start + chunk, rows)) for start in range(0, rows, chunk)]


def _windowed_projection(projected: torch.Tensor, positions: Optional[torch.Tensor], frames: torch.Tensor,
                         heads: int) -> torch.Tensor:
    """`linear(norm(x)[window] + pe[:W])` of every window, as (rows·n_windows, heads, W, head_dim).

    `projected` is `linear(norm(x))`, computed once per frame and gathered into the windows here;
    `positions` is `pe[:W]` through the weight only (the bias is in the frame's part already), the same for
    every window since positions restart at 0.
    """
    windows = projected[:, frames]  # (rows, n_windows, W, inner)
    if positions is not None:
        windows = windows + positions
    rows, inner = projected.size(0), projected.size(-1)
    return windows.reshape(rows * frames.size(0), frames.size(1), heads, inner // heads).transpose(1, 2)


def _window_attention(attn: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """The processor's scaled dot-product attention on all windows at once, (rows·n_windows, W, inner)."""
    # AttnProcessor2_0 leaves out attn.scale (SDPA's default 1/√head_dim); AttnProcessor scales by attn.scale
    from diffusers.models.attention_processor import AttnProcessor

    scale = attn.scale if type(attn.processor) is AttnProcessor else None
    output = torch.nn.functional.scaled_dot_product_attention(query, key, value, dropout_p=0.0, scale=scale)
    return output.transpose(1, 2).flatten(2).to(query.dtype)


def _fuse_window_outputs(fused: torch.Tensor, outputs: torch.Tensor, frames: torch.Tensor,
                         weights: torch.Tensor) -> None:
    """FreeNoise's per-frame fusion of the window outputs (before `to_out`): add each window frame's output,
    times its normalised weight, into its frame of `fused` (rows, F, inner), in place."""
    rows = fused.size(0)
    outputs = outputs.reshape(rows, frames.numel(), outputs.size(-1))
    fused.index_add_(1, frames.flatten(), outputs * weights)


def _shared_projection_attention(attn: nn.Module, norm: nn.Module, pos_embed: Optional[nn.Module],
                                 hidden_states: torch.Tensor, plan, weighting, spans=None,
                                 budget: Optional[int] = DEFAULT_ATTENTION_BUDGET) -> torch.Tensor:
    """`_windowed_attention` with every per-frame layer computed once per frame instead of once per window.

    Norm and projections are per frame, and a window's positions are the same 0…W−1 wherever it starts, so
    `to_q(norm(x)[window] + pe) = to_q(norm(x))[window] + to_q.weight·pe`; the windows' attentions run as one
    batch per chunk of pixel rows, each gathered query, key, value and score tensor within `budget` bytes
    (None: all rows at once, n/F times a full-length query); the window outputs are fused per frame before
    `to_out` (VideoCrafter's fusion point), which then runs once per frame: it is affine and each frame's
    weights sum to 1.
    """
    normed = norm(hidden_states)
    frames = _window_frames(plan, hidden_states.device)
    positions = pos_embed.pe[0, : frames.size(1)] if pos_embed is not None else None
    projections = [
        (linear(normed), positions @ linear.weight.t() if positions is not None else None)
        for linear in (attn.to_q, attn.to_k, attn.to_v)
    ]
    weights = _window_frame_weights(plan, hidden_states.size(1), weighting, frames, normed, spans)
    inner = projections[0][0].size(-1)
    num_rows, num_frames = hidden_states.shape[:2]
    itemsize = projections[0][0].element_size()
    row_bytes = window_tensor_bytes(1, frames.size(0), frames.size(1), inner, attn.heads, itemsize)
    if _records:
        _record(budget_rows(num_rows, row_bytes, budget) * row_bytes, num_rows * row_bytes,
                num_rows * num_frames * inner * itemsize)
    fused = normed.new_zeros(num_rows, num_frames, attn.to_v.weight.size(0))
    for rows in _row_chunks(num_rows, row_bytes, frames.numel() * inner, budget, hidden_states.device):
        query, key, value = (
            _windowed_projection(projected[rows], term, frames, attn.heads) for projected, term in projections
        )
        _fuse_window_outputs(fused[rows], _window_attention(attn, query, key, value), frames, weights)
    return attn.to_out[1](attn.to_out[0](fused))


def _fused_attention(attn: nn.Module, norm: nn.Module, pos_embed: Optional[nn.Module], hidden_states: torch.Tensor,
                     plan, weighting, encoder_hidden_states, attention_mask, cross_attention_kwargs: dict, spans,
                     budget: Optional[int]):
    """One attention fused over the windows (VideoCrafter's FreeNoise attention): the shared-projection form
    where it is provably the same map as the module, else the per-window loop."""
    if _shares_projections(attn, norm, pos_embed, hidden_states, plan, encoder_hidden_states, attention_mask,
                           cross_attention_kwargs):
        return _shared_projection_attention(attn, norm, pos_embed, hidden_states, plan, weighting, spans, budget)
    return _windowed_attention(attn, norm, pos_embed, hidden_states, plan, weighting, encoder_hidden_states,
                               attention_mask, cross_attention_kwargs, spans)


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
    tail: Optional[str] = None,
    attention_budget: Optional[int] = DEFAULT_ATTENTION_BUDGET,
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
        tail (`str`, *optional*): how the tail window [F − W, F) is fused (`guidekit.video.fused_spans`): "new"
            (only the frames no other window covers, diffusers' `FreeNoiseTransformerBlock`) or "full" (all its W
            frames). None: `default_tail(fusion)`, "new" for block fusion and "full" for attention fusion.
        attention_budget (`int`, *optional*, defaults to `DEFAULT_ATTENTION_BUDGET`): attention fusion with
            diffusers' stock processors attends all windows as one batch, in chunks of pixel rows; each gathered
            query, key, value or score tensor stays within this many bytes (at least one row). None: all rows
            in one batch. The result is the same up to float rounding.
    """
    if fusion not in FUSIONS:
        raise ValueError(f"fusion: {fusion!r} is not accepted; accepted: 'block', 'attention'")
    cross_attention_kwargs = dict(cross_attention_kwargs or {})
    num_frames = hidden_states.size(1)
    spans = fused_spans(num_frames, context_length, context_stride, default_tail(fusion) if tail is None else tail)
    plan = [window for window, _ in spans]
    if fusion == "block":
        fused = WindowAccumulator(num_frames, frame_dim=1)
        for window, span in spans:
            start, stop = window
            output = _attend(
                block, hidden_states[:, start:stop], attention_mask, encoder_hidden_states, encoder_attention_mask,
                cross_attention_kwargs,
            )
            _accumulate(fused, window, span, output, weighting)
        hidden_states = fused.normalise()
    else:
        spans = [span for _, span in spans]
        attn_output = _fused_attention(
            block.attn1, block.norm1, block.pos_embed, hidden_states, plan, weighting,
            encoder_hidden_states if block.only_cross_attention else None, attention_mask, cross_attention_kwargs,
            spans, attention_budget,
        )
        hidden_states = attn_output + hidden_states
        if hidden_states.ndim == 4:
            hidden_states = hidden_states.squeeze(1)
        if block.attn2 is not None:
            attn_output = _fused_attention(
                block.attn2, block.norm2, block.pos_embed, hidden_states, plan, weighting, encoder_hidden_states,
                encoder_attention_mask, cross_attention_kwargs, spans, attention_budget,
            )
            hidden_states = attn_output + hidden_states

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


def _patched_forward(block: nn.Module, original, context_length: int, context_stride: int, weighting, fusion: str,
                     tail: Optional[str], attention_budget: Optional[int]):
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
            encoder_hidden_states, encoder_attention_mask, cross_attention_kwargs, fusion, tail, attention_budget,
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
    tail: Optional[str] = None,
    attention_budget: Optional[int] = DEFAULT_ATTENTION_BUDGET,
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
        tail (`str`, *optional*): "new" or "full" (see `windowed_block_forward`); None: `default_tail(fusion)`.
        attention_budget (`int`, *optional*): see `windowed_block_forward`.

    Raises:
        ValueError: the UNet has no temporal blocks, or a block is not a layer-norm `BasicTransformerBlock`
            (e.g. diffusers' own `FreeNoiseTransformerBlock` after `pipe.enable_free_noise()`).
        HookConflictError: the blocks already run another FreeNoise fusion.
    """
    if fusion not in FUSIONS:
        raise ValueError(f"fusion: {fusion!r} is not accepted; accepted: 'block', 'attention'")
    if tail is not None and tail not in TAILS:
        raise ValueError(f"tail: {tail!r} is not accepted; accepted: None, {', '.join(repr(t) for t in TAILS)}")
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
            block.forward = _patched_forward(
                block, original, context_length, context_stride, weighting, fusion, tail, attention_budget
            )
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
        videos (`int`): B, the conditional videos of one UNet call.
        guided (`bool`): whether the running UNet call holds the unconditional pass too (set by `watch_guidance`).
        skipped (`list[int]`): the injection steps that ran without the unconditional pass, so without injection.
    """

    def __init__(self, fixed: torch.Tensor, rows: int):
        self.fixed = fixed
        self.rows = rows
        self.active = False
        self.videos = 0
        self.guided = True
        self.skipped: list[int] = []


@contextmanager
def watch_guidance(unet: nn.Module, control: InjectionControl, step_index) -> Iterator[None]:
    """Inside a `with` block, set `control.guided` before each UNet call: whether its batch holds more than the
    conditional videos, i.e. the unconditional pass of classifier-free guidance.

    The official code injects only in the guided branch of its sampler (both passes, injection in the
    conditional one); a step run without the unconditional pass is not injected. `step_index()` names the
    running step for `control.skipped`.
    """

    def before_call(module, args, kwargs):
        sample = args[0] if args else kwargs.get("sample")
        control.guided = sample is None or sample.shape[0] > control.videos
        if control.active and not control.guided:
            control.skipped.append(step_index())

    handle = unet.register_forward_pre_hook(before_call, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


class MotionInjectionProcessor(WrappingProcessor):
    """Cross-attention processor of FreeNoise's motion injection (official `use_injection`).

    While `control.active` (and the UNet call holds the unconditional pass), the conditional rows of `encoder_hidden_states` are replaced by the fixed prompt's
    embedding before the layer's own processor runs; the unconditional rows are never changed. With an
    IP-Adapter (`encoder_hidden_states` = (text, image embeddings)) only the text part is replaced.

    Args:
        original: the layer's processor, which does the attention.
        control (`InjectionControl`): the call's switch and fixed embedding.
    """

    def __init__(self, original, control: InjectionControl):
        super().__init__(original)
        self.control = control

    def _call(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        control = self.control
        if control.active and control.guided and encoder_hidden_states is not None:
            if isinstance(encoder_hidden_states, (tuple, list)):
                # an IP-Adapter's layers get (text tokens, [image tokens per adapter]): only the text is the
                # prompt, so the fixed prompt replaces it and the image tokens stay (as the official code
                # splits its context into the text and the image part)
                text, *rest = encoder_hidden_states
                encoder_hidden_states = type(encoder_hidden_states)([_inject(text, control), *rest])
            else:
                encoder_hidden_states = _inject(encoder_hidden_states, control)
        return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)


def _inject(text: torch.Tensor, control: InjectionControl) -> torch.Tensor:
    """`text` (rows, tokens, dim) with its last `control.rows` rows (the conditional pass) set to the fixed prompt."""
    text = text.clone()
    text[-control.rows:] = control.fixed.to(dtype=text.dtype, device=text.device)
    return text


#: The UNet parts motion injection can act in, by the names `FreeNoise(injection_blocks=...)` accepts.
INJECTION_BLOCKS = {"down": "down_blocks", "mid": "mid_block", "up": "up_blocks"}


def injection_layers(unet: nn.Module, blocks=("down", "mid")) -> list[str]:
    """The layers motion injection reads the fixed prompt in: the spatial cross-attention of `blocks`.

    The official code builds the input (down) and middle blocks' layers with `injection=True`, so `("down",
    "mid")` is the default; the up blocks keep the per-frame prompts.

    Args:
        unet (`nn.Module`): a diffusers (motion) UNet.
        blocks (sequence of `str`, defaults to `("down", "mid")`): any of "down", "mid", "up".
    """
    prefixes = {INJECTION_BLOCKS[block] for block in blocks}
    return [name for name in attention_layers(unet, "cross") if name.split(".")[0] in prefixes]
