"""FreeNoise's window plan and window fusion: the math core (torch only).

FreeNoise (Qiu et al., "FreeNoise: Tuning-Free Longer Video Diffusion via Noise Rescheduling", ICLR 2024,
arXiv 2310.15169) runs the temporal attention of a video model trained on W frames over windows of W frames
that start every S frames, and fuses the overlapping window outputs into the full sequence with per-frame
weights (the paper's Eq. 9; official code: `get_views` in scripts/evaluation/funcs.py and the fusion in
lvdm/modules/attention_freenoise.py of AILab-CVC/FreeNoise). See METHODS.md §3.2 and FREENOISE.md §3.2.

One plan (`plan_windows`) drives both the fusion here and the noise rescheduling (`guidekit.video.noise`).
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Optional, Sequence, Union

import torch

from ._args import check_context, check_int, check_tensor

__all__ = [
    "TAILS",
    "WEIGHTINGS",
    "WindowAccumulator",
    "fuse_windows",
    "fused_spans",
    "fusion_weights",
    "plan_windows",
    "span_weights",
    "window_weights",
]

#: Named per-frame weightings of one window. The first three are diffusers' `_get_frame_weights` names;
#: "gaussian" is guidekit's own. A callable `length -> weights` is accepted wherever a name is.
WEIGHTINGS = ("pyramid", "flat", "delayed_reverse_sawtooth", "gaussian")

Weighting = Union[str, Callable[[int], Sequence[float]], Sequence[float], torch.Tensor]

#: How the tail window [F − W, F) (added when (F − W) mod S != 0) enters the fusion: "new" fuses only the frames
#: no earlier window covers (diffusers' `FreeNoiseTransformerBlock`), "full" all its W frames, like any window.
TAILS = ("new", "full")


def plan_windows(
    num_frames: int, context_length: int = 16, context_stride: int = 4, max_length: Optional[int] = None
) -> list[tuple[int, int]]:
    """FreeNoise's temporal windows ("views") [start, stop) over `num_frames` frames.

    Windows start at 0, S, 2S, … while start + W <= F (the official `get_views`). When F − W is not a
    multiple of S the official plan leaves the last frames uncovered; like diffusers' `_get_frame_indices`,
    one exact tail window [F − W, F) is added. F <= W gives the single window [0, F) (no windowing), where
    diffusers' plan is empty and its pipeline fails with an IndexError.

    Examples: F=20, W=16, S=4 → [(0, 16), (4, 20)]; F=22 → [(0, 16), (4, 20), (6, 22)].

    Args:
        num_frames (`int`): F, the number of frames, >= 1.
        context_length (`int`, defaults to `16`): W, the frames per window (the motion model's training length).
        context_stride (`int`, defaults to `4`): S, the frames between two window starts, 1 <= S <= W.
        max_length (`int`, *optional*): the motion model's positional limit; W above it is refused.

    Returns:
        A list of (start, stop) pairs, stop − start = min(W, F), ordered by start; together they cover every frame.
    """
    num_frames = check_int("num_frames", num_frames, 1)
    window, stride = check_context(context_length, context_stride, max_length)
    if num_frames <= window:
        return [(0, num_frames)]
    plan = [(start, start + window) for start in range(0, num_frames - window + 1, stride)]
    if plan[-1][1] != num_frames:
        plan.append((num_frames - window, num_frames))
    return plan


def fused_spans(
    num_frames: int, context_length: int = 16, context_stride: int = 4, tail: str = "full",
    max_length: Optional[int] = None,
) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """The windows of `plan_windows(F, W, S)`, each with the frames [first, stop) it contributes to the fusion.

    Every window runs on all its frames; with `tail="full"` each one also contributes all of them. With
    `tail="new"` the tail window [F − W, F) contributes only the frames after the last regular window, i.e. the
    frames no other window covers (diffusers' design), so each of them is exactly the tail window's output,
    whatever the weights (diffusers' weight sum scales them when there are two or more and the weights are not
    flat). Without a tail window the two are the same.

    Examples: F=22, W=16, S=4, "new" → [((0, 16), (0, 16)), ((4, 20), (4, 20)), ((6, 22), (20, 22))].

    Args:
        num_frames (`int`): F.
        context_length (`int`, defaults to `16`): W.
        context_stride (`int`, defaults to `4`): S.
        tail (`str`, defaults to `"full"`): "full" or "new" (see above).
        max_length (`int`, *optional*): the motion model's positional limit, as for `plan_windows`.

    Returns:
        A list of ((start, stop), (first, stop)) pairs with start <= first < stop, in the order of `plan_windows`.
    """
    if tail not in TAILS:
        raise ValueError(f"tail: {tail!r} is not accepted; accepted: {', '.join(repr(t) for t in TAILS)}")
    plan = plan_windows(num_frames, context_length, context_stride, max_length)
    spans = [(window, window) for window in plan]
    if tail == "new" and len(plan) > 1 and plan[-1][0] % context_stride != 0:
        # regular windows start at multiples of S; the tail starts at F − W, which is not one
        (start, stop), previous_stop = plan[-1], plan[-2][1]
        spans[-1] = ((start, stop), (previous_stop, stop))
    return spans


def span_weights(window: tuple[int, int], span: tuple[int, int], weighting: Weighting = "pyramid") -> torch.Tensor:
    """The weights of the frames `span` of `window`: the window's weights, evaluated at its length, sliced."""
    start, stop = window
    return window_weights(stop - start, weighting)[span[0] - start : span[1] - start]


@functools.lru_cache(maxsize=64)
def _named_weights(length: int, weighting: str) -> tuple[float, ...]:
    """The named scheme's weights (cached: every window of every temporal block of every step asks)."""
    return tuple(_named_weight_list(length, weighting))


def _named_weight_list(length: int, weighting: str) -> list[float]:
    """diffusers' `_get_frame_weights` schemes, plus "gaussian"; the odd-length sawtooth fixed to `length` entries."""
    if weighting == "flat":
        return [1.0] * length
    if weighting == "pyramid":
        # the paper's Eq. 9: frames near a window's centre count more. Even W: 1..W/2, W/2..1; odd W: 1..m..1
        half = list(range(1, (length + 1) // 2 + 1))
        return [float(v) for v in half + half[::-1][length % 2:]]
    if weighting == "delayed_reverse_sawtooth":
        # nearly no weight on the first half, then falling from the middle: [0.01]*(m−1) + [m] + [m..1] for even
        # W (m = W/2), [0.01]*(m−1) + [m..1] for odd W (m = (W+1)/2). diffusers' odd branch has one 0.01 too many.
        mid = (length + 1) // 2
        tail = list(range(mid, 0, -1))
        head = [0.01] * (mid - 1) + ([float(mid)] if length % 2 == 0 else [])
        return head + [float(v) for v in tail]
    if weighting == "gaussian":
        # exp(−(j − c)²/(2σ²)), c = (W−1)/2, σ = W/6: the edge frames get ~1–2% of the centre's weight
        centre, sigma = (length - 1) / 2.0, length / 6.0
        return [math.exp(-0.5 * ((j - centre) / sigma) ** 2) for j in range(length)]
    raise ValueError(
        f"weighting: {weighting!r} is not accepted; accepted: {', '.join(repr(w) for w in WEIGHTINGS)}, "
        "a callable length -> weights, or a sequence of weights"
    )


def window_weights(length: int, weighting: Weighting = "pyramid") -> torch.Tensor:
    """The per-frame weights of one window of `length` frames (FreeNoise's Eq. 9 and diffusers' schemes).

    * "pyramid" (default, the paper's and diffusers'): [1, 2, …, W/2, W/2, …, 2, 1] for even W,
      [1, …, (W+1)/2, …, 1] for odd W.
    * "flat": all 1 (a plain average of the overlapping windows).
    * "delayed_reverse_sawtooth" (diffusers): [0.01]·(W/2 − 1) + [W/2] + [W/2, …, 1] for even W, and
      [0.01]·((W+1)/2 − 1) + [(W+1)/2, …, 1] for odd W (diffusers returns W + 1 weights there).
    * "gaussian": exp(−(j − c)²/(2σ²)) with c = (W − 1)/2 and σ = W/6.
    * a callable `length -> weights`, or a sequence / tensor of `length` weights.

    Args:
        length (`int`): the window's number of frames, >= 1.
        weighting (`str`, callable or sequence, defaults to `"pyramid"`): the scheme (see above).

    Returns:
        A float64 CPU tensor of shape (length,), every weight finite and > 0.
    """
    length = check_int("length", length, 1)
    if isinstance(weighting, str):
        values = _named_weights(length, weighting)
    elif callable(weighting):
        values = weighting(length)
    elif isinstance(weighting, (torch.Tensor, list, tuple)):
        values = weighting
    else:
        raise ValueError(
            f"weighting: a {type(weighting).__name__} is not accepted; accepted: "
            f"{', '.join(repr(w) for w in WEIGHTINGS)}, a callable length -> weights, or a sequence of weights"
        )
    try:
        weights = torch.as_tensor(values, dtype=torch.float64).detach().cpu().flatten()
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"weighting: produced {values!r}; accepted: {length} finite numbers > 0") from None
    if weights.numel() != length or not bool(torch.isfinite(weights).all()) or not bool((weights > 0).all()):
        raise ValueError(
            f"weighting: gave {weights.tolist()} for a window of {length} frames; accepted: {length} finite numbers > 0"
        )
    return weights


def _check_window(window, num_frames: int) -> tuple[int, int]:
    try:
        start, stop = window
    except (TypeError, ValueError):
        raise ValueError(f"window: {window!r} is not accepted; accepted: a pair (start, stop)") from None
    for name, value in (("window start", start), ("window stop", stop)):
        check_int(name, value, 0, num_frames, extra=" (num_frames)")
    if start >= stop:
        raise ValueError(f"window: {window!r} is not accepted; accepted: 0 <= start < stop <= {num_frames}")
    return start, stop


def _check_span(span, window: tuple[int, int]) -> int:
    """The first frame of `span`, a part of `window` that ends at the window's stop."""
    try:
        first, stop = span
    except (TypeError, ValueError):
        raise ValueError(f"span: {span!r} is not accepted; accepted: a pair (first, stop)") from None
    if stop != window[1] or not (isinstance(first, int) and window[0] <= first < stop):
        raise ValueError(
            f"span: {span!r} is not accepted for window {window}; accepted: (first, {window[1]}) with "
            f"{window[0]} <= first < {window[1]}"
        )
    return first


def _check_frame_dim(frame_dim, dims: int) -> int:
    check_int("frame_dim", frame_dim, -dims, dims - 1, extra=f" (the outputs have {dims} dimensions)")
    return frame_dim % dims


class WindowAccumulator:
    """Incremental FreeNoise window fusion: `accumulate` one window output at a time, then `normalise`.

    The result is, per frame f, Σ_v w_v(f)·O_v(f) / Σ_v w_v(f) over the windows v that cover f (the official
    `value += out·w; count += w; value / count`). It is kept as a running weighted mean,
    m ← m + (w / Σw)·(O − m), so only the fused sequence and a per-frame weight sum are held, never the windows,
    and windows that agree give back exactly their common value, whatever the weights. A frame no window
    covered is an error at `normalise`, where diffusers' `torch.where(count > 0, …)` would leave it at zero.

    Args:
        num_frames (`int`): F, the length of the fused sequence.
        frame_dim (`int`, defaults to `1`): the frame axis of the window outputs (1 for the
            (B·H·W, F, C) hidden states of a temporal attention, 2 for (B, C, F, H, W) latents).
        dtype (`torch.dtype`, *optional*): the dtype of the running mean; by default the outputs' dtype,
            at least float32 (a weighted mean of a few terms needs no more; pass torch.float64 for more).
    """

    def __init__(self, num_frames: int, frame_dim: int = 1, dtype: Optional[torch.dtype] = None):
        self.num_frames = check_int("num_frames", num_frames, 1)
        self.frame_dim = check_int("frame_dim", frame_dim)
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"dtype: {dtype!r} is not accepted; accepted: a floating-point torch.dtype or None")
        self.dtype = dtype
        self._sums = torch.zeros(self.num_frames, dtype=torch.float64)
        self._mean: Optional[torch.Tensor] = None
        self._out_dtype: Optional[torch.dtype] = None
        self._dim = 0

    @property
    def weight_sums(self) -> torch.Tensor:
        """Σ_v w_v(f) per frame so far (float64, shape (F,)); 0 for frames no window has covered yet."""
        return self._sums.clone()

    def _start(self, output: torch.Tensor) -> None:
        """Allocate the running mean from the first output's shape, dtype and device."""
        self._dim = _check_frame_dim(self.frame_dim, output.dim())
        shape = list(output.shape)
        shape[self._dim] = self.num_frames
        dtype = self.dtype or torch.promote_types(output.dtype, torch.float32)
        self._mean = torch.zeros(shape, dtype=dtype, device=output.device)
        self._out_dtype = output.dtype

    def accumulate(self, window: tuple[int, int], output: torch.Tensor, weights: Weighting = "pyramid") -> None:
        """Add one window's output, weighted per frame.

        Args:
            window (`tuple[int, int]`): the window's frames [start, stop), inside [0, F).
            output (`torch.Tensor`): the window's output, stop − start frames along `frame_dim`; every other
                axis the same for all windows.
            weights (`str`, callable or sequence, defaults to `"pyramid"`): the window's per-frame weights, as
                `window_weights` accepts them (a name or callable is evaluated at stop − start frames).
        """
        start, stop = _check_window(window, self.num_frames)
        if not isinstance(output, torch.Tensor) or not output.is_floating_point() or output.dim() < 1:
            raise ValueError(
                f"output: {type(output).__name__} is not accepted; accepted: a floating-point torch.Tensor "
                f"with the frame axis at frame_dim={self.frame_dim}"
            )
        if self._mean is None:
            self._start(output)
        expected = list(self._mean.shape)
        expected[self._dim] = stop - start
        if list(output.shape) != expected or output.device != self._mean.device:
            raise ValueError(
                f"output: shape {tuple(output.shape)} on {output.device} is not accepted for window {window}; "
                f"accepted: shape {tuple(expected)} on {self._mean.device} (stop − start frames on frame_dim)"
            )
        w = window_weights(stop - start, weights)
        sums = self._sums[start:stop] + w
        view = [1] * self._mean.dim()
        view[self._dim] = stop - start
        # w / Σw is 1 for a frame's first window, so m = O there exactly, and stays O while the windows agree
        # (lerp computes m + step·(O − m) in one pass, and gives O exactly at step 1)
        step = (w / sums).to(dtype=self._mean.dtype, device=self._mean.device).view(view)
        part = self._mean.narrow(self._dim, start, stop - start)
        part.lerp_(output.to(self._mean.dtype), step)
        self._sums[start:stop] = sums

    def normalise(self) -> torch.Tensor:
        """The fused sequence: per frame, the window outputs' weighted mean (weights normalised to sum to 1).

        Returns:
            A new tensor in the outputs' dtype and on their device, with F frames along `frame_dim`.

        Raises:
            ValueError: if nothing was accumulated, or some frames are covered by no window (never silently
                left at zero).
        """
        if self._mean is None:
            raise ValueError("accumulate: no window output was added; accepted: at least one window before normalise")
        missing = (self._sums == 0).nonzero().flatten().tolist()
        if missing:
            raise ValueError(
                f"window plan: frames {missing} are covered by no window; accepted: windows that cover all "
                f"{self.num_frames} frames (see plan_windows)"
            )
        return self._mean.to(self._out_dtype, copy=True)


def fusion_weights(
    plan: Sequence[tuple[int, int]],
    num_frames: int,
    weighting: Weighting = "pyramid",
    spans: Optional[Sequence[tuple[int, int]]] = None,
) -> torch.Tensor:
    """The normalised weight of each window at each frame: w_v(f) / Σ_u w_u(f), 0 where v does not cover f.

    Args:
        plan (`list[tuple[int, int]]`): the windows, e.g. from `plan_windows`.
        num_frames (`int`): F.
        weighting (`str`, callable or sequence, defaults to `"pyramid"`): as for `window_weights`.
        spans (`list[tuple[int, int]]`, *optional*): per window, the frames it contributes (inside the window,
            ending at its stop; e.g. from `fused_spans`). None: every window contributes all its frames.

    Returns:
        A float64 tensor of shape (len(plan), F) whose columns each sum to 1.
    """
    num_frames = check_int("num_frames", num_frames, 1)
    matrix = torch.zeros(len(plan), num_frames, dtype=torch.float64)
    for row, window in enumerate(plan):
        start, stop = _check_window(window, num_frames)
        first = start if spans is None else _check_span(spans[row], (start, stop))
        matrix[row, first:stop] = span_weights((start, stop), (first, stop), weighting)
    sums = matrix.sum(dim=0)
    missing = (sums == 0).nonzero().flatten().tolist()
    if missing:
        raise ValueError(f"plan: frames {missing} are covered by no window; accepted: windows that cover all frames")
    return matrix / sums


def fuse_windows(
    window_outputs: Sequence[torch.Tensor],
    plan: Sequence[tuple[int, int]],
    num_frames: int,
    weighting: Weighting = "pyramid",
    frame_dim: int = 1,
    dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """FreeNoise's window fusion (paper Eq. 9; official `CrossAttention.forward` of attention_freenoise.py).

    Every window of `plan` contributes all its frames with the same per-window weights, and each frame's
    weights are normalised to sum to 1, the tail window [F − W, F) included.

    This is the "full" tail of `fused_spans`. diffusers' `FreeNoiseTransformerBlock` lets the tail window
    contribute only to the frames no earlier window covers (the "new" tail), so with a tail window the two
    fusions differ on the frames the tail window shares with others; and its weight sum adds one scalar weight
    instead of the slice, so whenever (F − W) mod S >= 2 with non-flat weights its tail frames come out scaled
    (e.g. F=27, W=16, S=4, pyramid: ×2/3 and ×1/3). Here the weights of every covered frame sum to exactly 1.

    Args:
        window_outputs (`list[torch.Tensor]`): one output per window of `plan`, in the same order, each with
            stop − start frames along `frame_dim` and the same other axes.
        plan (`list[tuple[int, int]]`): the windows, e.g. `plan_windows(F, W, S)`.
        num_frames (`int`): F.
        weighting (`str`, callable or sequence, defaults to `"pyramid"`): as for `window_weights`.
        frame_dim (`int`, defaults to `1`): the outputs' frame axis.
        dtype (`torch.dtype`, *optional*): accumulation dtype (see `WindowAccumulator`).

    Returns:
        The fused tensor, F frames along `frame_dim`, in the outputs' dtype.
    """
    outputs, windows = list(window_outputs), list(plan)
    if len(outputs) != len(windows):
        raise ValueError(
            f"window_outputs: {len(outputs)} outputs are not accepted for a plan of {len(windows)} windows; "
            "accepted: one output per window"
        )
    if not windows:
        raise ValueError("plan: an empty plan is not accepted; accepted: at least one window")
    fusion = WindowAccumulator(num_frames, frame_dim=frame_dim, dtype=dtype)
    for window, output in zip(windows, outputs):
        fusion.accumulate(window, output, weighting)
    return fusion.normalise()
