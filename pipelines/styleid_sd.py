"""StyleID (Chung, Hyun, Heo; "Style Injection in Diffusion: A Training-free Approach for Adapting Large-scale
Diffusion Models for Style Transfer", CVPR 2024) for Stable Diffusion 1.x/2.x: training-free style transfer
that needs no weights beyond the base model.

`StyleIDStableDiffusionPipeline` is the stock `StableDiffusionPipeline` (its `__call__` is untouched) plus
`transfer(content_image, style_image, ...)`:

1. exact DDIM inversion (`guidekit.inversion`) of the style and of the content, empty prompt, no CFG; in the
   injection layers the style's self-attention keys/values and the content's queries are recorded at every
   timestep (`guidekit.attention.StyleIDAttnProcessor`);
2. the start point: AdaIN of the content's z_T to the style's z_T per-channel statistics (`adain_latents`),
   then the hooks' `init_latents` (where a start-point method such as StyleSSP plugs in). Optionally (StyleSSP's
   negative-guided inversion, ``negative_inversion_scale``) the content's z_T for the start point comes from a
   second, guided inversion that is pushed away from what the style image shows;
3. DDIM sampling with the empty prompt and no CFG; at every step the injection layers attend with the
   style's K/V, query preservation γ·Q_c + (1−γ)·Q_cs and attention temperature T;
4. decode.

The style's inversion (its z_T and K/V features) is cached per pipeline, so one style applied to many
contents is inverted once; the key holds every input of that inversion and no model object. The inversion
trajectories, start point and sampled latents are float32 whatever the UNet's dtype (half-precision UNets get
their input cast at each call). The loop lives in `StyleIDPipelineMixin` so that other pipeline families reuse it
with their own prompt conditioning: `pipelines/styleid_sdxl.py` (SDXL) adds only its `_encode_rows` and the VAE
latent statistics.
"""

from __future__ import annotations

import hashlib
import itertools
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from diffusers.utils import BaseOutput

from guidekit.attention import StyleIDAttnProcessor, StyleIDControl, replaced_processors, resolve_styleid_layers
from guidekit.checks import check_choice, check_number
from guidekit.guidance.cfg import CFG
from guidekit.hooks import HookChain, HookConflictError, SamplerHook, SamplerState, as_hook_list
from guidekit.inversion import check_invertible, ddim_invert, ddim_levels, ddim_step
from guidekit.precision import math_dtype

from .hooked import SharedComponentsMixin
from .images import OUTPUT_TYPES, ImageInput, ImageLatentsMixin
from .uam_sd import _check_bool, _check_steps

__all__ = [
    "DEFAULT_GAMMA",
    "DEFAULT_TEMPERATURE",
    "StyleIDOutput",
    "StyleIDPipelineMixin",
    "StyleIDStableDiffusionPipeline",
    "adain_latents",
]

#: Query preservation γ of the official code (its "high style fidelity" preset uses 0.3).
DEFAULT_GAMMA = 0.75
#: Attention temperature T of the official code.
DEFAULT_TEMPERATURE = 1.5


@dataclass
class StyleIDOutput(BaseOutput):
    """Output of `transfer`.

    Attributes:
        images: the stylised images (PIL list, numpy array or tensor, by `output_type`).
        start_latents (`torch.Tensor`): the latent sampling started from (after the AdaIN and the hooks'
            `init_latents`), (1, 4, h, w), float32 (or the UNet's dtype when wider).
        layers (`list[str]`): the injection layers used (processor names).
    """

    images: Any
    start_latents: torch.Tensor
    layers: List[str]


def adain_latents(content: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
    """StyleID's initial-latent AdaIN: ``σ_s · (z_c − μ_c) / σ_c + μ_s``.

    μ and σ are the mean and the (unbiased, torch's default) standard deviation over the spatial dims, per
    sample and per channel. No ε is added to σ_c (the official LDM code; its diffusers port adds 1e-4); a
    constant content channel is refused. Computed in `guidekit.precision.math_dtype` (float64; float32 on
    MPS) and returned in the content's dtype, so ``adain_latents(z, z)`` gives back z to float precision.

    Args:
        content (`torch.Tensor`): z_T^c, (B, C, H, W).
        style (`torch.Tensor`): z_T^s, (B or 1, C, H', W'); its spatial size may differ from the content's.
    """
    if content.ndim != 4 or style.ndim != 4 or content.shape[1] != style.shape[1]:
        raise ValueError(
            f"content/style: latents of shapes {tuple(content.shape)} and {tuple(style.shape)}; accepted: (B, C, H, W) "
            "with the same C"
        )
    if style.shape[0] not in (1, content.shape[0]):
        raise ValueError(f"style: {style.shape[0]} latents for {content.shape[0]} contents; accepted: 1 or one per content")
    dtype = math_dtype(content.device)
    c = content.to(dtype)
    s = style.to(content.device, dtype)
    mu_c, sd_c = c.mean(dim=(-2, -1), keepdim=True), c.std(dim=(-2, -1), keepdim=True)
    mu_s, sd_s = s.mean(dim=(-2, -1), keepdim=True), s.std(dim=(-2, -1), keepdim=True)
    if not bool((sd_c > 0).all()):
        raise ValueError("content: a latent channel is constant (zero std), so AdaIN is undefined; accepted: non-constant latents")
    return (sd_s * (c - mu_c) / sd_c + mu_s).to(content.dtype)


def _check_prompt(name: str, value) -> Optional[str]:
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{name}: {value!r} is not accepted; accepted: a string or None")
    return value


def _tensor_key(digest, tensor: torch.Tensor) -> None:
    """Feed a tensor's shape, dtype and float32 values into a hashlib digest."""
    data = tensor.detach().to(torch.float32).cpu().contiguous()
    digest.update(f"{tuple(data.shape)}{tensor.dtype}".encode())
    digest.update(data.numpy().tobytes())


def _image_key(image01: torch.Tensor) -> str:
    """Content hash of an image tensor (its float32 values and shape)."""
    digest = hashlib.sha256()
    _tensor_key(digest, image01)
    return digest.hexdigest()


def _conditioning_key(rows: Dict[str, Any]) -> str:
    """Content hash of UNet conditioning rows (the empty prompt's embedding, SDXL's pooled embedding and time
    ids): it changes with the text encoder, its tokenizer or its adapters."""
    digest = hashlib.sha256()
    added = rows.get("added_cond_kwargs") or {}
    for name, tensor in [("encoder_hidden_states", rows["encoder_hidden_states"]), *sorted(added.items())]:
        digest.update(name.encode())
        _tensor_key(digest, tensor)
    return digest.hexdigest()


# Model objects get serial numbers that are never reused (unlike `id`) and are held weakly, so a cache key can
# name a model without keeping it alive.
_SERIALS: "weakref.WeakKeyDictionary[torch.nn.Module, int]" = weakref.WeakKeyDictionary()
_NEXT_SERIAL = itertools.count()


def _serial(module: torch.nn.Module) -> int:
    serial = _SERIALS.get(module)
    if serial is None:
        serial = _SERIALS[module] = next(_NEXT_SERIAL)
    return serial


def _model_key(module: torch.nn.Module) -> str:
    """Hash of what decides a model's output besides its weights' values: the module objects it is made of
    (loading, unloading or deleting a LoRA adapter swaps layers), each peft tuner layer's active adapters,
    their scalings (``set_adapters`` weights, ``fuse_lora`` scales), merged adapters and whether adapters are
    disabled, and FreeU's factors on the up blocks. An in-place change of weight values is not seen."""
    digest = hashlib.sha256()
    for name, m in module.named_modules():
        digest.update(f"{name}:{_serial(m)};".encode())
        scaling = getattr(m, "scaling", None)
        if isinstance(scaling, dict) and hasattr(m, "active_adapters"):  # a peft BaseTunerLayer
            state = (
                list(m.active_adapters),
                sorted((str(k), repr(v)) for k, v in scaling.items()),
                list(getattr(m, "merged_adapters", ())),
                bool(getattr(m, "disable_adapters", False)),
            )
            digest.update(repr(state).encode())
    freeu = [tuple(getattr(b, k, None) for k in ("s1", "s2", "b1", "b2")) for b in getattr(module, "up_blocks", ())]
    digest.update(repr(freeu).encode())
    return digest.hexdigest()


class _StyleCache(OrderedDict):
    """The style inversions, least recently used first (a subclass, so the models' finalizers can refer to
    it weakly)."""

    def drop(self, key) -> None:
        entry = self.pop(key, None)
        if entry is not None:
            entry.release()

    def drop_all(self) -> None:
        for key in list(self):
            self.drop(key)


def _drop_cached(cache_ref, key) -> None:
    """Finalizer of a model a cached style was inverted with: the entry can never be served again."""
    cache = cache_ref()
    if cache is not None:
        cache.drop(key)


@dataclass
class _StyleEntry:
    """A cached style inversion: z_T, and the style's K/V (empty when recorded without injection).

    It holds no model: finalizers on the models it was computed with drop it when one is freed."""

    latents: torch.Tensor
    features: Dict[Tuple[str, int], Dict[str, torch.Tensor]]
    finalizers: tuple = ()

    def release(self) -> None:
        for finalizer in self.finalizers:
            finalizer.detach()
        self.finalizers = ()


class StyleIDPipelineMixin(ImageLatentsMixin, SharedComponentsMixin):
    """StyleID style transfer for a diffusers Stable Diffusion pipeline (SD 1.x/2.x, SDXL).

    The host class provides `unet`, `vae`, `scheduler`, `image_processor`, `vae_scale_factor` and
    `_encode_rows(prompts, height, width)`, which returns the UNet conditioning of one row per prompt as
    ``{"encoder_hidden_states": ..., "added_cond_kwargs": ... or None}``. The rows of one call are batched
    into one UNet call (the negative-guided inversion's c⁺ and c⁻), so `_encode_rows` returns every
    conditioning tensor with one row per prompt.
    """

    #: How many style inversions the pipeline keeps (most recently used first out last). Each holds the
    #: style's K/V in every injection layer and step: about 1.2 GB in fp16 for SD 1.x at 512² and 50 steps,
    #: about 3.1 GB for SDXL at 1024².
    style_cache_size: int = 1

    # ------------------------------------------------------------------ style cache

    def _style_cache(self) -> _StyleCache:
        cache = self.__dict__.get("_styleid_style_cache")
        if cache is None:
            cache = _StyleCache()
            self.__dict__["_styleid_style_cache"] = cache
        return cache

    def clear_style_cache(self) -> None:
        """Drop the cached style inversions (needed after changing model weights in place, e.g.
        ``load_state_dict`` into the same UNet, which the cache key does not see)."""
        self._style_cache().drop_all()

    def _style_cache_key(self, style01: torch.Tensor, steps: int, layers: Tuple[str, ...], null_key: str, processors) -> tuple:
        """Every input of the style's inversion: the image, steps, layers, scheduler config, the empty prompt's
        conditioning (`null_key`: the text encoders), the UNet's and the VAE's objects, adapters and FreeU
        (`_model_key`), the attention processor types, the pipeline's fused LoRA names, dtypes and device."""
        scheduler = repr(sorted((k, repr(v)) for k, v in dict(self.scheduler.config).items()))
        return (
            _image_key(style01),
            steps,
            layers,
            scheduler,
            null_key,
            _model_key(self.unet),
            _model_key(self.vae),
            tuple((name, type(p).__qualname__) for name, p in processors.items()),
            tuple(sorted(getattr(self, "_merged_adapters", ()) or ())),
            str(self.unet.dtype),
            str(self.vae.dtype),
            str(self._execution_device),
        )

    def _store_style(self, key: tuple, entry: _StyleEntry) -> None:
        """Cache `entry` under `key` (evicting the least recently used), dropped when the UNet or VAE it was
        computed with is freed."""
        cache = self._style_cache()
        cache.drop(key)
        if self.style_cache_size <= 0:
            return
        cache_ref = weakref.ref(cache)
        entry.finalizers = tuple(weakref.finalize(m, _drop_cached, cache_ref, key) for m in (self.unet, self.vae))
        cache[key] = entry
        while len(cache) > self.style_cache_size:
            cache.drop(next(iter(cache)))

    # ------------------------------------------------------------------ model calls

    def _invert_negative_guided(self, z0, levels, height: int, width: int, positive: str, negative: str, scale: float):
        """DDIM inversion of the clean latent z0 with ε̃ = ε(c⁺) + s·(ε(c⁺) − ε(c⁻)) (one UNet call of 2 rows
        per step; no features recorded). Returns z_T."""
        rows = self._encode_rows([positive, negative], height, width)

        def model(x, t):
            pred = self._unet_pred(torch.cat([x, x]), t, rows)
            pos, neg = pred.to(x.dtype).chunk(2)
            return pos + scale * (pos - neg)

        return ddim_invert(model, z0, levels, self._prediction_type).latents

    def _negative_scale(self, explicit, hooks) -> float:
        """The negative-guided inversion's scale: the explicit argument, else the one the hooks ask for, else 0."""
        if explicit is not None:
            return check_number("negative_inversion_scale", explicit, 0.0)
        asked = []
        for hook in hooks:
            value = getattr(hook, "negative_inversion_scale", None)
            if value is not None:
                asked.append((hook, float(value)))
        if len({v for _, v in asked}) > 1:
            raise ValueError(
                f"hooks: {asked[0][0]!r} and {asked[1][0]!r} ask for different negative-guided inversion scales; "
                "accepted: one scale (or pass negative_inversion_scale explicitly)"
            )
        return asked[0][1] if asked else 0.0

    @property
    def _latent_dtype(self) -> torch.dtype:
        """The dtype the inversion trajectory and the sampled latents are kept in: float32, or the UNet's when
        wider. A half-precision UNet gets its input cast at each call (the official code keeps its latents in
        float32 under autocast); the recorded K/V stay in the UNet's dtype."""
        return torch.promote_types(self.unet.dtype, torch.float32)

    def _invert_recording(self, image01, levels, control: StyleIDControl, keys: Sequence[str], null=None):
        """Encode and DDIM-invert one image with the empty prompt (conditioning rows `null`, computed when
        None) and no CFG, recording the `keys` features (none when empty) of the injection layers at every
        timestep. Returns (z_0, z_T, features)."""
        height, width = image01.shape[-2:]
        if null is None:
            null = self._encode_rows([""], height, width)
        store: Dict[Tuple[str, int], Dict[str, torch.Tensor]] = {}

        def model(x, t):
            control.timestep = int(t)
            return self._unet_pred(x, t, null)

        z0 = self._encode_image(image01, self._latent_dtype)
        if keys:
            control.record(store, keys)
        else:
            control.off()
        try:
            z_t = ddim_invert(model, z0, levels, self._prediction_type).latents
        finally:
            control.off()
        return z0, z_t, store

    @property
    def _prediction_type(self) -> str:
        return self.scheduler.config.get("prediction_type", "epsilon")

    # ------------------------------------------------------------------ transfer

    @torch.no_grad()
    def transfer(
        self,
        content_image: ImageInput,
        style_image: ImageInput,
        *,
        num_inference_steps: int = 50,
        gamma: float = DEFAULT_GAMMA,
        temperature: float = DEFAULT_TEMPERATURE,
        layers: Union[None, str, Sequence[str]] = None,
        hooks: Union[SamplerHook, Sequence[SamplerHook], None] = None,
        content_prompt: Optional[str] = None,
        style_prompt: Optional[str] = None,
        generator: Union[None, torch.Generator, List[torch.Generator]] = None,
        output_type: str = "pil",
        negative_inversion_scale: Optional[float] = None,
        init_adain: bool = True,
        attn_injection: bool = True,
        cache_style: bool = True,
    ) -> StyleIDOutput:
        r"""Transfer the style of `style_image` onto `content_image` with StyleID.

        Args:
            content_image, style_image: one RGB image each: PIL, numpy (H, W, 3) (uint8 or floats in [0, 1]) or
                torch (1, 3, H, W) / (3, H, W) in [0, 1]. Width and height must be multiples of the VAE factor;
                the two images may have different sizes (the output has the content's).
            num_inference_steps (`int`, defaults to `50`): DDIM steps of each inversion and of the sampling
                (the official LDM code: 50; its diffusers port: 20).
            gamma (`float`, defaults to `0.75`): query preservation γ in [0, 1]: Q̃ = γ·Q_c + (1−γ)·Q_cs.
                Larger keeps more of the content; the official "high style fidelity" setting is 0.3.
            temperature (`float`, defaults to `1.5`): attention temperature T > 0; the injected layers'
                logits are T · Q̃ K_sᵀ / √d (T > 1 sharpens the attention).
            layers (`str` or `list[str]`, *optional*): the injection layers: None or ``"paper"`` for the
                official LDM code's (every self-attention of the last two up blocks: 6 layers on SD 1.x/2.x;
                on SDXL the same rule gives the 6 of ``up_blocks.1``, guidekit's extension, see
                `pipelines/styleid_sdxl.py`),
                ``"diffusers"`` for the official diffusers port's (the same without the first attention module:
                5 layers on SD 1.x/2.x, 4 on SDXL), or
                a list of self-attention layer names (see `guidekit.attention.styleid_layers`).
            hooks (`list[SamplerHook]`, *optional*): run in the sampling loop (`init_latents` receives the
                AdaIN start point; `step_begin`, `correct`, `step_end` run each step). Hooks that fill the
                guidance slot are refused: StyleID samples without guidance. `state.extras` holds
                ``"pipeline"``, ``"unet"``, ``"content_z0"``, ``"content_zT"`` (the plain inversion's),
                ``"content_start_zT"`` (the content z_T the start point is built from: the negative-guided
                inversion's when it runs, else ``"content_zT"``), ``"style_zT"``, ``"content_image"``,
                ``"style_image"`` ([0, 1] tensors), ``"content_prompt"``, ``"style_prompt"``, ``"init_adain"``
                and ``"negative_inversion_scale"``. A hook with a ``negative_inversion_scale`` attribute (such
                as `guidekit.StyleSSP`) asks for the negative-guided inversion.
            content_prompt, style_prompt (`str`, *optional*): not used by StyleID, which inverts and samples
                with the empty prompt. The negative-guided inversion uses them as c⁺ (a caption of the
                content; "" when None) and c⁻ (what the style image shows; required there). Passed to the
                hooks in `state.extras`.
            generator (`torch.Generator` or a list of them, *optional*): unused by deterministic DDIM (η = 0);
                passed to the hooks' state (StyleSSP draws its noise from it).
            output_type (`str`, defaults to ``"pil"``): ``"pil"``, ``"np"`` or ``"pt"``.
            init_adain (`bool`, defaults to `True`): start from the AdaIN of the content's z_T to the style's
                statistics; False starts from the content's z_T (the official ``--without_init_adain``).
            attn_injection (`bool`, defaults to `True`): False samples with the ordinary attention, AdaIN
                only (the official ``--without_attn_injection``); no style K/V or content Q are recorded then.
            cache_style (`bool`, defaults to `True`): reuse (and store) the style's inversion, keyed by every
                input of it: the style image's content hash, the steps, the layers, the scheduler config, the
                empty prompt's conditioning (so the text encoders and their adapters), the UNet's and the VAE's
                module objects, their peft adapters (active names, scales, merged, disabled), FreeU, the
                attention processor types, fused LoRA names, dtypes and device. Weight values changed in place
                (``load_state_dict`` into the same modules) are not seen: call `clear_style_cache`. The cache
                holds no model: an entry goes when the UNet or VAE it was inverted with is freed. See
                `style_cache_size`.
            negative_inversion_scale (`float`, *optional*): StyleSSP's negative-guided inversion (Xu et al.,
                CVPR 2025; METHODS.md §5.3). s > 0 inverts the content a second time with
                ε̃ = ε(z, c⁺) + s·(ε(z, c⁺) − ε(z, c⁻)) at every inversion step, c⁺ = `content_prompt` ("" when
                None), c⁻ = `style_prompt`, and builds the start point from that z_T; the plain inversion
                still supplies the injected queries. This is the official ε(c⁻) + w_inv·(ε(c⁺) − ε(c⁻)) with
                s = w_inv − 1 (official w_inv = 1.5, i.e. s = 0.5). The official c⁺/c⁻ hold IP-Adapter-Instruct
                image tokens (the style image's "composition" in c⁻) besides the caption; these pipelines
                have no such encoder, so the style image's content enters as text, `style_prompt`. None (default)
                takes the scale a hook asks for (`guidekit.StyleSSP`), else 0; 0 runs no second inversion
                (exact StyleID). Costs one more inversion of 2 UNet rows per step.
        """
        # 0. Check inputs (all of them before any model call)
        steps = _check_steps(num_inference_steps)
        gamma = check_number("gamma", gamma, 0.0, 1.0)
        temperature = check_number("temperature", temperature, 0.0, low_open=True)
        check_choice("output_type", output_type, OUTPUT_TYPES)
        init_adain = _check_bool("init_adain", init_adain)
        attn_injection = _check_bool("attn_injection", attn_injection)
        cache_style = _check_bool("cache_style", cache_style)
        content_prompt = _check_prompt("content_prompt", content_prompt)
        style_prompt = _check_prompt("style_prompt", style_prompt)
        hook_list = as_hook_list(hooks)
        negative_scale = self._negative_scale(negative_inversion_scale, hook_list)
        if negative_scale > 0 and style_prompt is None:
            raise ValueError(
                "style_prompt: None is not accepted with the negative-guided inversion (negative_inversion_scale "
                f"{negative_scale}); accepted: a description of what the style image shows"
            )
        content01 = self._prepare_image(content_image, "content_image")
        style01 = self._prepare_image(style_image, "style_image")
        for name, tensor in (("content_image", content01), ("style_image", style01)):
            if tensor.shape[0] != 1:
                raise ValueError(f"{name}: {tensor.shape[0]} images; accepted: one image per call (batches are not supported yet)")
        if getattr(self.unet, "encoder_hid_proj", None) is not None:
            # every UNet call of StyleID (inversions and sampling) is text-only; an adapter's image tokens have no
            # place in its recorded and injected features
            raise ValueError(
                "pipe: an IP-Adapter (or another image-embedding projection) is loaded on its UNet, which transfer "
                "does not feed; accepted: pipe.unload_ip_adapter() first, or guidekit.StyleSSP().start_point(...) "
                "on an IP-Adapter pipeline, which runs the image-embedding form of the negative inversion"
            )
        layer_names = resolve_styleid_layers(self.unet, layers)
        for hook in hook_list:
            if isinstance(hook, SamplerHook) and hook.slot == "guidance":
                raise ValueError(
                    f"hooks: {hook!r} fills the guidance slot; StyleID samples without guidance (one UNet pass with "
                    "the empty prompt); accepted: hooks for the start point, the steps or corrections"
                )
        chain = HookChain(hook_list, default_guidance=CFG())
        for hook in chain.others:
            shared = sorted((hook.attention_layers or frozenset()) & set(layer_names))
            if shared:
                raise HookConflictError(
                    f"hooks: {hook!r} replaces the attention processors of {shared[:3]}, which StyleID injects into; "
                    "give it other layers"
                )
        scheduler = DDIMScheduler.from_config(self.scheduler.config)
        scheduler.set_timesteps(steps, device=self._execution_device)
        levels = ddim_levels(scheduler)
        prediction_type = self._prediction_type
        check_invertible(levels, prediction_type)
        state = SamplerState(
            num_steps=steps,
            scheduler=scheduler,
            prediction_type=prediction_type,
            guidance_scale=1.0,
            generator=generator,
            extras={
                "pipeline": self,
                "unet": self.unet,
                "content_image": content01,
                "style_image": style01,
                "content_prompt": content_prompt,
                "style_prompt": style_prompt,
                "init_adain": init_adain,
                "negative_inversion_scale": negative_scale,
            },
        )
        chain.validate(state)

        control = StyleIDControl()
        original = self.unet.attn_processors
        replacements = {n: StyleIDAttnProcessor(original[n], n, control) for n in layer_names}
        with replaced_processors(self.unet, replacements):
            # 1. Invert the style (K, V; cached) and the content (Q), empty prompt, no CFG
            # (no K/V without injection; a cached entry without them serves only such calls)
            style_null = self._encode_rows([""], *style01.shape[-2:])
            cache = self._style_cache()
            key = self._style_cache_key(style01, steps, layer_names, _conditioning_key(style_null), original)
            entry = cache.get(key) if cache_style else None
            if entry is not None and attn_injection and not entry.features:
                entry = None
            if entry is None:
                _, z_style, features = self._invert_recording(
                    style01, levels, control, ("k", "v") if attn_injection else (), style_null
                )
                entry = _StyleEntry(latents=z_style, features=features)
                if cache_style:
                    self._store_style(key, entry)
            else:
                cache.move_to_end(key)
            z0_content, z_content, content_features = self._invert_recording(
                content01, levels, control, ("q",) if attn_injection else ()
            )
            height, width = content01.shape[-2:]
            z_start = z_content
            if negative_scale > 0:  # StyleSSP: the start point's z_T^c from a negative-guided inversion
                control.off()
                z_start = self._invert_negative_guided(
                    z0_content, levels, height, width, content_prompt or "", style_prompt, negative_scale
                )
            state.extras.update(
                content_z0=z0_content, content_zT=z_content, content_start_zT=z_start, style_zT=entry.latents
            )

            # 2. Start point: AdaIN of z_T^c to z_T^s, then the hooks
            latents = adain_latents(z_start, entry.latents) if init_adain else z_start
            null = self._encode_rows([""], height, width)

            # 3. Sampling: empty prompt, no CFG, style injection at every step
            chain.begin(state)
            try:
                latents = chain.init_latents(state, latents)
                start_latents = latents
                for i, t in enumerate(levels.timesteps):
                    state.update(i, t, latents, model_input=latents)
                    chain.step_begin(state)
                    if attn_injection:
                        control.inject(content_features, entry.features, gamma, temperature)
                    control.timestep = int(t)
                    try:
                        pred = self._unet_pred(latents, t, null)
                    finally:
                        control.off()
                    pred = chain.guide(state, pred, None)
                    pred = chain.correct(state, pred)
                    latents = ddim_step(latents, pred, levels.alpha_bar[i], levels.alpha_bar_prev[i], prediction_type)
                    state.latents = latents
                    chain.step_end(state)
            finally:
                chain.end(state)

        # 4. Decode
        image = self._decode_latents(latents)
        self.maybe_free_model_hooks()
        return StyleIDOutput(
            images=self._to_output(image, output_type), start_latents=start_latents, layers=list(layer_names)
        )


class StyleIDStableDiffusionPipeline(StyleIDPipelineMixin, StableDiffusionPipeline):
    """`StableDiffusionPipeline` (SD 1.x/2.x) with StyleID style transfer, `transfer(content, style)`.

    Loads like the stock pipeline (`from_pretrained`, `from_pipe`); `__call__` is the stock text-to-image.

    Example:
        >>> from guidekit.pipelines import StyleIDStableDiffusionPipeline
        >>> pipe = StyleIDStableDiffusionPipeline.from_pretrained("path/or/hub-id")
        >>> out = pipe.transfer(content, style)                 # γ = 0.75, T = 1.5, the paper's layers
        >>> out.images[0]
        >>> more = [pipe.transfer(c, style).images[0] for c in contents]   # the style is inverted once
    """

    def _encode_rows(self, prompts: List[str], height: int, width: int) -> Dict[str, Any]:
        embeds, _ = self.encode_prompt(prompts, self._execution_device, 1, False)
        return {"encoder_hidden_states": embeds, "added_cond_kwargs": None}
