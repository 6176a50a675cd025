"""StyleSSP as a sampler hook: the frequency-manipulated start point, and the switch for the negative-guided
inversion of the content.

StyleSSP (Xu, Xi, Wang, Mao, Cheng; "StyleSSP: Sampling StartPoint Enhancement for Training-free Diffusion-based
Method for Style Transfer", CVPR 2025, arXiv 2501.11319) changes only the sampling start point z_T of an
inversion-based style transfer, in two ways (METHODS.md §5):

1. *negative-guided inversion*: the content is inverted with classifier-free guidance whose negative side
   describes what the style image shows, so the start point is pushed away from the style image's content
   (less content leakage). The inversion runs inside the pipeline (`StyleIDStableDiffusionPipeline.transfer`,
   argument ``negative_inversion_scale``); this hook only asks for it through its `negative_inversion_scale`
   attribute.
2. *frequency manipulation*: the inverted content latent is filtered by `frequency_start_point` (its lowest and
   highest 3-D FFT bands scaled by α, range-matched noise added); this hook does it in `init_latents`.
"""

from __future__ import annotations

from typing import Sequence, Union

import torch

from ..checks import check_choice, check_number
from ..hooks import SamplerHook, SamplerState
from .frequency import RANGE_MODES, _check_filter_type, _check_stop_frequency, frequency_start_point

__all__ = ["StyleSSP", "ORDERS", "DEFAULT_NEGATIVE_GUIDANCE"]

#: Where the frequency manipulation goes relative to StyleID's AdaIN of the start point.
ORDERS = ("frequency_first", "adain_first")

#: s = w_inv − 1 for the official inversion guidance scale w_inv = 1.5 (bytedance/StyleSSP src/config.py
#: ``inv_guidance_scale``): ε(c⁻) + w_inv·(ε(c⁺) − ε(c⁻)) = ε(c⁺) + (w_inv − 1)·(ε(c⁺) − ε(c⁻)).
DEFAULT_NEGATIVE_GUIDANCE = 0.5

GeneratorInput = Union[None, torch.Generator, Sequence[torch.Generator]]


def draw_noise(shape, generator: GeneratorInput, device) -> torch.Tensor:
    """Standard Gaussian noise of `shape` (B, ...), float32, on `device`.

    With a list of generators (one per sample) sample i is drawn from generator i alone, as a (1, ...) tensor,
    so it does not depend on the other samples or on the batch size. With one generator (or None: torch's
    global one) the whole batch is drawn at once. Each draw happens on its generator's device, then moves.
    """
    shape = tuple(shape)
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(
                f"generator: {len(generator)} generators for a batch of {shape[0]}; accepted: one generator, or one "
                "per sample"
            )
        parts = []
        for g in generator:
            if not isinstance(g, torch.Generator):
                raise ValueError(f"generator: {g!r} is not accepted; accepted: torch.Generator objects")
            parts.append(torch.randn((1,) + shape[1:], generator=g, device=g.device, dtype=torch.float32).to(device))
        return torch.cat(parts)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator: {generator!r} is not accepted; accepted: a torch.Generator, a list of them, or None")
    where = generator.device if generator is not None else "cpu"
    return torch.randn(shape, generator=generator, device=where, dtype=torch.float32).to(device)


class StyleSSP(SamplerHook):
    r"""StyleSSP's start point (Xu et al., CVPR 2025) for `StyleIDStableDiffusionPipeline.transfer`.

    Usage: ``pipe.transfer(content, style, style_prompt="a lighthouse", hooks=[guidekit.StyleSSP()])``;
    `style_prompt` says what the style image shows (the negative of the inversion guidance).

    What it does in `transfer` (defaults from the official bytedance/StyleSSP code, METHODS.md §5):

    1. Negative-guided inversion of the content (done by the pipeline, asked for through
       `negative_inversion_scale`): each DDIM inversion step uses
       ε̃ = ε(z, c⁺) + s·(ε(z, c⁺) − ε(z, c⁻)), with c⁺ the pipeline's ``content_prompt`` ("" when None) and
       c⁻ its ``style_prompt``. This is the official ε(c⁻) + w_inv·(ε(c⁺) − ε(c⁻)) with s = w_inv − 1; the
       official w_inv = 1.5 gives the default s = 0.5. The plain inversions still supply StyleID's injected
       features; only the start point comes from the guided one.
    2. Frequency manipulation (`frequency_start_point`) of the latent the official code filters: the content's
       inverted latent z_T (the negative-guided one), *before* StyleID's AdaIN. The official code has no AdaIN
       (it is built on InstantStyle-Plus), so ``order="frequency_first"`` (default) keeps its input and puts
       StyleID's AdaIN last: z_start = AdaIN(freq(z_T^c), z_T^s), which keeps AdaIN's style statistics.
       ``order="adain_first"`` filters the AdaIN start instead: z_start = freq(AdaIN(z_T^c, z_T^s)).
       With ``init_adain=False`` in `transfer` both orders give freq(z_T^c).

    The noise of the frequency step is drawn from the call's `generator`: standard Gaussian, float32, on the
    generator's device. A list of generators gives one per sample, so a sample's start point never depends on
    the batch it is in (see also `range_over`).

    In pipelines other than StyleID's (no ``content_zT`` in `state.extras`), `init_latents` filters the start
    latent it receives, and a positive `negative_guidance` is refused (no such inversion there).

    Args:
        alpha (`float`, defaults to `0.7`): α in [0, 1], the factor on the lowest and highest frequencies; 1
            turns the frequency step off exactly (the official 0.7).
        d_s, d_t, d_l (`float`, default `0.3`, `0.9`, `0.3`): stop frequencies of the low-pass, high-pass and
            channel parts of the mask, in (0, 1] (the official values; d_l is fixed in the official code).
        filter_type (`str`, defaults to ``"gaussian_b"``): the mask (the official one; the only one implemented).
        range_over (`str`, defaults to ``"sample"``): the noise's range is matched per sample; ``"batch"`` over
            the whole batch, as the official code (the same for a batch of one).
        negative_guidance (`float`, defaults to `0.5`): s ≥ 0 of the negative-guided inversion (official
            w_inv = 1.5); 0 turns it off (the plain inversion's z_T is filtered).
        frequency (`bool`, defaults to `True`): False skips the frequency step (negative inversion only).
        order (`str`, defaults to ``"frequency_first"``): see 2. above.

    Raises:
        ValueError: a parameter out of range; at call time, a positive `negative_guidance` without a
            ``style_prompt`` or in a pipeline without the negative-guided inversion, or a generator list whose
            length is not the batch size.
    """

    def __init__(
        self,
        alpha: float = 0.7,
        d_s: float = 0.3,
        d_t: float = 0.9,
        d_l: float = 0.3,
        filter_type: str = "gaussian_b",
        range_over: str = "sample",
        negative_guidance: float = DEFAULT_NEGATIVE_GUIDANCE,
        frequency: bool = True,
        order: str = "frequency_first",
    ):
        self.alpha = check_number("alpha", alpha, 0.0, 1.0)
        self.d_s = _check_stop_frequency("d_s", d_s)
        self.d_t = _check_stop_frequency("d_t", d_t)
        self.d_l = _check_stop_frequency("d_l", d_l)
        self.filter_type = _check_filter_type(filter_type)
        self.range_over = check_choice("range_over", range_over, RANGE_MODES)
        self.negative_guidance = check_number("negative_guidance", negative_guidance, 0.0)
        if not isinstance(frequency, bool):
            raise ValueError(f"frequency: {frequency!r} is not accepted; accepted: True or False")
        self.frequency = frequency
        self.order = check_choice("order", order, ORDERS)

    @property
    def negative_inversion_scale(self) -> float:
        """The scale s the pipeline's negative-guided inversion uses (read by `transfer`; 0 = off)."""
        return self.negative_guidance

    def __repr__(self) -> str:
        return (
            f"StyleSSP(alpha={self.alpha}, d_s={self.d_s}, d_t={self.d_t}, d_l={self.d_l}, "
            f"negative_guidance={self.negative_guidance}, frequency={self.frequency}, order={self.order!r})"
        )

    def validate(self, state: SamplerState) -> None:
        if self.negative_guidance > 0:
            if "negative_inversion_scale" not in state.extras:
                raise ValueError(
                    f"hooks: {self!r} asks for a negative-guided inversion, which this pipeline does not run; "
                    "accepted: negative_guidance=0 here, or StyleIDStableDiffusionPipeline.transfer"
                )
            if state.extras.get("style_prompt") is None:
                raise ValueError(
                    "style_prompt: None is not accepted with StyleSSP's negative-guided inversion; accepted: a "
                    "description of what the style image shows (the negative), or StyleSSP(negative_guidance=0)"
                )

    def _filter(self, latent: torch.Tensor, state: SamplerState) -> torch.Tensor:
        noise = draw_noise(latent.shape, state.generator, latent.device)
        return frequency_start_point(
            latent,
            noise,
            d_s=self.d_s,
            d_t=self.d_t,
            d_l=self.d_l,
            alpha=self.alpha,
            filter_type=self.filter_type,
            range_over=self.range_over,
        )

    def init_latents(self, state: SamplerState, latents: torch.Tensor) -> torch.Tensor:
        if not self.frequency:
            return latents
        extras = state.extras
        if self.order == "adain_first" or "content_zT" not in extras:
            return self._filter(latents, state)
        content = extras.get("content_start_zT", extras["content_zT"])
        filtered = self._filter(content, state)
        if extras.get("init_adain", False):
            from ..pipelines.styleid_sd import adain_latents  # the pipelines import diffusers: load on use

            return adain_latents(filtered, extras["style_zT"])
        return filtered
