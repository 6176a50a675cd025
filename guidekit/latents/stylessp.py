"""StyleSSP as a sampler hook: the frequency-manipulated start point, the switch for the negative-guided
inversion of the content, and `StyleSSP.start_point` for any Stable Diffusion / SDXL pipeline.

StyleSSP (Xu, Xi, Wang, Mao, Cheng; "StyleSSP: Sampling StartPoint Enhancement for Training-free Diffusion-based
Method for Style Transfer", CVPR 2025, arXiv 2501.11319) changes only the sampling start point z_T of an
inversion-based style transfer, in two ways (METHODS.md §5):

1. *negative-guided inversion*: the content is inverted with classifier-free guidance
   ε(c⁻) + w_inv·(ε(c⁺) − ε(c⁻)) whose negative side c⁻ describes what the style image shows, so the start point
   is pushed away from the style image's content (less content leakage). In `StyleIDStableDiffusionPipeline.transfer`
   the pipeline runs it, asked for through this hook's `negative_inversion_scale`; `StyleSSP.start_point` runs it
   itself on any diffusers SD 1.x/2.x or SDXL pipeline, with c⁺ and c⁻ as text or, with IP-Adapters loaded, as
   image embeddings (the official form uses IP-Adapter-Instruct embeddings; see `StyleSSP.start_point`).
2. *frequency manipulation*: the inverted content latent is filtered by `frequency_start_point` (its lowest and
   highest 3-D FFT bands scaled by α, range-matched noise added); this hook does it in `init_latents` and at the
   end of `start_point`.
"""

from __future__ import annotations

import warnings
from typing import List, Optional, Sequence, Union

import torch

from ..checks import check_choice, check_number
from ..hooks import SamplerHook, SamplerState
from .frequency import RANGE_MODES, _check_filter_type, _check_stop_frequency, frequency_start_point

__all__ = ["StyleSSP", "ORDERS", "DEFAULT_INVERSION_GUIDANCE_SCALE", "DEFAULT_NEGATIVE_GUIDANCE"]

#: Where the frequency manipulation goes relative to StyleID's AdaIN of the start point.
ORDERS = ("frequency_first", "adain_first")

#: The official inversion guidance scale w_inv of ε(c⁻) + w_inv·(ε(c⁺) − ε(c⁻)) (bytedance/StyleSSP
#: src/config.py ``inv_guidance_scale``).
DEFAULT_INVERSION_GUIDANCE_SCALE = 1.5

#: s = w_inv − 1, the same guidance written ε(c⁺) + s·(ε(c⁺) − ε(c⁻)): the scale the StyleID pipeline's
#: ``negative_inversion_scale`` and the deprecated ``negative_guidance`` argument take.
DEFAULT_NEGATIVE_GUIDANCE = DEFAULT_INVERSION_GUIDANCE_SCALE - 1.0


class _DefaultScale(float):
    """The default of `inversion_guidance_scale`, told apart from the same number passed by the caller (so that
    passing it together with the deprecated `negative_guidance` is refused)."""


_W_INV_DEFAULT = _DefaultScale(DEFAULT_INVERSION_GUIDANCE_SCALE)

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


def _check_flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name}: {value!r} is not accepted; accepted: True or False")
    return value


class StyleSSP(SamplerHook):
    r"""StyleSSP's start point (Xu et al., CVPR 2025): for `StyleIDStableDiffusionPipeline.transfer`, and through
    `start_point` for any diffusers Stable Diffusion 1.x/2.x or SDXL pipeline that accepts ``latents=``.

    Usage:

    * StyleID: ``pipe.transfer(content, style, style_prompt="a lighthouse", hooks=[guidekit.StyleSSP()])``;
    * any SD/SDXL pipeline: ``z = guidekit.StyleSSP().start_point(pipe, content, prompt=..., style_prompt=...)``,
      then ``pipe(prompt, latents=z, ...)`` with a DDIM scheduler (see `start_point`);
    * with two IP-Adapters loaded on the pipeline (one on the style blocks, one on the layout blocks):
      ``start_point(pipe, content, prompt=..., style_image=style)``, the image-embedding form of the official
      negative inversion (see `start_point`).

    `style_prompt` says what the style image shows (the negative of the inversion guidance).

    What it does in `transfer` (defaults from the official bytedance/StyleSSP code, METHODS.md §5):

    1. Negative-guided inversion of the content (done by the pipeline, asked for through
       `negative_inversion_scale`): each DDIM inversion step uses the official
       ε̃ = ε(z, c⁻) + w_inv·(ε(z, c⁺) − ε(z, c⁻)), written there as ε(z, c⁺) + s·(ε(z, c⁺) − ε(z, c⁻)) with
       s = w_inv − 1, c⁺ the pipeline's ``content_prompt`` ("" when None) and c⁻ its ``style_prompt``. The
       official w_inv = 1.5 (s = 0.5). The plain inversions still supply StyleID's injected features; only the
       start point comes from the guided one.
    2. Frequency manipulation (`frequency_start_point`) of the latent sampling starts from. StyleSSP samples
       from the filtered latent z' (METHODS.md §5.2 step 3, §5.4); in StyleID that start point is the AdaIN of
       the content's z_T to the style's statistics (STYLEID.md §4), so ``order="adain_first"`` (default)
       filters it: z_start = freq(AdaIN(z_T^c, z_T^s)), z_T^c the negative-guided inversion's when it runs.
       ``order="frequency_first"`` filters the content's z_T before the AdaIN instead,
       z_start = AdaIN(freq(z_T^c), z_T^s); the AdaIN then undoes the step's lowering of the lowest
       frequencies: the mask is 1 at every channel's spatial mean, so freq scales each channel's mean by α, and
       the AdaIN sets it back to the style's (and renormalises the standard deviation the α scaling lowered).
       With ``init_adain=False`` in `transfer` both orders give freq(z_T^c). Start latents changed by earlier
       hooks are composed with, not dropped: ``"adain_first"`` (and no AdaIN) filters the latent it receives;
       ``"frequency_first"`` adds its change AdaIN(freq(z_T^c)) − AdaIN(z_T^c) to it (see `init_latents`).

    The noise of the frequency step is drawn from the call's `generator`: standard Gaussian, float32, on the
    generator's device. A list of generators gives one per sample, so a sample's start point never depends on
    the batch it is in (see also `range_over`).

    In hooked pipelines other than StyleID's (no ``content_zT`` in `state.extras`), `init_latents` filters the
    start latent it receives, and the negative-guided inversion is refused there (no such inversion runs):
    pass ``negative_inversion=False``, or use `start_point`.

    Args (all keyword-only):
        d_s (`float`, defaults to `0.3`): stop frequency of the low-pass part of the mask, in (0, 1].
        d_t (`float`, defaults to `0.9`): stop frequency of the high-pass part of the mask, in (0, 1].
        alpha (`float`, defaults to `0.7`): α in [0, 1], the factor on the lowest and highest frequencies; 1
            turns the frequency step off exactly (the official 0.7).
        inversion_guidance_scale (`float`, defaults to `1.5`): w_inv ≥ 1 of the negative-guided inversion
            ε(c⁻) + w_inv·(ε(c⁺) − ε(c⁻)) (the official 1.5); larger pushes the start point further from c⁻.
            1 asks for no negative push (s = 0): `transfer` then runs its plain inversion, `start_point` inverts
            with ε(c⁺) alone. Below 1 would pull the start towards the style image's content and is refused.
        frequency (`bool`, defaults to `True`): False skips the frequency step (negative inversion only).
        negative_inversion (`bool`, defaults to `True`): False turns the negative-guided inversion off (the
            plain inversion's z_T is filtered; no ``style_prompt`` needed).
        d_l (`float`, defaults to `0.3`): stop frequency of the channel axis of the mask, in (0, 1] (fixed in
            the official code).
        filter_type (`str`, defaults to ``"gaussian_b"``): the mask (the official one; the only one implemented).
        range_over (`str`, defaults to ``"sample"``): the noise's range is matched per sample; ``"batch"`` over
            the whole batch, as the official code (the same for a batch of one).
        order (`str`, defaults to ``"adain_first"``): see 2. above (StyleID's AdaIN only; `start_point` has
            no AdaIN).
        negative_guidance (`float`, *optional*): deprecated, s = w_inv − 1 ≥ 0 (0 turned the inversion off);
            use ``inversion_guidance_scale=1 + s`` (and ``negative_inversion=False`` for 0). Emits a
            `FutureWarning`; passing it with `inversion_guidance_scale` is refused.

    Raises:
        ValueError: a parameter out of range, NaN or inf (naming it and what is accepted); both
            `negative_guidance` and `inversion_guidance_scale`; at call time, the negative-guided inversion
            without a ``style_prompt`` (text form) or in a pipeline without it, or a generator list whose length is
            not the batch size (`start_point` lists its own, the IP-Adapter inputs included).
    """

    def __init__(
        self,
        *,
        d_s: float = 0.3,
        d_t: float = 0.9,
        alpha: float = 0.7,
        inversion_guidance_scale: float = _W_INV_DEFAULT,
        frequency: bool = True,
        negative_inversion: bool = True,
        d_l: float = 0.3,
        filter_type: str = "gaussian_b",
        range_over: str = "sample",
        order: str = "adain_first",
        negative_guidance: Optional[float] = None,
    ):
        self.alpha = check_number("alpha", alpha, 0.0, 1.0)
        self.d_s = _check_stop_frequency("d_s", d_s)
        self.d_t = _check_stop_frequency("d_t", d_t)
        self.d_l = _check_stop_frequency("d_l", d_l)
        self.filter_type = _check_filter_type(filter_type)
        self.range_over = check_choice("range_over", range_over, RANGE_MODES)
        self.frequency = _check_flag("frequency", frequency)
        self.negative_inversion = _check_flag("negative_inversion", negative_inversion)
        self.order = check_choice("order", order, ORDERS)
        if negative_guidance is None:
            self.inversion_guidance_scale = check_number("inversion_guidance_scale", inversion_guidance_scale, 1.0)
        else:
            self._from_negative_guidance(negative_guidance, inversion_guidance_scale)

    def _from_negative_guidance(self, negative_guidance, inversion_guidance_scale) -> None:
        """The deprecated s = w_inv − 1: w_inv = 1 + s, and s = 0 turns the inversion off (its old meaning)."""
        warnings.warn(
            "StyleSSP(negative_guidance=s) is deprecated; use StyleSSP(inversion_guidance_scale=1 + s), the official "
            "w_inv (and negative_inversion=False instead of s = 0)",
            FutureWarning,
            stacklevel=3,
        )
        if type(inversion_guidance_scale) is not _DefaultScale:
            raise ValueError(
                f"negative_guidance: {negative_guidance!r} given together with inversion_guidance_scale="
                f"{inversion_guidance_scale!r}; accepted: inversion_guidance_scale alone (negative_guidance, "
                "s = w_inv − 1, is its deprecated form)"
            )
        s = check_number("negative_guidance", negative_guidance, 0.0)
        self.inversion_guidance_scale = 1.0 + s
        self.negative_inversion = self.negative_inversion and s > 0

    @property
    def negative_inversion_scale(self) -> float:
        """s = w_inv − 1 of the pipeline's negative-guided inversion (read by `transfer`; 0 = off)."""
        return self.inversion_guidance_scale - 1.0 if self.negative_inversion else 0.0

    def __repr__(self) -> str:
        return (
            f"StyleSSP(d_s={self.d_s}, d_t={self.d_t}, alpha={self.alpha}, "
            f"inversion_guidance_scale={self.inversion_guidance_scale}, frequency={self.frequency}, "
            f"negative_inversion={self.negative_inversion}, d_l={self.d_l}, order={self.order!r})"
        )

    def validate(self, state: SamplerState) -> None:
        if self.negative_inversion_scale > 0:
            if "negative_inversion_scale" not in state.extras:
                raise ValueError(
                    f"hooks: {self!r} asks for a negative-guided inversion, which this pipeline does not run; "
                    "accepted: negative_inversion=False here, StyleIDStableDiffusionPipeline.transfer, or "
                    "StyleSSP.start_point before the call"
                )
            # the pipeline's scale is the one that runs: an explicit negative_inversion_scale=0 wins over ours
            if state.extras["negative_inversion_scale"] > 0 and state.extras.get("style_prompt") is None:
                raise ValueError(
                    "style_prompt: None is not accepted with StyleSSP's negative-guided inversion; accepted: a "
                    "description of what the style image shows (the negative), or StyleSSP(negative_inversion=False)"
                )

    def _filter(self, latent: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """`frequency_start_point` (METHODS.md §5.2) of `latent` with this hook's settings and `noise`."""
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

    def _filter_with(self, latent: torch.Tensor, generator: GeneratorInput) -> torch.Tensor:
        return self._filter(latent, draw_noise(latent.shape, generator, latent.device))

    def init_latents(self, state: SamplerState, latents: torch.Tensor) -> torch.Tensor:
        """The start point, composed with what earlier hooks made of it (hooks run in the order given):

        * ``order="adain_first"``, or no AdaIN (``init_adain=False``, or a pipeline other than StyleID's): the
          frequency step filters the latent it receives, earlier hooks' changes included;
        * ``order="frequency_first"`` with StyleID's AdaIN: the frequency step acts on the content's z_T, before
          the AdaIN, which only the pipeline has. So it adds StyleSSP's change of the AdaIN start,
          ``AdaIN(freq(z_T^c), z_T^s) − AdaIN(z_T^c, z_T^s)``, to the latent it receives; with no earlier
          change that is exactly ``AdaIN(freq(z_T^c), z_T^s)``.
        """
        if not self.frequency:
            return latents
        extras = state.extras
        if self.order == "adain_first" or "content_zT" not in extras or not extras.get("init_adain", False):
            return self._filter_with(latents, state.generator)
        from ..pipelines.styleid_sd import adain_latents  # the pipelines import diffusers: load on use

        content, style = extras.get("content_start_zT", extras["content_zT"]), extras["style_zT"]
        start = adain_latents(content, style)  # the pipeline's start, before any hook
        filtered = adain_latents(self._filter_with(content, state.generator), style)
        if torch.equal(latents, start):  # no earlier change: the official composition, bit for bit
            return filtered
        return latents + (filtered - start)

    # ------------------------------------------------------------------ any SD / SDXL pipeline

    def _check_style_prompt(self, style_prompt, image_form: bool = False) -> Optional[str]:
        """c⁻'s text when the negative-guided inversion runs (w_inv > 1), else None (the plain inversion, which is
        what w_inv = 1 computes: ε(c⁻) + 1·(ε(c⁺) − ε(c⁻)) = ε(c⁺)).

        In the text form c⁻ is the text alone, so it is required. In the image-embedding form (IP-Adapters loaded)
        the images carry c⁻, and its text defaults to "" (the official zero text)."""
        if self.negative_inversion_scale == 0:
            return None
        if image_form:
            if style_prompt is not None and not isinstance(style_prompt, str):
                raise ValueError(
                    f"style_prompt: {style_prompt!r} is not accepted; accepted: a string (c⁻'s text) or None (\"\", "
                    "the official zero text of the image-embedding form)"
                )
            return style_prompt or ""
        if not isinstance(style_prompt, str) or not style_prompt.strip():
            raise ValueError(
                f"style_prompt: {style_prompt!r} is not accepted with StyleSSP's negative-guided inversion; accepted: "
                "a non-empty description of what the style image shows (the negative), or "
                "StyleSSP(negative_inversion=False)"
            )
        return style_prompt

    @torch.no_grad()
    def start_point(
        self,
        pipe,
        content_image,
        *,
        prompt: Optional[str] = None,
        style_prompt: Optional[str] = None,
        num_inference_steps: int = 50,
        generator: GeneratorInput = None,
        height: Optional[int] = None,
        width: Optional[int] = None,
        style_image=None,
        ip_adapter_image=None,
        negative_ip_adapter_image=None,
        ip_adapter_image_embeds: Optional[List[torch.Tensor]] = None,
        negative_ip_adapter_image_embeds: Optional[List[torch.Tensor]] = None,
        max_sequence_length: Optional[int] = None,
    ) -> torch.Tensor:
        r"""StyleSSP's start latents z_T of `content_image` for `pipe(..., latents=z_T)` (METHODS.md §5.2–5.3).

        1. z_0: the content encoded with `pipe`'s VAE (posterior mean; SDXL's `force_upcast` and per-channel
           `latents_mean` / `latents_std` honoured as the stock pipelines do);
        2. z_T: deterministic DDIM inversion of z_0 (`guidekit.inversion`) over `num_inference_steps`, each step
           with ε̃ = ε(z, c⁻) + w_inv·(ε(z, c⁺) − ε(z, c⁻)), w_inv = `inversion_guidance_scale` (one UNet call on
           the c⁺ and c⁻ rows together; SDXL with its pooled text embeddings and time ids for the image's size).
           With ``negative_inversion=False`` (or w_inv = 1) each step uses ε(z, c⁺) alone and c⁻ is not computed;
        3. the frequency manipulation `frequency_start_point` of z_T with this hook's settings, its noise drawn
           from `generator` (skipped with ``frequency=False``).

        c⁺ and c⁻ take one of two forms, chosen by whether IP-Adapters are loaded on `pipe`:

        * *text form* (no IP-Adapter): c⁺ = `prompt`, c⁻ = `style_prompt` (what the style image shows; required);
        * *image-embedding form* (``pipe.load_ip_adapter(...)`` done): every UNet call of the inversion also gets
          image embeddings, one entry per loaded adapter, c⁺'s rows from c⁺'s images and c⁻'s rows from c⁻'s.
          The official code puts four IP-Adapter-Instruct embeddings into the text context:
          c⁺ = [style query on the style image ; composition query on the content ; caption] and
          c⁻ = [style query on the content ; composition query on the style image ; zero text]. With standard
          IP-Adapters, style and composition are told apart by InstantStyle's per-block scales instead: load the
          same adapter twice, scale the first to the style blocks and the second to the layout blocks, and pass
          `style_image`. Then c⁺ = (style image → style adapter, content → layout adapter; text `prompt`) and
          c⁻ = (content → style adapter, style image → layout adapter; text `style_prompt`, "" by default: zeros
          on SDXL, the official zero text). Row b of a batch gets content image b. Block scales
          (`pipe.set_ip_adapter_scale([style, layout])`): on SDXL base ``{"up": {"block_0": [0.0, 1.0, 0.0]}}``
          and ``{"down": {"block_2": [0.0, 1.0]}}`` (InstantStyle's style and layout attention layers); on SD 1.5
          ``{"up": {"block_1": 1.0}}`` and ``{"down": {"block_2": 1.0}}`` (InstantStyle's experimental SD 1.5
          blocks). For other setups give each side's inputs per adapter: `ip_adapter_image` /
          `negative_ip_adapter_image`, or `ip_adapter_image_embeds` / `negative_ip_adapter_image_embeds`.
          What differs from the official form: the image tokens go through the adapters' own cross-attention
          (decoupled keys and values, scaled per block), not through the text cross-attention of a UNet without
          IP-Adapter layers; style and composition are separated by where the adapter acts, not by an
          instruction query; the standard adapter has 4 image tokens from the pooled CLIP embedding ("plus"
          adapters: their resampler's tokens) where IP-Adapter-Instruct has 16. The guidance equation, w_inv,
          which image goes to which role on each side, and the zero negative text are the same.

        Flow-matching pipelines (`StableDiffusion3Pipeline`, `FluxPipeline` and their guidekit subclasses): the
        text form only. z_0 is the VAE mean normalised as the pipeline's img2img encode does; step 2 is the exact
        inverse of the flow Euler step (`guidekit.inversion.flow_invert`, two fixed-point refinements per step)
        through the schedule the pipeline samples with at `num_inference_steps` (its sigmas, shift and `mu`),
        with ṽ = v(z, c⁻) + w_inv·(v(z, c⁺) − v(z, c⁻)); step 3 filters the unpacked (B, C, H, W) latent. The
        result is in the layout ``latents=`` takes (packed tokens for Flux): sample with the pipeline's own
        FlowMatchEuler scheduler, the same steps and the content's size.

        How to sample from it: use a `DDIMScheduler` built from the pipeline's scheduler config with the same
        `num_inference_steps` (the inversion walks that schedule's timesteps up), and the image's height and
        width. diffusers multiplies ``latents`` by ``scheduler.init_noise_sigma`` before the first step: it is 1
        for DDIM (and UniPC, which the official code samples with), so z_T is used as it is; with a sigma
        scheduler (Euler, init_noise_sigma ≫ 1) it would be rescaled, so this method warns
        (`UserWarning`) when `pipe`'s scheduler is one. Any ``pipe.__call__`` that accepts ``latents=`` works:
        text-to-image, ControlNet (the inversion runs without the ControlNet, as the official code's does),
        IP-Adapter (with the adapters loaded, ``ip_adapter_image`` has one entry per adapter there too).

        Examples:

        ```py
        import torch
        from diffusers import DDIMScheduler, StableDiffusionXLPipeline
        from PIL import Image

        import guidekit

        pipe = StableDiffusionXLPipeline.from_pretrained(
            "stabilityai/stable-diffusion-xl-base-1.0", torch_dtype=torch.float16
        ).to("cuda")
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        content = Image.open("content.png").convert("RGB").resize((1024, 1024))
        style = Image.open("style.png").convert("RGB")

        # text form: c⁻ is a description of the style image
        z = guidekit.StyleSSP().start_point(
            pipe, content, prompt="a photo of a lighthouse on a cliff", style_prompt="a starry night over a village",
            num_inference_steps=50, generator=torch.Generator("cuda").manual_seed(0),
        )

        # image-embedding form: one IP-Adapter twice, on the style blocks and on the layout blocks
        pipe.load_ip_adapter("h94/IP-Adapter", subfolder="sdxl_models", weight_name=["ip-adapter_sdxl.bin"] * 2)
        pipe.set_ip_adapter_scale([{"up": {"block_0": [0.0, 1.0, 0.0]}}, {"down": {"block_2": [0.0, 1.0]}}])
        z = guidekit.StyleSSP().start_point(
            pipe, content, prompt="a photo of a lighthouse on a cliff", style_image=style,
            num_inference_steps=50, generator=torch.Generator("cuda").manual_seed(0),
        )

        # sampling with the style adapter only (the official sampling stage: style blocks, scale 2.5)
        pipe.set_ip_adapter_scale([{"up": {"block_0": [0.0, 2.5, 0.0]}}, 0.0])
        image = pipe(
            "a lighthouse on a cliff", latents=z, num_inference_steps=50, height=1024, width=1024,
            ip_adapter_image=[style, content],
        ).images[0]
        ```

        Args:
            pipe: a diffusers Stable Diffusion 1.x/2.x or SDXL pipeline (UNet2DConditionModel, VAE, CLIP text
                encoders), e.g. `StableDiffusionPipeline`, `StableDiffusionXLPipeline`, their ControlNet variants;
                with or without IP-Adapters loaded.
            content_image: the content: a PIL RGB image, numpy (H, W, 3) / (B, H, W, 3) (uint8 or floats in
                [0, 1]), a list of them, or torch (3, H, W) / (B, 3, H, W) in [0, 1]; width and height multiples
                of the VAE factor (8), not resized here. A batch gives one start latent per image.
            prompt (`str`, *optional*): c⁺'s text, a caption of the content (the official code: a BLIP-2
                caption); "" when None (zeros on SDXL checkpoints with `force_zeros_for_empty_prompt`).
            style_prompt (`str`, *optional*): c⁻'s text. Text form: what the style image shows, required while
                the negative inversion is on (w_inv > 1). Image-embedding form: "" when None (the official zero
                text). Ignored when the negative inversion is off.
            num_inference_steps (`int`, defaults to `50`): DDIM inversion steps; sample with the same number.
            generator (`torch.Generator` or a list of them, *optional*): the frequency step's noise; a list
                gives one generator per image.
            height, width (`int`, *optional*): the size you will sample at, checked against the image's (no
                resizing is done).
            style_image (*optional*): the style image, as `content_image` takes it (one image, any size): the
                style-transfer default of the image-embedding form, with exactly two IP-Adapters loaded
                ([style blocks, layout blocks]): c⁺ images (style image, content), c⁻ images (content, style
                image). Not together with the four per-adapter arguments below.
            ip_adapter_image (*optional*): c⁺'s images, one entry per loaded adapter in load order, each as the
                pipeline's ``ip_adapter_image`` takes it for one adapter (a PIL image, or a list of images for
                that adapter); a single image when one adapter is loaded. Encoded with `pipe.image_encoder` and
                shared by every content image.
            negative_ip_adapter_image (*optional*): c⁻'s images, as `ip_adapter_image`; required with it while
                the negative inversion is on.
            ip_adapter_image_embeds (`List[torch.Tensor]`, *optional*): c⁺'s precomputed image embeddings instead
                of `ip_adapter_image`: one tensor per loaded adapter, (rows, num_images, dim) or (rows,
                num_images, tokens, dim), rows 1 (shared) or B (row b for content image b). Unlike the
                pipeline's argument of that name they hold no classifier-free-guidance rows: c⁻ has its own.
            negative_ip_adapter_image_embeds (`List[torch.Tensor]`, *optional*): c⁻'s, as
                `ip_adapter_image_embeds`.
            max_sequence_length (`int`, *optional*): flow pipelines only: the T5 token count, as the pipeline call's
                argument of that name (the pipeline's default when None: 256 for SD3, 512 for Flux); pass the
                value you will sample with.

        Returns:
            `torch.Tensor`: z_T, (B, C, H/8, W/8), in the UNet's dtype on the pipeline's execution device.

        Raises:
            ValueError: before any model call: a pipeline that is not SD/SDXL (an inpainting UNet, an SDXL
                refiner, another image-conditioned UNet); a missing or unreadable image, a size that is not a
                multiple of the VAE factor, or one that differs from `height` / `width`; no `style_prompt` while
                the negative inversion of the text form is on; a bad `prompt`, step count or generator list.
                IP-Adapters: adapters loaded and no image input, or image inputs and no adapter loaded; a number
                of entries that is not the number of loaded adapters; `style_image` with other than two adapters
                or with the per-adapter arguments; c⁻'s images missing while the negative inversion is on; an
                image and an embedding argument for the same side; images without an image encoder on `pipe`;
                embeddings of another shape, row count or number of images than the other side's.
        """
        from ..pipelines.stylessp_start import (  # imports diffusers
            loaded_ip_adapters,
            plan_content_inversion,
            scheduler_warning,
        )
        from ..pipelines.stylessp_start_flow import flow_start_point, is_flow_pipeline

        if is_flow_pipeline(pipe):
            image_inputs = dict(style_image=style_image, ip_adapter_image=ip_adapter_image,
                                negative_ip_adapter_image=negative_ip_adapter_image,
                                ip_adapter_image_embeds=ip_adapter_image_embeds,
                                negative_ip_adapter_image_embeds=negative_ip_adapter_image_embeds)
            given = [name for name, value in image_inputs.items() if value is not None]
            if given:
                raise ValueError(
                    f"{given[0]}: the image-embedding form is not supported on {type(pipe).__name__}; accepted: the "
                    "text form (prompt and style_prompt)"
                )
            return flow_start_point(self, pipe, content_image, prompt=prompt, style_prompt=style_prompt,
                                    num_inference_steps=num_inference_steps, generator=generator, height=height,
                                    width=width, max_sequence_length=max_sequence_length)
        if max_sequence_length is not None:
            raise ValueError(
                f"max_sequence_length: {max_sequence_length!r} is for flow pipelines (SD3, Flux); {type(pipe).__name__} "
                "takes None"
            )

        negative = self._check_style_prompt(style_prompt, image_form=loaded_ip_adapters(pipe) > 0)
        plan = plan_content_inversion(
            pipe, content_image, prompt=prompt, style_prompt=negative, num_inference_steps=num_inference_steps,
            height=height, width=width, style_image=style_image, ip_adapter_image=ip_adapter_image,
            negative_ip_adapter_image=negative_ip_adapter_image, ip_adapter_image_embeds=ip_adapter_image_embeds,
            negative_ip_adapter_image_embeds=negative_ip_adapter_image_embeds,
        )
        noise = draw_noise(plan.latent_shape, generator, plan.device) if self.frequency else None
        message = scheduler_warning(pipe)
        if message is not None:
            warnings.warn(message, UserWarning, stacklevel=3)
        z_t = plan.invert(self.inversion_guidance_scale if negative is not None else None)
        start = self._filter(z_t, noise) if self.frequency else z_t  # in float32, cast once at the end
        return start.to(pipe.unet.dtype)
