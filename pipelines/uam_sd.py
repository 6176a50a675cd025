"""Uniform Attention Maps (Mo et al., WACV 2025) for Stable Diffusion 1.x/2.x: exact DDIM inversion,
faithful reconstruction of real images and adaptive mask-guided editing.

`UAMStableDiffusionPipeline` is the stock `StableDiffusionPipeline` (its `__call__` is untouched) plus
three methods:

* `invert(image, prompt="", guidance_scale=1.0, uniform=True, num_inference_steps=50)` → the noise latent and
  the whole DDIM trajectory;
* `reconstruct(image, ...)` → inversion followed by denoising, with PSNR/SSIM/MSE against the input;
* `edit(image, source_prompt, target_prompt, ...)` → UAM's Algorithm 1 on top of MasaCtrl.

The loops of `reconstruct` and `edit` live in `UAMPipelineMixin` below; `pipelines/uam_sdxl.py` reuses them
and only adds SDXL's prompt conditioning.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, StableDiffusionPipeline
from diffusers.utils import BaseOutput

from guidekit.attention import (
    MutualControl,
    MutualSelfAttnProcessor,
    SwitchedUniformProcessor,
    UniformControl,
    attention_layers,
    pair_kv_rows,
    replaced_processors,
)
from guidekit.checks import check_choice, check_number
from guidekit.guidance.cfg import CFG
from guidekit.hooks import HookChain, SamplerHook, SamplerState, resolve_guidance_scale
from guidekit.inversion import ddim_invert, ddim_levels, ddim_step, predicted_x0
from guidekit.metrics import fidelity, lpips_note
from guidekit.precision import math_dtype
from guidekit.uam import (
    DILATE_TARGETS,
    THRESHOLD_RULES,
    adaptive_masks,
    blend_x0,
    mask_active,
    quantile_schedule,
)

from .hooked import SharedComponentsMixin
from .images import ImageInput, ImageLatentsMixin

__all__ = [
    "UAMStableDiffusionPipeline",
    "UAMPipelineMixin",
    "UAMInversionOutput",
    "UAMReconstructionOutput",
    "UAMEditOutput",
]

@dataclass
class UAMInversionOutput(BaseOutput):
    """Output of `invert`.

    Attributes:
        latents (`torch.Tensor`): the inverted noise latents z_T, (B, 4, h, w).
        trajectory (`list[torch.Tensor]`): N + 1 latents from z_0 (the VAE encoding) to z_T.
        timesteps (`list[int]`): the denoising timesteps τ_0 > ... > τ_{N−1}.
    """

    latents: torch.Tensor
    trajectory: List[torch.Tensor]
    timesteps: List[int]


@dataclass
class UAMReconstructionOutput(BaseOutput):
    """Output of `reconstruct`.

    Attributes:
        images: the reconstructions (PIL list, numpy array or tensor, by `output_type`).
        metrics (`list[dict]`): per image, `psnr` (dB), `ssim`, `mse` against the input ([0, 1] RGB), and
            `lpips` when its weights are available offline.
        notes (`list[str]`): e.g. why LPIPS was skipped.
        latents (`torch.Tensor`): the inverted noise latents the reconstruction started from.
    """

    images: Any
    metrics: List[Dict[str, float]]
    notes: List[str]
    latents: torch.Tensor


@dataclass
class UAMEditOutput(BaseOutput):
    """Output of `edit`.

    Attributes:
        images: the edited images (target branch).
        masks (`np.ndarray` or None): per image, (H, W) in [0, 1]: the fraction of latent channels in the
            edit mask M_edit of the last step the mask was applied (None when no mask was used).
        source_images: the source branch's reconstructions.
    """

    images: Any
    masks: Optional[np.ndarray]
    source_images: Any


def _check_steps(num_inference_steps) -> int:
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps: {num_inference_steps!r} is not accepted; accepted: an integer >= 1")
    return num_inference_steps


#: MasaCtrl's (and the UAM paper's) first step with mutual self-attention.
DEFAULT_START_STEP = 4


def _check_start_step(start_step, num_inference_steps: int) -> int:
    """The first MasaCtrl step: None gives the default 4, clamped so that short runs (fewer than 4 steps)
    work without the caller choosing a value; a value the caller passed must lie in [0, num_inference_steps]."""
    if start_step is None:
        return min(DEFAULT_START_STEP, num_inference_steps)
    if isinstance(start_step, bool) or not isinstance(start_step, int) or not 0 <= start_step <= num_inference_steps:
        raise ValueError(
            f"start_step: {start_step!r} is not accepted with num_inference_steps={num_inference_steps}; "
            f"accepted: an integer in [0, {num_inference_steps}], or None for min(4, num_inference_steps)"
        )
    return start_step


def _check_bool(name: str, value) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name}: {value!r} is not accepted; accepted: True or False")
    return bool(value)


def _prompt_list(name: str, prompt, batch: int) -> List[str]:
    if isinstance(prompt, str):
        return [prompt] * batch
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) for p in prompt):
        if len(prompt) != batch:
            raise ValueError(f"{name}: {len(prompt)} prompts for {batch} images; accepted: a string or one prompt per image")
        return list(prompt)
    raise ValueError(f"{name}: {prompt!r} is not accepted; accepted: a string or a non-empty list of strings")


class UAMPipelineMixin(ImageLatentsMixin, SharedComponentsMixin):
    """UAM inversion, reconstruction and editing for a diffusers Stable Diffusion pipeline.

    The host class provides `unet`, `vae`, `scheduler`, `image_processor`, `vae_scale_factor` and
    `_encode_rows(prompts, height, width)`, which returns the UNet conditioning of one row per prompt as
    ``{"encoder_hidden_states": ..., "added_cond_kwargs": ... or None}``.
    """

    #: MasaCtrl's default start_layer by number of self-attention layers: SD 1.x/2.x (16) → 10, the paper's;
    #: SDXL (70) → 64 (see `edit`). Other UNets start at the same fraction as SD 1.x, round(n · 10 / 16).
    masactrl_start_layers = {16: 10, 70: 64}

    # ------------------------------------------------------------------ conditioning and model calls

    def _conditioning(self, prompts: Sequence[str], height: int, width: int) -> Dict[str, Any]:
        """Conditioning of one row per prompt, encoding each distinct prompt once."""
        unique = list(dict.fromkeys(prompts))
        rows = self._encode_rows(unique, height, width)
        index = torch.tensor([unique.index(p) for p in prompts])
        return _take(rows, index)

    def _uam_scheduler(self, num_inference_steps: int) -> DDIMScheduler:
        """A DDIM scheduler with this pipeline's noise schedule (the user's scheduler is left untouched)."""
        scheduler = DDIMScheduler.from_config(self.scheduler.config)
        scheduler.set_timesteps(num_inference_steps, device=self._execution_device)
        return scheduler

    @property
    def _prediction_type(self) -> str:
        return self.scheduler.config.get("prediction_type", "epsilon")

    def _processors(self, start_layer: Optional[int]):
        """Uniform (all cross-attention layers) and MasaCtrl (self-attention layers >= start_layer) processors
        behind shared switches, both off; restored when the returned context manager exits."""
        uniform, mutual = UniformControl(enabled=False), MutualControl(enabled=False)
        original = self.unet.attn_processors
        replacements = {n: SwitchedUniformProcessor(original[n], uniform) for n in attention_layers(self.unet, "cross")}
        if start_layer is not None:
            for name in attention_layers(self.unet, "self")[start_layer:]:
                replacements[name] = MutualSelfAttnProcessor(original[name], mutual)
        return replaced_processors(self.unet, replacements), uniform, mutual

    # ------------------------------------------------------------------ inversion

    @torch.no_grad()
    def invert(
        self,
        image: ImageInput,
        prompt: Union[str, List[str]] = "",
        guidance_scale: float = 1.0,
        uniform: bool = True,
        num_inference_steps: int = 50,
    ) -> UAMInversionOutput:
        r"""Exact DDIM inversion (`guidekit.inversion`) of real images, with or without uniform maps.

        Args:
            image: RGB image(s): PIL, numpy (H, W, 3)/(B, H, W, 3) (uint8 or [0, 1]) or torch (B, 3, H, W) in
                [0, 1]. Width and height must be multiples of the VAE factor.
            prompt (`str` or `list[str]`, defaults to ``""``): the text the UNet sees. UAM uses the null
                prompt; with uniform maps a prompt has no spatial influence, only its token-mean value.
            guidance_scale (`float`, defaults to `1.0`): CFG scale during inversion, `u + w (c − u)` with the
                null prompt as u; 1 (the default, and UAM's setting) runs the conditional pass only.
            uniform (`bool`, defaults to `True`): uniform cross-attention maps in every cross-attention layer
                and step. `False` with a prompt and a guidance scale is plain DDIM inversion, the baseline.
            num_inference_steps (`int`, defaults to `50`): DDIM steps N (the paper: 50).
        """
        image01 = self._prepare_image(image)
        z0 = self._encode_image(image01)
        prompts = _prompt_list("prompt", prompt, z0.shape[0])
        scale = check_number("guidance_scale", guidance_scale, 0.0)
        uniform = _check_bool("uniform", uniform)
        _check_steps(num_inference_steps)
        scheduler = self._uam_scheduler(num_inference_steps)
        height, width = image01.shape[-2:]
        cond = self._conditioning(prompts, height, width)
        uncond = self._conditioning([""] * len(prompts), height, width) if scale > 1 else None

        context, uniform_ctl, _ = self._processors(start_layer=None)
        with context:
            uniform_ctl.set(enabled=bool(uniform))
            model = self._guided_model(cond, uncond, scale)
            out = ddim_invert(model, z0, ddim_levels(scheduler), self._prediction_type)
        return UAMInversionOutput(latents=out.latents, trajectory=out.trajectory, timesteps=out.timesteps)

    def _guided_model(self, cond, uncond, scale: float):
        """model(x, t): the CFG combination `u + w (c − u)`, or the conditional prediction when w <= 1."""

        def model(x, t):
            if uncond is None:
                return self._unet_pred(x, t, cond)
            both = self._unet_pred(torch.cat([x, x]), t, _cat([uncond, cond]))
            pred_u, pred_c = both.chunk(2)
            return pred_u + scale * (pred_c - pred_u)

        return model

    # ------------------------------------------------------------------ reconstruction

    @torch.no_grad()
    def reconstruct(
        self,
        image: ImageInput,
        prompt: Union[str, List[str]] = "",
        guidance_scale: float = 1.0,
        uniform: bool = True,
        num_inference_steps: int = 50,
        generator: Optional[torch.Generator] = None,
        output_type: str = "pil",
    ) -> UAMReconstructionOutput:
        r"""Invert real images and denoise them back; report fidelity against the input.

        Inversion and denoising see the same model: the same prompt, guidance scale and attention (uniform
        maps or not). UAM's setting is the default: null prompt, w = 1, uniform maps. The baseline users
        compare against is ``uniform=False, prompt=caption, guidance_scale=7.5`` (plain DDIM inversion with
        CFG), which drifts (prompt-to-prompt issue 27).

        Args:
            image, prompt, guidance_scale, uniform, num_inference_steps: as in `invert`.
            generator (`torch.Generator`, *optional*): unused by deterministic DDIM (η = 0); accepted for the
                signature shared with the other guidekit pipelines.
            output_type (`str`, defaults to ``"pil"``): ``"pil"``, ``"np"`` or ``"pt"``.
        """
        check_choice("output_type", output_type, ("pil", "np", "pt"))
        image01 = self._prepare_image(image)
        inversion = self.invert(image01, prompt, guidance_scale, uniform, num_inference_steps)
        prompts = _prompt_list("prompt", prompt, image01.shape[0])
        scale = float(guidance_scale)
        scheduler = self._uam_scheduler(num_inference_steps)
        levels = ddim_levels(scheduler)
        height, width = image01.shape[-2:]
        cond = self._conditioning(prompts, height, width)
        uncond = self._conditioning([""] * len(prompts), height, width) if scale > 1 else None

        context, uniform_ctl, _ = self._processors(start_layer=None)
        with context:
            uniform_ctl.set(enabled=bool(uniform))
            model = self._guided_model(cond, uncond, scale)
            latents = inversion.latents
            for i, t in enumerate(levels.timesteps):
                pred = model(latents, t)
                latents = ddim_step(latents, pred, levels.alpha_bar[i], levels.alpha_bar_prev[i], self._prediction_type)

        reconstruction = self._decode_latents(latents)
        note = lpips_note()
        metrics = fidelity(reconstruction, image01)
        self.maybe_free_model_hooks()
        return UAMReconstructionOutput(
            images=self._to_output(reconstruction, output_type),
            metrics=metrics,
            notes=[note] if note else [],
            latents=inversion.latents,
        )

    # ------------------------------------------------------------------ editing

    def _default_start_layer(self) -> int:
        n = len(attention_layers(self.unet, "self"))
        return self.masactrl_start_layers.get(n, (n * 10 + 8) // 16)  # n · 10/16, rounded half up

    @torch.no_grad()
    def edit(
        self,
        image: ImageInput,
        source_prompt: Union[str, List[str]],
        target_prompt: Union[str, List[str]],
        num_inference_steps: int = 50,
        guidance_scale: Optional[float] = None,
        start_step: Optional[int] = None,
        start_layer: Optional[int] = None,
        adaptive_mask: bool = True,
        quantile: float = 0.5,
        recon_t: int = 200,
        recon_t_end: int = 0,
        dilate_radius: int = 1,
        threshold_rule: str = "code",
        dilate_target: str = "edit",
        blend_source: bool = True,
        source_conditioning: str = "null",
        hooks: Optional[Sequence[SamplerHook]] = None,
        generator: Optional[torch.Generator] = None,
        output_type: str = "pil",
    ) -> UAMEditOutput:
        r"""Edit real images with UAM's adaptive mask-guided editing (Alg. 1) on MasaCtrl.

        1. Invert z_0 twice, as one batch and without CFG: the auxiliary branch with uniform maps and the
           null prompt → z_T^u, the source branch with normal attention → z_T^src; the target starts there.
        2. Each step: the auxiliary branch (uniform maps, null prompt, no CFG); the source and target
           branches as one CFG batch, with MasaCtrl mutual self-attention (target queries read the source's
           keys/values) from `start_step` in self-attention layers from `start_layer`.
        3. While `recon_t_end < t < recon_t`: edit mask from |x̂0^src − x̂0^tgt| at the quantile q_i of the
           schedule linspace(0, quantile, N), dilated; x̂0^tgt takes the uniform branch in the kept region,
           x̂0^src in the edited one; each branch then steps with its own ε.

        Args:
            image: the source image(s), as in `invert`.
            source_prompt (`str` or `list[str]`): describes the source image (one per image, or one for all).
            target_prompt (`str` or `list[str]`): the edit; a list must have the length of `source_prompt`.
            num_inference_steps (`int`, defaults to `50`): DDIM steps.
            guidance_scale (`float`, *optional*): CFG scale of the source and target branches; None takes the
                guidance hook's, else 7.5 (the paper).
            start_step (`int`, *optional*): first step with mutual self-attention, in [0, num_inference_steps];
                equal to num_inference_steps turns it off. None: MasaCtrl's and the paper's 4, or
                num_inference_steps when there are fewer steps (a value you pass is checked, not clamped).
            start_layer (`int`, *optional*): first self-attention layer (call order: down, mid, up) with
                mutual self-attention. None: 10 of 16 on SD 1.x/2.x (the paper/MasaCtrl default) and 64 of 70
                on SDXL — the decoder's highest-resolution attention block, one of the values MasaCtrl's SDXL
                examples use, and like 10 on SD 1.x "the last 6 layers, where the decoder paints fine
                detail": the source's appearance is shared there while the lower-resolution layers follow
                the target prompt (44, the same fraction as 10/16, also copies SDXL's 30 mid-resolution
                decoder layers and resists the edit more). Other UNets: round(n · 10 / 16).
            adaptive_mask (`bool`, defaults to `True`): run the auxiliary branch and the mask; False is plain
                DDIM inversion + MasaCtrl (the paper's baseline row), 4 instead of 5 UNet rows per step.
            quantile (`float`, defaults to `0.5`): q_max in (0, 1); the official run script and README use 0.5
                (its editor function's default is 0.7).
            recon_t (`int`, defaults to `200`): the mask acts while recon_t_end < t < recon_t, in DDPM
                timesteps (200 ≈ the last 10 of 50 steps; the official run script's value, its editor
                function's default is 400).
            recon_t_end (`int`, defaults to `0`): lower end of that window.
            dilate_radius (`int`, defaults to `1`): dilation radius r (a (2r+1)² max-pool), the code's 1.
            threshold_rule (`str`, defaults to ``"code"``): ``"code"`` flags |Δ| > 2τ_i (the official code
                soft-thresholds Δ before comparing, which doubles the threshold; this is what produced the
                paper's numbers, and it edits a smaller, more confident region); ``"paper"`` flags |Δ| > τ_i.
            dilate_target (`str`, defaults to ``"edit"``): ``"edit"`` dilates the edit mask (official code;
                the edit keeps a margin to blend into its surroundings); ``"keep"`` dilates the keep mask as
                Alg. 1 writes it.
            blend_source (`bool`, defaults to `True`): also blend the source branch (the README's "red line"
                improvement, in the code and the paper's best row).
            source_conditioning (`str`, defaults to ``"null"``): the prompt of the source branch, in inversion
                and denoising. ``"null"`` (official code): "" — with CFG the source branch then predicts
                exactly ε(z, ∅) and retraces its own null-prompt inversion, so the source stays faithful;
                ``"prompt"`` (Alg. 1 line 3): `source_prompt`, which drifts at w = 7.5 as plain DDIM does.
            hooks (`list[SamplerHook]`, *optional*): guidance-slot hook for the source/target branches (CFG by
                default, e.g. `[guidekit.APG()]`) and other hooks, run on the [source, target] batch.
            generator (`torch.Generator`, *optional*): passed to the hooks' state; DDIM itself is deterministic.
            output_type (`str`, defaults to ``"pil"``): ``"pil"``, ``"np"`` or ``"pt"``.
        """
        # 0. Check inputs
        check_choice("output_type", output_type, ("pil", "np", "pt"))
        check_choice("threshold_rule", threshold_rule, THRESHOLD_RULES)
        check_choice("dilate_target", dilate_target, DILATE_TARGETS)
        check_choice("source_conditioning", source_conditioning, ("null", "prompt"))
        adaptive_mask = _check_bool("adaptive_mask", adaptive_mask)
        blend_source = _check_bool("blend_source", blend_source)
        steps = _check_steps(num_inference_steps)
        schedule = quantile_schedule(quantile, steps)
        start_step = _check_start_step(start_step, steps)
        num_self = len(attention_layers(self.unet, "self"))
        start_layer = self._default_start_layer() if start_layer is None else start_layer
        if isinstance(start_layer, bool) or not isinstance(start_layer, int) or not 0 <= start_layer <= num_self:
            raise ValueError(f"start_layer: {start_layer!r} is not accepted; accepted: an integer in [0, {num_self}] (this UNet's self-attention layers)")
        num_train = self.scheduler.config.num_train_timesteps
        for name, value in (("recon_t", recon_t), ("recon_t_end", recon_t_end)):
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= num_train:
                raise ValueError(f"{name}: {value!r} is not accepted; accepted: an integer timestep in [0, {num_train}]")
        if recon_t_end >= recon_t and adaptive_mask:
            raise ValueError(f"recon_t_end: {recon_t_end} is not below recon_t: {recon_t}; accepted: recon_t_end < recon_t")
        if isinstance(dilate_radius, bool) or not isinstance(dilate_radius, int) or dilate_radius < 0:
            raise ValueError(f"dilate_radius: {dilate_radius!r} is not accepted; accepted: an integer >= 0")
        if isinstance(source_prompt, (list, tuple)) and isinstance(target_prompt, (list, tuple)) and len(source_prompt) != len(target_prompt):
            raise ValueError(
                f"source_prompt/target_prompt: {len(source_prompt)} and {len(target_prompt)} prompts; accepted: lists of the same length"
            )
        image01 = self._prepare_image(image)
        num_prompts = max(len(p) if isinstance(p, (list, tuple)) else 1 for p in (source_prompt, target_prompt))
        if image01.shape[0] == 1 and num_prompts > 1:
            image01 = image01.expand(num_prompts, -1, -1, -1)
        batch = image01.shape[0]
        src_prompts = _prompt_list("source_prompt", source_prompt, batch)
        tgt_prompts = _prompt_list("target_prompt", target_prompt, batch)

        hooks = list(hooks or [])
        scale = resolve_guidance_scale(guidance_scale, hooks, default=7.5)
        chain = HookChain(hooks, default_guidance=CFG())
        scheduler = self._uam_scheduler(steps)
        levels = ddim_levels(scheduler)
        prediction_type = self._prediction_type
        state = SamplerState(
            num_steps=steps,
            scheduler=scheduler,
            prediction_type=prediction_type,
            guidance_scale=scale,
            generator=generator,
            extras={"pipeline": self, "unet": self.unet},
        )

        # 1. Encode image and prompts
        height, width = image01.shape[-2:]
        z0 = self._encode_image(image01)
        src_text = [""] * batch if source_conditioning == "null" else src_prompts
        null = self._conditioning([""] * batch, height, width)
        cond_src_tgt = self._conditioning(src_text + tgt_prompts, height, width)
        uncond_src_tgt = self._conditioning([""] * (2 * batch), height, width)
        cond_src = self._conditioning(src_text, height, width)

        context, uniform_ctl, mutual_ctl = self._processors(start_layer=start_layer)
        last_mask = None
        chain.validate(state)
        with context:
            # 2. Inversion: [auxiliary (uniform, null prompt), source (normal attention)] as one batch, no CFG
            if adaptive_mask:
                uniform_ctl.set(True, rows=torch.tensor([True] * batch + [False] * batch))
                model = self._guided_model(_cat([null, cond_src]), None, 1.0)
                z_t = ddim_invert(model, torch.cat([z0, z0]), levels, prediction_type).latents
                z_uam, z_src = z_t.chunk(2)
            else:
                uniform_ctl.set(False)
                z_src = ddim_invert(self._guided_model(cond_src, None, 1.0), z0, levels, prediction_type).latents
                z_uam = None
            latents = torch.cat([z_src, z_src])  # [source, target]; the target starts from z_T^src

            # 3. Denoising loop
            chain.begin(state)
            try:
                latents = chain.init_latents(state, latents)
                for i, t in enumerate(levels.timesteps):
                    ab_t, ab_prev = levels.alpha_bar[i], levels.alpha_bar_prev[i]
                    state.update(i, t, latents, model_input=latents)
                    chain.step_begin(state)

                    # 3a. auxiliary branch: uniform maps, null prompt, no CFG
                    if adaptive_mask:
                        uniform_ctl.set(True)
                        mutual_ctl.set(False)
                        pred_uam = self._unet_pred(z_uam, t, null)
                    uniform_ctl.set(False)

                    # 3b. source + target branches with CFG; MasaCtrl from start_step
                    with_uncond = chain.needs_uncond(state)
                    groups = 2 if with_uncond else 1
                    mutual_ctl.set(i >= start_step, pair_kv_rows(batch, groups) if i >= start_step else None)
                    if with_uncond:
                        pred = self._unet_pred(torch.cat([latents, latents]), t, _cat([uncond_src_tgt, cond_src_tgt]))
                        pred_uncond, pred_cond = pred.chunk(2)
                    else:
                        pred_uncond, pred_cond = None, self._unet_pred(latents, t, cond_src_tgt)
                    mutual_ctl.set(False)
                    pred = chain.guide(state, pred_cond, pred_uncond)
                    pred = chain.correct(state, pred)

                    # 3c. adaptive mask and x0 blend, then each branch's own DDIM step
                    if adaptive_mask and mask_active(t, recon_t, recon_t_end):
                        x0 = predicted_x0(latents, pred, ab_t, prediction_type)
                        eps = _predicted_eps(latents, pred, ab_t, prediction_type)
                        x0_src, x0_tgt = x0.chunk(2)
                        x0_uam = predicted_x0(z_uam, pred_uam, ab_t, prediction_type)
                        m_edit, m_keep = adaptive_masks(
                            x0_src, x0_tgt, float(schedule[i]), dilate_radius, threshold_rule, dilate_target
                        )
                        x0_src, x0_tgt = blend_x0(x0_src, x0_tgt, x0_uam, m_edit, m_keep, blend_source)
                        x0 = torch.cat([x0_src, x0_tgt])
                        alpha_prev, sigma_prev = _alpha_sigma(ab_prev)
                        latents = (alpha_prev * x0 + sigma_prev * eps).to(latents.dtype)
                        last_mask = m_edit
                    else:
                        latents = ddim_step(latents, pred, ab_t, ab_prev, prediction_type)
                    if adaptive_mask:
                        z_uam = ddim_step(z_uam, pred_uam, ab_t, ab_prev, prediction_type)
                    state.latents = latents
                    chain.step_end(state)
            finally:
                chain.end(state)

        # 4. Decode
        decoded = self._decode_latents(latents)
        source01, target01 = decoded.chunk(2)
        masks = None
        if last_mask is not None:
            m = last_mask.float().mean(dim=1, keepdim=True)
            masks = F.interpolate(m, size=(height, width), mode="nearest")[:, 0].cpu().numpy()
        self.maybe_free_model_hooks()
        return UAMEditOutput(
            images=self._to_output(target01, output_type),
            masks=masks,
            source_images=self._to_output(source01, output_type),
        )


# ---------------------------------------------------------------------------- helpers


def _predicted_eps(x_t, pred, alpha_bar_t, prediction_type: str) -> torch.Tensor:
    """The model's ε estimate at level ᾱ_t, in the math dtype of x_t's device (no float64 on MPS)."""
    alpha, sigma = _alpha_sigma(alpha_bar_t)
    dtype = math_dtype(x_t.device)
    x_t, pred = x_t.to(dtype), pred.to(dtype)
    if prediction_type == "epsilon":
        return pred
    if prediction_type == "v_prediction":
        return alpha * pred + sigma * x_t
    if prediction_type == "sample":
        return (x_t - alpha * pred) / sigma
    raise ValueError(f"prediction_type: {prediction_type!r} is not supported; accepted: 'epsilon', 'v_prediction', 'sample'")


def _alpha_sigma(alpha_bar) -> tuple:
    """(α, σ) = (√ᾱ, √(1 − ᾱ)) as Python floats: exact for a float64 ᾱ, and usable with tensors on any device."""
    ab = float(alpha_bar)
    return math.sqrt(ab), math.sqrt(1.0 - ab)


def _take(cond: Dict[str, Any], index: torch.Tensor) -> Dict[str, Any]:
    added = cond.get("added_cond_kwargs")
    return {
        "encoder_hidden_states": cond["encoder_hidden_states"][index.to(cond["encoder_hidden_states"].device)],
        "added_cond_kwargs": None if added is None else {k: v[index.to(v.device)] for k, v in added.items()},
    }


def _cat(conds: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    added = [c.get("added_cond_kwargs") for c in conds]
    return {
        "encoder_hidden_states": torch.cat([c["encoder_hidden_states"] for c in conds]),
        "added_cond_kwargs": None if added[0] is None else {k: torch.cat([a[k] for a in added]) for k in added[0]},
    }


# ---------------------------------------------------------------------------- SD 1.x / 2.x


class UAMStableDiffusionPipeline(UAMPipelineMixin, StableDiffusionPipeline):
    """`StableDiffusionPipeline` with UAM inversion, reconstruction and editing.

    Loads like the stock pipeline (`from_pretrained`, `from_pipe`); `__call__` is the stock text-to-image.

    Example:
        >>> from guidekit.pipelines import UAMStableDiffusionPipeline
        >>> pipe = UAMStableDiffusionPipeline.from_pretrained("path/or/hub-id")
        >>> rec = pipe.reconstruct(image)                       # UAM: uniform maps, null prompt
        >>> rec.metrics[0]["psnr"]
        >>> out = pipe.edit(image, "a red circle on a blue background", "a green circle on a blue background")
        >>> out.images[0], out.masks[0]
    """

    def _encode_rows(self, prompts: List[str], height: int, width: int) -> Dict[str, Any]:
        embeds, _ = self.encode_prompt(prompts, self._execution_device, 1, False)
        return {"encoder_hidden_states": embeds, "added_cond_kwargs": None}
