"""`guidekit.FreeNoise`: longer AnimateDiff videos by noise rescheduling and window fusion, as a sampler hook.

FreeNoise (Qiu et al., ICLR 2024, arXiv 2310.15169) lets a motion model trained on W frames sample F > W
frames: the initial noise after the first window is rescheduled (block-shuffled copies of earlier frames),
and the temporal layers run on windows of W frames whose outputs are fused per frame. The math lives in
`guidekit.video`; this hook applies it to a diffusers AnimateDiff UNet for one call.
"""

from __future__ import annotations

import warnings
from contextlib import ExitStack, contextmanager
from typing import Any, Iterator, Optional, Sequence

import torch

from .attention.freenoise import DEFAULT_ATTENTION_BUDGET, FUSIONS, INJECTION_BLOCKS, default_tail
from .checks import check_choice
from .hooks import SamplerHook, SamplerState
from .video import NOISE_MODES, TAILS, reschedule_noise, uses_fixed_prompt, window_weights
from .video._args import check_context, check_int
from .video.motion import NORM_SCOPES

__all__ = ["FreeNoise", "FUSIONS", "NORM_SCOPES", "TAILS"]

#: W when `context_length=None` and the motion model states no `motion_max_seq_length`.
DEFAULT_CONTEXT_LENGTH = 16


def _check_injection(value) -> Optional[tuple[float, float]]:
    """None, or the (t_a, t_b) step bounds of motion injection (True: the official (0.1, 0.3))."""
    if value is None or value is False:
        return None
    if value is True:
        return (0.1, 0.3)
    accepted = "None, True (official steps), or a pair (t_a, t_b) with 0 <= t_a <= t_b <= 1"
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ValueError(f"motion_injection: {value!r} is not accepted; accepted: {accepted}")
    try:
        uses_fixed_prompt(0, 1, value[0], value[1])
    except ValueError as error:
        raise ValueError(f"motion_injection: {value!r} is not accepted ({error}); accepted: {accepted}") from None
    return (float(value[0]), float(value[1]))


def _check_injection_blocks(value) -> tuple[str, ...]:
    """The UNet parts motion injection acts in: a non-empty selection of "down", "mid" and "up"."""
    accepted = f"a non-empty sequence of {', '.join(repr(b) for b in INJECTION_BLOCKS)}"
    names = (value,) if isinstance(value, str) else value
    try:
        names = tuple(names)
    except TypeError:
        raise ValueError(f"injection_blocks: {value!r} is not accepted; accepted: {accepted}") from None
    if not names or any(name not in INJECTION_BLOCKS for name in names):
        raise ValueError(f"injection_blocks: {value!r} is not accepted; accepted: {accepted}")
    return tuple(block for block in INJECTION_BLOCKS if block in names)  # UNet order, no repeats


def _injection_chunks(control):
    """Around each spatial chunk: the number of motion injection's conditional rows inside the chunk.

    The conditional rows are the last `control.rows` of the UNet batch, so inside a chunk [start, stop) they
    are again its last rows; a chunk without any is not injected.
    """

    @contextmanager
    def around(start: int, stop: int, rows: int) -> Iterator[None]:
        saved = control.rows, control.active
        first_conditional = rows - min(control.rows, rows)
        inside = max(0, stop - max(start, first_conditional))
        control.rows, control.active = inside, control.active and inside > 0
        try:
            yield
        finally:
            control.rows, control.active = saved

    return around


class FreeNoise(SamplerHook):
    """FreeNoise for AnimateDiff pipelines (`guidekit.pipelines.GuidedAnimateDiffPipeline`).

    With F frames, W = `context_length` and S = `context_stride`:

    * before sampling, frames >= W of the initial noise are rescheduled by `noise` (`guidekit.video.reschedule_noise`;
      user-given `latents` are kept as they are);
    * every temporal transformer block runs its two temporal attentions on the windows of
      `guidekit.video.plan_windows(F, W, S)`, each window with positions 0…W−1, and fuses the window outputs
      with per-frame weights that sum to 1: with `fusion="block"` the windows' residual streams after both
      attentions (diffusers, the AnimateDiff port), with `fusion="attention"` each attention's output
      (the official VideoCrafter code); the feed-forward then runs once on the fused sequence.

    F <= W runs the plain model (one window covers every frame). When (F − W) mod S != 0 a tail window
    [F − W, F) covers the last frames (`tail`). With `fusion="block"` and the default tail the call equals
    diffusers' `enable_free_noise` with the same settings wherever diffusers is correct (flat weights, or one
    frame after the last regular window); unlike diffusers, the tail frames are normalised exactly, "repeat"
    repeats, a list of generators gives each sample its own shuffle, an odd W works with every weighting, and
    nothing is left on the model after the call.

    Memory: with `fusion="attention"` and diffusers' stock attention processors, the windows attend as one
    batch in chunks of pixel rows, each gathered query, key, value or score tensor within `attention_budget`
    bytes on every device (64 MiB by default; unbounded, the gathered queries are n·W/F times a full-length
    query, 3.25× at F = 64 with W = 16, S = 4). Block fusion and other processors run the windows one at a
    time (one window's tensors). `spatial_chunk` and `temporal_chunk` split the remaining layers whose
    intermediates grow with F. All of these are exact (the same video up to float rounding).

    Args:
        context_length (`int`, *optional*, defaults to `16`): W, the frames of one window; the motion model's
            training length, at most its `motion_max_seq_length`. None: the motion model's
            `motion_max_seq_length` (16 if its config has none), as diffusers documents for `enable_free_noise`.
        context_stride (`int`, defaults to `4`): S, the frames between two window starts, 1 <= S <= W.
        weighting (`str`, callable or sequence, defaults to `"pyramid"`): the per-frame window weights: "pyramid",
            "flat", "delayed_reverse_sawtooth", "gaussian", a callable `length -> weights`, or W weights.
        noise (`str`, defaults to `"shuffle"`): the rescheduling of the initial noise: "shuffle" (official),
            "repeat" (the first window tiled) or "random" (fresh noise, no rescheduling).
        fusion (`str`, defaults to `"attention"`): where windows are fused: "attention" (per temporal-attention
            output, the official VideoCrafter code) or "block" (per temporal transformer block, diffusers and the
            AnimateDiff port; `fusion="block"` reproduces diffusers' `enable_free_noise` where it is correct).
        tail (`str`, *optional*): how the tail window [F − W, F) enters the temporal fusion: "new" (only the
            frames no other window covers, each then exactly the tail window's output: diffusers' design) or
            "full" (all its W frames with the window weights, like any other window; the last frames then blend
            in smoothly). None: "new" with `fusion="block"` (diffusers' fusion, so that it stays diffusers'
            result) and "full" with `fusion="attention"` (the official code has no tail window). The GroupNorm
            of `norm_scope="window"` always takes the full tail window.
        motion_injection (`bool` or `tuple[float, float]`, *optional*): FreeNoise's motion injection for a
            `{frame: prompt}` schedule (official code): at steps i < t_a·N or i > t_b·N the spatial
            cross-attention of `injection_blocks` reads the last prompt for every frame (conditional pass
            only), while the other layers and steps read the per-frame prompts. `True` takes the official
            (t_a, t_b) = (0.1, 0.3), i.e. steps 0–4 and 16–49 of 50; a pair gives (t_a, t_b). None: off.
            As in the official code it acts only in the conditional pass of classifier-free guidance: a call
            with guidance_scale <= 1 is refused, and a step run without the unconditional pass (guidance turned
            off by a callback) is not injected, with a warning. With an IP-Adapter only the text tokens are
            replaced; the image tokens stay.
            It is made for prompts that change what one subject does; the early frames then also lean towards
            the last prompt (on the embedded toy model, where a background colour switch is the only test,
            it lowers the first prompt's accuracy and does not keep the shape steadier: README, FreeNoise).
        injection_blocks (sequence of `str`, defaults to `("down", "mid")`): the UNet parts whose spatial
            cross-attention motion injection acts in, any of "down", "mid" and "up". The default is the official
            code's (input and middle blocks).
        norm_scope (`str`, defaults to `"all"`): the frames over which each motion module's GroupNorm takes its
            statistics: "all" F frames (diffusers' `AnimateDiffTransformer3D`, so every frame depends on the whole
            video), or each "window" on its own, the windows' normalised features fused per frame with the window
            weights (`guidekit.video.window_group_norm`), so a frame depends only on the windows that cover it,
            as when the whole temporal module runs per window. Both are the same for F <= W.
        spatial_chunk (`int`, *optional*): run the UNet's per-frame spatial layers (resnets, spatial
            transformers, down/up samplers) over the batch×frames axis in chunks of this many frames (with
            guidance the batch holds two copies of each frame). None: unsplit.
        temporal_chunk (`int`, *optional*): run the temporal transformer blocks over the batch×height×width
            axis in chunks of this many pixel rows (each row is one pixel's F frames). None: unsplit.
        attention_budget (`int`, *optional*, defaults to `64 * 2**20`): attention fusion with stock processors:
            the most bytes any one gathered query, key, value or score tensor may take (at least one pixel row's);
            raise it for fewer, larger batches. None: no bound (all rows in one batch).

    Example:
        >>> pipe = GuidedAnimateDiffPipeline.from_pretrained(path)
        >>> video = pipe("a ball rolling", num_frames=64, hooks=[guidekit.FreeNoise()]).frames[0]
    """

    def __init__(
        self,
        context_length: int = 16,
        context_stride: int = 4,
        weighting: Any = "pyramid",
        noise: str = "shuffle",
        fusion: str = "attention",
        tail: Optional[str] = None,
        motion_injection: Optional[Any] = None,
        injection_blocks: Sequence[str] = ("down", "mid"),
        norm_scope: str = "all",
        spatial_chunk: Optional[int] = None,
        temporal_chunk: Optional[int] = None,
        attention_budget: Optional[int] = DEFAULT_ATTENTION_BUDGET,
    ):
        if context_length is None:
            # resolved per call from the motion model; S <= W is checked then
            self.context_length, self.context_stride = None, check_int("context_stride", context_stride, 1)
        else:
            self.context_length, self.context_stride = check_context(context_length, context_stride)
        if self.context_length is not None or isinstance(weighting, str) or callable(weighting):
            # a bad weighting fails here, not mid-call (W weights given for W=None are checked at the call)
            window_weights(self.context_length or self.context_stride, weighting)
        self.weighting = weighting
        self.noise = check_choice("noise", noise, NOISE_MODES)
        self.fusion = check_choice("fusion", fusion, FUSIONS)
        self.tail = default_tail(self.fusion) if tail is None else check_choice("tail", tail, TAILS)
        self.motion_injection = _check_injection(motion_injection)
        self.injection_blocks = _check_injection_blocks(injection_blocks)
        self.norm_scope = check_choice("norm_scope", norm_scope, NORM_SCOPES)
        self.spatial_chunk = None if spatial_chunk is None else check_int("spatial_chunk", spatial_chunk, 1)
        self.temporal_chunk = None if temporal_chunk is None else check_int("temporal_chunk", temporal_chunk, 1)
        self.attention_budget = None if attention_budget is None else check_int("attention_budget", attention_budget, 1)
        if self.motion_injection is not None:
            # it replaces the processors of the chosen blocks' cross-attention layers for the call
            self.attention_layers = frozenset({"<all cross-attention layers>"})

    def __repr__(self) -> str:
        return (
            f"FreeNoise(context_length={self.context_length}, context_stride={self.context_stride}, "
            f"weighting={self.weighting!r}, noise={self.noise!r}, fusion={self.fusion!r}, tail={self.tail!r}, "
            f"motion_injection={self.motion_injection!r}, injection_blocks={self.injection_blocks!r}, "
            f"norm_scope={self.norm_scope!r}, "
            f"spatial_chunk={self.spatial_chunk!r}, temporal_chunk={self.temporal_chunk!r}, "
            f"attention_budget={self.attention_budget!r})"
        )

    def _unet(self, state: SamplerState):
        pipeline = state.extras.get("pipeline")
        unet = getattr(pipeline, "unet", None)
        if unet is None:
            raise ValueError(
                "FreeNoise: the pipeline has no `unet`; accepted: an AnimateDiff pipeline such as "
                "guidekit.pipelines.GuidedAnimateDiffPipeline"
            )
        return unet

    def _context_length(self, state: SamplerState) -> int:
        """W for this call: `context_length`, or for None the motion model's `motion_max_seq_length`."""
        if self.context_length is not None:
            return self.context_length
        memory = state.memory(self)
        if "context_length" not in memory:
            from .attention.freenoise import motion_max_length

            unet = getattr(state.extras.get("pipeline"), "unet", None)
            limit = motion_max_length(unet) if unet is not None else None
            memory["context_length"] = limit or DEFAULT_CONTEXT_LENGTH
        return memory["context_length"]

    def validate(self, state: SamplerState) -> None:
        from .attention.freenoise import motion_blocks, motion_max_length

        unet = self._unet(state)
        if not motion_blocks(unet):
            raise ValueError(
                f"FreeNoise: {type(unet).__name__} has no motion modules; accepted: an AnimateDiff pipeline such as "
                "guidekit.pipelines.GuidedAnimateDiffPipeline"
            )
        limit = motion_max_length(unet)
        if limit is not None:
            check_int(
                "context_length", self._context_length(state), 1, limit,
                extra=" (the motion model's motion_max_seq_length)",
            )
        check_context(self._context_length(state), self.context_stride)
        window_weights(self._context_length(state), self.weighting)
        if self.motion_injection is not None:
            self._validate_injection(state, unet)

    def _validate_injection(self, state: SamplerState, unet) -> None:
        """Motion injection needs a prompt schedule, classifier-free guidance and cross-attention to act in."""
        from .attention.freenoise import injection_layers

        if state.extras.get("fixed_prompt_embeds") is None:
            raise ValueError(
                "motion_injection: needs a {frame: prompt} dict prompt (its last prompt is the injected one); "
                "accepted: such a prompt, or motion_injection=None"
            )
        pipeline = state.extras.get("pipeline")
        guided = state.guidance_scale > 1 and getattr(pipeline, "do_classifier_free_guidance", True)
        if not guided or not getattr(pipeline, "_uncond_encoded", True):
            # the official sampler injects only when it runs both passes, into the conditional one
            raise ValueError(
                f"motion_injection: needs classifier-free guidance, which guidance_scale={state.guidance_scale:g} "
                "turns off (motion injection acts in the conditional pass of guidance only, as in the official "
                "code); accepted: guidance_scale > 1, or motion_injection=None"
            )
        if not injection_layers(unet, self.injection_blocks):
            raise ValueError(
                f"injection_blocks: {self.injection_blocks!r} hold no cross-attention layer in this UNet, so "
                "motion injection would change nothing; accepted: blocks with cross-attention, or "
                "motion_injection=None"
            )

    def begin(self, state: SamplerState) -> None:
        from .attention.freenoise import (
            InjectionControl,
            MotionInjectionProcessor,
            injection_layers,
            watch_guidance,
            windowed_motion_blocks,
        )
        from .attention.install import replaced_processors
        from .video.motion import chunked_layers, windowed_group_norms

        unet = self._unet(state)
        memory = state.memory(self)
        length = self._context_length(state)
        stack = ExitStack()
        try:
            stack.enter_context(
                windowed_motion_blocks(
                    unet, length, self.context_stride, self.weighting, owner=self, fusion=self.fusion, tail=self.tail,
                    attention_budget=self.attention_budget,
                )
            )
            if self.norm_scope == "window":
                stack.enter_context(windowed_group_norms(unet, length, self.context_stride, self.weighting))
            control = None
            if self.motion_injection is not None:
                control = InjectionControl(state.extras["fixed_prompt_embeds"], rows=0)
            if self.spatial_chunk is not None or self.temporal_chunk is not None:
                # entered after the window fusion, so the temporal chunks wrap the windowed blocks
                around = _injection_chunks(control) if control is not None else None
                stack.enter_context(chunked_layers(unet, self.spatial_chunk, self.temporal_chunk, around))
            if control is not None:
                processors = unet.attn_processors
                layers = injection_layers(unet, self.injection_blocks)
                stack.enter_context(
                    replaced_processors(
                        unet, {name: MotionInjectionProcessor(processors[name], control) for name in layers}
                    )
                )
                stack.enter_context(watch_guidance(unet, control, lambda: state.step_index))
                memory["control"] = control
        except BaseException:
            stack.close()
            raise
        memory["installed"] = stack

    def step_begin(self, state: SamplerState) -> None:
        control = state.memory(self).get("control")
        if control is not None:
            batch, _, num_frames = state.latents.shape[:3]
            control.rows = batch * num_frames  # the conditional videos' frames, last in the UNet batch
            control.videos = batch
            t_a, t_b = self.motion_injection
            control.active = uses_fixed_prompt(state.step_index, state.num_steps, t_a, t_b)

    def init_latents(self, state: SamplerState, latents: torch.Tensor) -> torch.Tensor:
        if latents.dim() != 5:
            raise ValueError(
                f"FreeNoise: latents of shape {tuple(latents.shape)} are not accepted; accepted: video latents "
                "(B, C, F, H, W)"
            )
        length = self._context_length(state)
        given, wanted = latents.shape[2], state.extras.get("num_frames")
        if state.extras.get("user_latents", False):
            # the user's own starting point is taken as it is, except that the first W frames of a longer
            # video are extended by the rescheduling (diffusers' documented use, which fails in its shuffle)
            if wanted is None or given != length or wanted <= length:
                return latents
        rescheduled = reschedule_noise(
            latents, length, self.context_stride, generator=state.generator, mode=self.noise, num_frames=wanted or given
        )
        if self.noise == "random" and rescheduled.shape[2] > length:
            # fresh noise is N(0, 1); the pipeline's latents were already scaled by init_noise_sigma
            sigma = float(getattr(state.scheduler, "init_noise_sigma", 1.0))
            if sigma != 1.0:
                rescheduled[:, :, length:] *= sigma
        return rescheduled

    def end(self, state: SamplerState) -> None:
        memory = state.memory(self)
        stack = memory.pop("installed", None)
        if stack is not None:
            stack.close()
        control = memory.pop("control", None)
        if control is not None and control.skipped:
            warnings.warn(
                f"motion_injection: steps {sorted(set(control.skipped))} ran without the unconditional pass (guidance "
                "turned off during the call), so nothing was injected there, as in the official code",
                stacklevel=2,
            )
