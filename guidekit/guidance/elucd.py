"""EluCD classifier guidance as a guidekit hook (the `correct` point): steer a diffusers model with an
off-the-shelf image classifier, calibrated so that its gradients help (Ma et al., ICLR 2024, arXiv 2310.11311).

The math lives in :mod:`guidekit.guidance.elucd_math`; this module carries it into a diffusers sampling loop.
"""

from __future__ import annotations

import contextlib
import copy
import math
import threading
import warnings
from typing import Optional, Sequence, Union

import torch
from torch import nn

from ..checks import check_choice, check_number, check_window
from ..hooks import SamplerHook, SamplerState, scheduler_family
from .classifiers import ImageClassifier, as_classifier, resolve_labels, unsmoothed_warning
from .elucd_math import (
    calibrated_log_prob,
    classifier_gradient,
    ddpm_guidance_weight,
    ddpm_posterior_variance,
    edm_classifier_input,
    edm_guidance_weight,
    edm_rescale_gradient,
    flow_posterior_variance,
    nonfinite_message,
    smooth_classifier,
    zero_nonfinite,
)

__all__ = [
    "ClassifierGuidance",
    "EDM_MAX_GUIDANCE",
    "ELUCD_FLOW_SCHEDULERS",
    "ELUCD_SCHEDULERS",
    "EluCD",
    "check_elucd_scheduler",
]

#: G, ``max_guidance`` of the official EDM script; ``schedule="edm"`` uses G = scale · EDM_MAX_GUIDANCE.
EDM_MAX_GUIDANCE = 0.004

Labels = Union[int, str, Sequence[Union[int, str]], torch.Tensor]

#: The flow-matching scheduler whose step EluCD maps its mean shift onto exactly (subclasses included): first
#: order, affine in the velocity, deterministic or with ``stochastic_sampling=True``.
ELUCD_FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler",)
#: EluCD's sampler on flow models: the flow analogue of ancestral DDPM (x̂0 renoised with fresh noise each step).
RECOMMENDED_FLOW_SCHEDULER = "FlowMatchEulerDiscreteScheduler with stochastic_sampling=True"


def _check_flow_scheduler(scheduler, who: str) -> None:
    """The flow-matching half of `check_elucd_scheduler`: every flow scheduler but FlowMatchEuler is refused."""
    names = [cls.__name__ for cls in type(scheduler).__mro__]
    if any(name in ELUCD_FLOW_SCHEDULERS for name in names):
        return
    name = type(scheduler).__name__
    if "FlowMatchHeunDiscreteScheduler" in names:
        why = ("is an order-2 solver: the correction would enter both of its stages (the Euler predictor and the "
               "averaged corrector), so the step's mean would not move by EluCD's shift")
    else:
        why = ("is a multistep solver: it feeds earlier predictions into later steps, so a correction would act "
               "again there and the step's mean would not move by EluCD's shift")
    raise ValueError(
        f"scheduler: {name} {why}; accepted by {who} on flow-matching models: {', '.join(ELUCD_FLOW_SCHEDULERS)} "
        f"(deterministic or stochastic_sampling=True); recommended: {RECOMMENDED_FLOW_SCHEDULER} (the flow analogue "
        "of ancestral DDPM, EluCD's own sampler), e.g. pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=..., "
        "stochastic_sampling=True) with the shift of the model's scheduler"
    )


#: The schedulers whose step EluCD maps its mean shift onto exactly (subclasses included), by the kind of step.
#: Each is first order: x_{t−1} depends on this step's prediction only, affinely. Multistep solvers (PNDM, LMS,
#: DPM-Solver, UniPC) keep earlier predictions and feed them into later steps, so a correction would act again.
ELUCD_SCHEDULERS = {
    "DDPMScheduler": "ddpm",
    "DDIMScheduler": "ddim",
    "EulerDiscreteScheduler": "euler",
    "EulerAncestralDiscreteScheduler": "euler_ancestral",
}
#: EluCD's own sampler: ancestral DDPM steps.
RECOMMENDED_SCHEDULER = "DDPMScheduler"


def _step_kind(scheduler) -> Optional[str]:
    for cls in type(scheduler).__mro__:
        kind = ELUCD_SCHEDULERS.get(cls.__name__)
        if kind is not None:
            return kind
    return None


def check_elucd_scheduler(scheduler, who: str = "EluCD") -> None:
    """Raise the ValueError that EluCD (and ClassifierGuidance) give for a scheduler they cannot guide exactly
    (flow-matching schedulers: every one but FlowMatchEulerDiscreteScheduler, with the flow message).

    Entry points call it before they load or run anything, so the user sees the same message everywhere.

    Args:
        scheduler: a diffusers scheduler (instance).
        who (`str`, defaults to `"EluCD"`): the hook named in the message.
    """
    if scheduler_family(scheduler) == "flow":
        _check_flow_scheduler(scheduler, who)
        return
    if _step_kind(scheduler) is not None:
        return
    name = type(scheduler).__name__
    why = (
        "is a multistep solver: it feeds earlier predictions into later steps, so a correction would act again "
        "there and the step's mean would not move by EluCD's shift"
        if name in ("PNDMScheduler", "LMSDiscreteScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler",
                    "DEISMultistepScheduler")
        else "is not one whose step guidekit maps the correction onto"
    )
    raise ValueError(
        f"scheduler: {name} {why}; accepted by {who}: {', '.join(ELUCD_SCHEDULERS)}; recommended: "
        f"{RECOMMENDED_SCHEDULER} (ancestral DDPM, EluCD's own sampler), e.g. "
        f"pipe.scheduler = {RECOMMENDED_SCHEDULER}.from_config(pipe.scheduler.config)"
    )


class EluCD(SamplerHook):
    r"""EluCD: classifier guidance with an off-the-shelf classifier, calibrated (a `correct`-point hook).

    It runs after the guidance slot, so it composes with CFG or APG: ``hooks=[guidekit.APG(), guidekit.EluCD(...)]``.
    Per step, on the guided prediction:

    1. x̂0 = ``state.to_x0(pred)`` (eps, v and x0 prediction; model-input space, so sigma schedulers too);
    2. the classifier input: x̂0 (``input="x0"``), or the model input x_t divided by max(1, RMS(x_t))
       (``input="xt"``, the official EDM path). Latent models (a pipeline with a ``vae``) decode it with the
       pipeline's VAE (or the lighter ``decoder`` you give), differentiably, in float32 where the autoencoder's
       config asks for it (``force_upcast``), as diffusers' SDXL pipeline decodes; pixel models with
       ``input="x0"`` classify x̂0 clipped to [-1, 1], as the official DDPM path does;
    3. g = ∇ log p̃(y|·) of the calibrated log-probability
       log p̃(y|x) = τ₁·f_y(x) − logsumexp(τ₂·f(x)) (:func:`~guidekit.guidance.calibrated_log_prob`), taken with
       respect to the latent x̂0 (or x_t) through the decoder and the classifier only, never through the denoiser,
       with the classifier's ReLUs smoothed into Softplus(β);
    4. the intended shift u of the step's mean (the schedule, below);
    5. x̂0 ← x̂0 + u / k_t, converted back to the model's prediction type with ``state.from_x0`` (k_t below).

    **How the weights map onto diffusers schedulers.** EluCD's DDPM path moves the mean of the ancestral step
    p(x_{t−1}|x_t) by u = (Σ_t + a_t)·s·g. Each accepted scheduler's step is affine in the prediction, with its own
    coefficient k_t of x̂0 in x_{t−1} (model-input units; ``DDPMScheduler``: the posterior mean's
    c_t = √ᾱ_prev·(1 − ᾱ_t/ᾱ_prev)/(1 − ᾱ_t); ``DDIMScheduler``: √ᾱ_prev − √(1 − ᾱ_prev − η²Σ_t)·√(ᾱ_t/(1 − ᾱ_t)),
    about c_t/2 at many steps; ``EulerDiscreteScheduler`` and ``EulerAncestralDiscreteScheduler``: their step's),
    so correcting x̂0 by u/k_t moves x_{t−1} by exactly u on every one of them (unless the scheduler clips or
    thresholds x̂0). Multistep solvers (PNDM, LMS, DPM-Solver, UniPC) are refused with a ValueError: they feed
    earlier predictions into later steps, where a correction would act again. The terms, per step i of N
    (``state.num_steps``):

    * ᾱ_t: this step's noise level (``state.alpha_sigma``); ᾱ_prev: the level the scheduler steps to (timestep
      schedulers: ``previous_timestep`` or t − T_train/N, then ``final_alpha_cumprod`` or 1 past the end; sigma
      schedulers: the next sigma, ᾱ = 1/(1 + σ²));
    * Σ_t = (1 − ᾱ_prev)/(1 − ᾱ_t)·(1 − ᾱ_t/ᾱ_prev), the posterior variance
      (:func:`~guidekit.guidance.ddpm_posterior_variance`): what ``DDPMScheduler(variance_type="fixed_small")``
      adds, and the fixed-variance counterpart of the learned Σ_t of the official ADM model;
    * ``schedule="ddpm"``: u = s·(Σ_t + a_t)·g with a_t = γ·max_var·sin(π·t/N), t = N − 1 − i (the official
      respaced index) and max_var the running maximum of Σ over the call's steps so far
      (:func:`~guidekit.guidance.ddpm_guidance_weight`). On DDPM, Σ_t/c_t = (1 − ᾱ_prev)/√ᾱ_prev: the plain part
      corrects x̂0 by s·(1 − ᾱ_prev)/√ᾱ_prev·g: strongly at high noise, fading to nothing at the end;
    * ``schedule="edm"``: u = g/RMS(g)·RMS(x_t)·λ_i per image, λ_i = max(G·(N+1−i)/(N+1), 10⁻⁵) + G·γ·sin(π·i/N),
      G = s·0.004 (the official script's ``max_guidance``; :func:`~guidekit.guidance.edm_guidance_weight`,
      :func:`~guidekit.guidance.edm_rescale_gradient`). The official EDM sampler adds u to x_t *before* its
      denoiser call; a `correct` hook runs after it, so here u moves the step's mean instead.

    **Flow-matching models** (SD3, Flux, Qwen-Image, Wan: the velocity v, latents x = (1 − σ)·x0 + σ·ε). The path is
    Gaussian with α = 1 − σ, so Σ is the posterior variance of q(x_{σ'}|x_σ, x0) between this step's σ and the σ'
    the scheduler steps to (:func:`~guidekit.guidance.flow_posterior_variance`), and g is in latent units. Only
    ``FlowMatchEulerDiscreteScheduler`` is accepted, deterministic or with ``stochastic_sampling=True`` (recommended:
    the flow analogue of ancestral DDPM, x̂0 renoised to σ' with fresh noise). With x held and v re-derived from the
    corrected x̂0, its step moves x_{σ'} by k·Δ with k = (σ − σ')/σ (deterministic: x + (σ' − σ)·v) or k = 1 − σ'
    (stochastic: (1 − σ')·(x − σ·v) + σ'·z), so Δ = u/k moves it by exactly u. FlowMatchHeun (order 2: the correction
    would enter both stages) and UniPC / DPM-Solver with flow sigmas (multistep) are refused. The classifier reads
    the pipeline's own decode of x̂0: unpacked (Flux, Qwen-Image), de-normalised and decoded as the pipeline's
    output is; a video (Wan) is classified frame by frame with its label, its log-probability the sum over frames.

    **Signs and scales.** g ascends the calibrated log-probability of the requested labels: a positive scale
    pulls toward them. ``scale=0`` leaves the prediction untouched (bit for bit). g is in the units of the
    classifier input (the latent, or x_t for ``input="xt"``), with no 1/√ᾱ chain factor, as in the official code.
    A step where ᾱ_prev ≤ ᾱ_t (a repeated timestep) gets no correction. An image whose gradient is zero or not
    finite (overflow in a half-precision VAE, a classifier that ignores its input) gets no correction, so the hook
    never produces NaN; non-finite ones are counted, and the call ends with one warning giving the count.

    Args:
        classifier: the image classifier: a ``guidekit.guidance.TransformersClassifier`` /
            ``TorchClassifier``, a transformers ``AutoModelForImageClassification`` model (its preprocessing is read
            from the ``preprocessor_config.json`` next to it), or any ``nn.Module`` returning logits (then it gets
            decoded images in [-1, 1] at the pipeline's size, as the official code feeds its ResNets). It is never
            modified: at the first call the hook makes its own copy, smoothed, frozen and in eval mode (later
            changes to your classifier are not seen; make a new hook).
        labels (`int`, `str`, `list` or integer `torch.Tensor`): the class to steer toward: an index, a name
            looked up in the classifier's ``id2label`` (case-insensitive; a full label or, as DiT's
            ``get_label_ids``, one of its comma-separated synonyms: ``"tabby"`` for ``"tabby, tabby cat"``), or a
            list / 1-d tensor with one per image of the call's batch (in the pipeline's order: each prompt's
            images together). A 0-d tensor is one label.
        scale (`float`, defaults to `1.0`): s, ≥ 0; the official ``classifier_scale`` (1.0) for ``"ddpm"``, a
            multiple of G = 0.004 for ``"edm"``. The right value depends on the classifier and the model.
        softplus_beta (`float` or `None`, defaults to `3.0`): β of the Softplus that replaces every ``nn.ReLU``
            module (official DDPM script 3.0, EDM 5.0); `None` keeps the ReLUs. A classifier without ``nn.ReLU``
            modules gets a warning naming its activations, since smoothing then changes nothing: GELU/SiLU ones
            (ViT, ConvNeXt) are smooth already, ReLU6 is kept, and a functional ``F.relu`` cannot be swapped.
        joint_temperature (`float`, defaults to `1.0`): τ₁, ≥ 0 (official 1.0).
        marginal_temperature (`float`, defaults to `0.5`): τ₂, ≥ 0 (official DDPM: τ₁·0.5; EDM: 0.0).
        schedule (`str`, defaults to `"ddpm"`): ``"ddpm"`` (Σ_t plus the sine boost) or ``"edm"`` (RMS-normalised
            gradient with a linear decay plus a sine bump).
        gamma (`float`, defaults to `0.3`): γ of the sine term (official ``gamma_factor`` / ``add_factor``, 0.3);
            ≥ 0, 0 turns it off.
        input (`str`, defaults to `"x0"`): what the classifier reads: ``"x0"`` (the official DDPM path) or ``"xt"``
            (the noisy model input, RMS-normalised: the official EDM path; on latent models the noisy latent is
            decoded, which clean-image classifiers seldom read well).
        start (`float`, defaults to `0.0`), stop (`float`, defaults to `1.0`): the fractions of the steps between
            which the hook corrects (``start <= i/N < stop``).
        gradient_checkpointing (`bool`, defaults to `False`): recompute the VAE decoder's activations in the
            backward pass instead of keeping them (less memory, one more decoder forward). Switched on only
            during the hook's own decode; the VAE is left as it was.
        decoder (`nn.Module`, *optional*): a cheaper autoencoder that decodes the classifier's input instead of
            the pipeline's VAE, e.g. diffusers' ``AutoencoderTiny`` loaded from weights trained for the pipeline's
            latent space (TAESD for SD 1.x/2.x and DiT, TAESDXL for SDXL). Anything with ``decode(z,
            return_dict=False)`` and a ``config`` holding ``scaling_factor`` is accepted; the latents are scaled
            for it from its own config exactly as for the VAE (z / scaling_factor, plus shift_factor or
            latents_mean/std when set), which for ``AutoencoderTiny`` (scaling_factor 1.0) hands it the model's
            latents unscaled, as diffusers' pipelines do when it is their ``vae``. The pipeline's own final
            decode is unchanged. Put it on the pipeline's device and dtype; it is never modified. The gradient
            is the decoder's, not the VAE's: it is cheaper per step (``guidekit bench --dit``) and only as close
            to the VAE's as the decoder's images are to the VAE's.

    When the autoencoder that decodes (the VAE or ``decoder``) is float16 and its config has ``force_upcast``,
    the hook decodes and backpropagates through a float32 copy of its decoding half, made once per call and
    dropped at the end of the call (your autoencoder is never converted, not even for a moment), with the latent
    and the gradient in float32 too.
    Per-call state (the running max_var) lives in the call's `SamplerState`, so one object serves several calls.
    """

    def __init__(
        self,
        classifier: Union[nn.Module, ImageClassifier],
        labels: Labels,
        scale: float = 1.0,
        softplus_beta: Optional[float] = 3.0,
        joint_temperature: float = 1.0,
        marginal_temperature: float = 0.5,
        schedule: str = "ddpm",
        gamma: float = 0.3,
        input: str = "x0",
        start: float = 0.0,
        stop: float = 1.0,
        gradient_checkpointing: bool = False,
        decoder: Optional[nn.Module] = None,
    ):
        self.classifier = as_classifier(classifier)
        self.labels = resolve_labels(labels, self.classifier.id2label)
        self.scale = check_number("scale", scale, 0.0)
        self.softplus_beta = check_number("softplus_beta", softplus_beta, 0.0, low_open=True, allow_none=True)
        note = unsmoothed_warning(self.classifier.model, self.softplus_beta)
        if note is not None:  # e.g. GELU classifiers (ViT, ConvNeXt): already smooth
            warnings.warn(note, UserWarning, stacklevel=2)
        self.joint_temperature = check_number("joint_temperature", joint_temperature, 0.0)
        self.marginal_temperature = check_number("marginal_temperature", marginal_temperature, 0.0)
        self.schedule = check_choice("schedule", schedule, ("ddpm", "edm"))
        self.gamma = check_number("gamma", gamma, 0.0)
        self.input = check_choice("input", input, ("x0", "xt"))
        self.start, self.stop = check_window(start, stop)
        if not isinstance(gradient_checkpointing, bool):
            raise ValueError(f"gradient_checkpointing: {gradient_checkpointing!r} is not accepted; accepted: True or False")
        self.gradient_checkpointing = gradient_checkpointing
        self.decoder = _check_decoder(decoder)
        self._smoothed: Optional[nn.Module] = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ checks

    def validate(self, state: SamplerState) -> None:
        check_elucd_scheduler(state.scheduler, type(self).__name__)
        vae = _vae(state)
        if self.decoder is not None and vae is None:
            raise ValueError(
                f"decoder: a {type(self.decoder).__name__} is not accepted for a pipeline with no VAE (a pixel "
                f"model: the classifier reads x̂0 itself); accepted: None"
            )
        if self.gradient_checkpointing:
            source = self.decoder if self.decoder is not None else vae
            if source is None or not _checkpointable(source):
                what = "no VAE" if source is None else f"a {type(source).__name__} whose decoder cannot checkpoint"
                raise ValueError(
                    f"gradient_checkpointing: True is not accepted for a pipeline with {what}; accepted: False"
                )

    def is_active(self, state: SamplerState) -> bool:
        return self.start <= state.progress < self.stop

    # ------------------------------------------------------------------ the step

    def correct(self, state: SamplerState, pred: torch.Tensor) -> torch.Tensor:
        check_elucd_scheduler(state.scheduler, type(self).__name__)
        memory = state.memory(self)
        flow = scheduler_family(state.scheduler) == "flow"
        if flow:
            sigma, sigma_next = _flow_sigmas(state)
            moves = sigma_next < sigma
        else:
            alpha_bar, alpha_bar_prev = _alpha_bars(state)
            moves = alpha_bar_prev > alpha_bar
        variance = None
        if moves:
            if flow:
                variance = _f64(flow_posterior_variance(sigma, sigma_next))
            else:
                variance = ddpm_posterior_variance(_f64(alpha_bar), _f64(alpha_bar_prev))
            memory["max_variance"] = max(memory.get("max_variance", 0.0), float(variance))
        if self.scale == 0.0 or not moves or not self.is_active(state):
            return pred
        labels = self._batch_labels(pred.shape[0], pred.device)
        classifier = self._classifier(pred.device)
        x0 = state.to_x0(pred)
        x_t = state.model_input.to(x0.dtype)
        autoencoder = self._autoencoder(state, memory, x0)
        if self.input == "x0":
            point = x0 if autoencoder is not None else x0.clamp(-1.0, 1.0)
        else:
            point = edm_classifier_input(x_t)
        if autoencoder is not None and memory.get("upcast"):
            point = point.float()  # an upcast decode takes its latent and gives its gradient in float32 too

        def log_prob(x: torch.Tensor) -> torch.Tensor:
            if autoencoder is not None and "decode_latents" in state.extras:
                return self._frames_log_prob(classifier, _decode_frames(autoencoder, x, self.gradient_checkpointing,
                                                                        state.extras), labels)
            images = x if autoencoder is None else _decode(autoencoder, x, self.gradient_checkpointing)
            logits = classifier(images.to(pred.device))
            return calibrated_log_prob(logits, labels, self.joint_temperature, self.marginal_temperature)

        grad, nonfinite = classifier_gradient(log_prob, point, return_nonfinite=True)
        shift = self._mean_shift(state, memory, grad, x_t, variance)
        if flow:
            coefficient = _flow_x0_coefficient(state.scheduler, sigma, sigma_next)
        else:
            coefficient = _x0_coefficient(state, alpha_bar, alpha_bar_prev)
        delta, overflow = zero_nonfinite(shift / coefficient)
        memory["nonfinite"] = memory.get("nonfinite", 0) + nonfinite + overflow
        memory["guided"] = memory.get("guided", 0) + delta.shape[0]
        # pred + (from_x0(x̂0 + Δ) − from_x0(x̂0)): from_x0 is affine, and an image with Δ = 0 keeps its exact value.
        change = state.from_x0(x0 + delta) - state.from_x0(x0)
        return (pred.to(change.dtype) + change).to(pred.dtype)

    def end(self, state: SamplerState) -> None:
        memory = state.memory(self)
        if memory.get("nonfinite"):
            # Once per call, with the count: a guidance method must never switch itself off without a word.
            message = nonfinite_message("the classifier gradient", memory["nonfinite"], memory["guided"],
                                        "image-steps of this call", method=type(self).__name__)
            warnings.warn(message, UserWarning, stacklevel=2)
        memory.pop("decoder", None)  # the call's float32 copy, if any: free it now

    def _frames_log_prob(self, classifier: nn.Module, frames: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """log p̃(y|x) of each sample from its decoded frames (B, F, 3, H, W): the sum over its frames, each
        classified with the sample's label (F = 1 for image models)."""
        batch, count = frames.shape[:2]
        logits = classifier(frames.flatten(0, 1).to(labels.device))
        per_frame = calibrated_log_prob(logits, labels.repeat_interleave(count), self.joint_temperature,
                                        self.marginal_temperature)
        return per_frame.view(batch, count).sum(dim=1)

    def _autoencoder(self, state: SamplerState, memory: dict, x0: torch.Tensor) -> Optional[nn.Module]:
        """What decodes the classifier's input: `decoder` or the pipeline's VAE (None for pixel models), or, where
        it is float16 and its config asks for upcasting, the call's float32 copy of it."""
        source = self.decoder if self.decoder is not None else _vae(state)
        if source is None:
            return None
        if "decoder" not in memory:
            wanted = getattr(source.config, "latent_channels", None)
            checked = self.decoder is not None and wanted is not None
            if checked and int(wanted) != (channels := _latent_channels(state, x0)):
                raise ValueError(
                    f"decoder: a {type(source).__name__} with {wanted} latent channels is not accepted for a model "
                    f"with {channels}; accepted: an autoencoder of the pipeline's latent space"
                )
            memory["upcast"] = _needs_upcast(source)
            memory["decoder"] = _float32_decoder(source) if memory["upcast"] else source
        return memory["decoder"]

    def _mean_shift(self, state, memory, grad, x_t, variance) -> torch.Tensor:
        """u, the shift of the step's mean (see the class docstring)."""
        n, i = state.num_steps, state.step_index
        if self.schedule == "ddpm":
            weight = ddpm_guidance_weight(variance, float(n - 1 - i), n, _f64(memory["max_variance"]), self.gamma)
            return grad * (self.scale * float(weight))
        weight = edm_guidance_weight(i, n, max_guidance=self.scale * EDM_MAX_GUIDANCE, add_factor=self.gamma)
        return edm_rescale_gradient(grad, x_t, weight)

    # ------------------------------------------------------------------ labels and classifier

    def _batch_labels(self, batch: int, device) -> torch.Tensor:
        if isinstance(self.labels, tuple):
            if len(self.labels) != batch:
                raise ValueError(
                    f"labels: {len(self.labels)} labels were given for a batch of {batch} images; accepted: one "
                    f"label for all, or a list of {batch} (one per image, each prompt's images together)"
                )
            values = list(self.labels)
        else:
            values = [self.labels] * batch
        return torch.tensor(values, dtype=torch.long, device=device)

    def _classifier(self, device) -> nn.Module:
        """The hook's own classifier: a smoothed, frozen, eval-mode copy, built once and moved to `device`."""
        with self._lock:
            if self._smoothed is None:
                model = smooth_classifier(self.classifier, self.softplus_beta)
                model.requires_grad_(False)
                model.eval()
                self._smoothed = model
            model = self._smoothed
            if _device_of(model) not in (None, torch.device(device)):
                model.to(device)
            return model

    @property
    def softplus_replaced(self) -> Optional[int]:
        """How many ReLU modules the hook's copy has as Softplus (None before the first call)."""
        return None if self._smoothed is None else self._smoothed.softplus_replaced

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(classifier={type(self.classifier.model).__name__}, labels={self.labels!r}, "
            f"scale={self.scale}, softplus_beta={self.softplus_beta}, joint_temperature={self.joint_temperature}, "
            f"marginal_temperature={self.marginal_temperature}, schedule={self.schedule!r}, gamma={self.gamma}, "
            f"input={self.input!r}, start={self.start}, stop={self.stop}"
            + (f", decoder={type(self.decoder).__name__}" if self.decoder is not None else "") + ")"
        )


class ClassifierGuidance(EluCD):
    """Plain classifier guidance with an off-the-shelf classifier: the uncalibrated baseline of EluCD.

    The same hook as :class:`EluCD` with ``softplus_beta=None`` (ReLUs kept), τ₂ = τ₁ (so with the default
    temperature 1 the plain log-softmax) and, by default, γ = 0 (no sine boost): u = s·Σ_t·g for
    ``schedule="ddpm"``. Compare the two in one line: ``hooks=[guidekit.ClassifierGuidance(clf, "cat")]`` vs
    ``hooks=[guidekit.EluCD(clf, "cat")]``. With ``gamma=0.3`` it keeps EluCD's sine boost, so it differs from
    ``EluCD(clf, "cat")`` by the calibration alone (the smoothing and the temperatures).

    Args:
        classifier, labels, scale, schedule, input, start, stop, gradient_checkpointing, decoder: as for
            :class:`EluCD`.
        temperature (`float`, defaults to `1.0`): τ₁ = τ₂.
        gamma (`float`, defaults to `0.0`): γ of EluCD's sine boost, ≥ 0; 0 (plain classifier guidance) turns it off.
    """

    def __init__(
        self,
        classifier: Union[nn.Module, ImageClassifier],
        labels: Labels,
        scale: float = 1.0,
        temperature: float = 1.0,
        schedule: str = "ddpm",
        input: str = "x0",
        start: float = 0.0,
        stop: float = 1.0,
        gradient_checkpointing: bool = False,
        decoder: Optional[nn.Module] = None,
        gamma: float = 0.0,
    ):
        super().__init__(
            classifier,
            labels,
            scale=scale,
            softplus_beta=None,
            joint_temperature=temperature,
            marginal_temperature=temperature,
            schedule=schedule,
            gamma=gamma,
            input=input,
            start=start,
            stop=stop,
            gradient_checkpointing=gradient_checkpointing,
            decoder=decoder,
        )


# ---------------------------------------------------------------------------------------------------- helpers


def _f64(value: float) -> torch.Tensor:
    # Tensors skip the float range checks of the math core, which refuse ᾱ_t = 0 (zero-terminal-SNR schedules).
    return torch.tensor(value, dtype=torch.float64)


def _alpha_bars(state: SamplerState) -> tuple[float, float]:
    """(ᾱ_t, ᾱ_prev): this step's noise level and the one the scheduler steps to, as floats."""
    alpha, _ = state.alpha_sigma()
    alpha_bar = float(alpha) ** 2
    sched = state.scheduler
    if scheduler_family(sched) == "vp":
        t = int(state.timestep)
        if hasattr(sched, "previous_timestep"):
            prev = int(sched.previous_timestep(t))
        else:
            prev = t - sched.config.num_train_timesteps // sched.num_inference_steps
        if prev >= 0:
            return alpha_bar, float(sched.alphas_cumprod[prev])
        return alpha_bar, float(getattr(sched, "final_alpha_cumprod", 1.0))
    index = state._sigma_index
    if index is None:
        index = sched.index_for_timestep(state.timestep) if hasattr(sched, "index_for_timestep") else state.step_index
    sigmas = sched.sigmas
    sigma_next = float(sigmas[index + 1]) if index + 1 < len(sigmas) else 0.0
    return alpha_bar, 1.0 / (1.0 + sigma_next * sigma_next)


def _x0_coefficient(state: SamplerState, alpha_bar: float, alpha_bar_prev: float) -> float:
    """k_t = ∂x_{t−1}/∂x̂0 of this step of the scheduler, in model-input (VP) units: correcting x̂0 by u/k_t moves
    x_{t−1} by exactly u. Every accepted step is affine in the prediction, so k_t is the scheduler's own coefficient
    of x̂0 (with ε̂ or the ODE direction re-derived from x̂0 and x_t):

    * DDPM: the posterior mean's c_t = √ᾱ_prev·(1 − ᾱ_t/ᾱ_prev)/(1 − ᾱ_t);
    * DDIM: √ᾱ_prev − √(1 − ᾱ_prev − σ_η²)·√(ᾱ_t/(1 − ᾱ_t)), σ_η² = η²·Σ_t (η of the call, 0 by default);
    * Euler: latents x = x0 + σ·ε step to x + (σ' − σ)·(x − x̂0)/σ, so 1 − σ'/σ in latent units, times
      α' = 1/√(σ'² + 1) in model-input units (σ' the sigma stepped to);
    * Euler ancestral: the same with σ' = σ_down, the deterministic part of its step (then noise σ_up is added).
    """
    a, ap = alpha_bar, alpha_bar_prev
    kind = _step_kind(state.scheduler)
    if kind == "ddpm":
        return math.sqrt(ap) * (1.0 - a / ap) / (1.0 - a)
    if kind == "ddim":
        eta = float(state.extras.get("eta", 0.0))
        variance = (1.0 - ap) / (1.0 - a) * (1.0 - a / ap)
        return math.sqrt(ap) - math.sqrt(max(1.0 - ap - eta * eta * variance, 0.0)) * math.sqrt(a / (1.0 - a))
    sigma, sigma_to = math.sqrt((1.0 - a) / a), math.sqrt((1.0 - ap) / ap)
    alpha_to = math.sqrt(ap)  # 1/√(σ'² + 1), the scaling of the next step's model input
    if kind == "euler_ancestral":
        sigma_up = math.sqrt(sigma_to**2 * (sigma**2 - sigma_to**2) / sigma**2)
        sigma_to = math.sqrt(sigma_to**2 - sigma_up**2)
    return (1.0 - sigma_to / sigma) * alpha_to


def _flow_sigmas(state: SamplerState) -> tuple[float, float]:
    """(σ, σ'): this step's flow sigma (the one ``state.to_x0`` converts with) and the one the step goes to."""
    sched = state.scheduler
    index = state._sigma_index
    if index is None and getattr(sched, "begin_index", None) is not None:
        index = sched.begin_index
    if index is None:
        index = sched.index_for_timestep(state.timestep)
    sigmas = sched.sigmas
    sigma_next = float(sigmas[index + 1]) if index + 1 < len(sigmas) else 0.0
    return float(sigmas[index]), sigma_next


def _flow_x0_coefficient(scheduler, sigma: float, sigma_next: float) -> float:
    """k = ∂x_{σ'}/∂x̂0 of a FlowMatchEuler step, with the velocity re-derived from x̂0 at the same latents x
    (``state.from_x0``: v = (x − x̂0)/σ) and x itself held:

    * deterministic, x' = x + (σ' − σ)·v = x + (σ' − σ)·(x − x̂0)/σ, so k = (σ − σ')/σ;
    * ``stochastic_sampling=True``, x' = (1 − σ')·(x − σ·v) + σ'·z with fresh noise z, and x − σ·v = x̂0, so
      k = 1 − σ'.

    Both steps are affine in v with x held, and the noise z does not depend on v, so correcting x̂0 by u/k moves
    x' by exactly u (for the same z).
    """
    if scheduler.config.get("stochastic_sampling", False):
        return 1.0 - sigma_next
    return (sigma - sigma_next) / sigma


def _vae(state: SamplerState) -> Optional[nn.Module]:
    pipe = state.extras.get("pipeline")
    return getattr(pipe, "vae", None) if pipe is not None else None


def _device_of(module: nn.Module) -> Optional[torch.device]:
    for tensor in list(module.parameters()) + list(module.buffers()):
        return tensor.device
    return None


def _decode(vae: nn.Module, latents: torch.Tensor, checkpointing: bool) -> torch.Tensor:
    """Latents (model space) → images in about [-1, 1], as the pipelines decode them, differentiably."""
    config = vae.config
    param = next(vae.parameters())
    z = latents.to(device=param.device, dtype=param.dtype)
    mean = getattr(config, "latents_mean", None)
    std = getattr(config, "latents_std", None)
    if mean is not None and std is not None:
        channels = z.shape[1]
        mean = torch.tensor(mean, device=z.device, dtype=z.dtype).view(1, channels, 1, 1)
        std = torch.tensor(std, device=z.device, dtype=z.dtype).view(1, channels, 1, 1)
        z = z * std / config.scaling_factor + mean
    else:
        z = z / config.scaling_factor
        shift = getattr(config, "shift_factor", None)
        if shift is not None:
            z = z + shift
    context = _decoder_checkpointing(vae) if checkpointing else contextlib.nullcontext()
    with context:
        return vae.decode(z, return_dict=False)[0]


def _check_decoder(decoder) -> Optional[nn.Module]:
    if decoder is None:
        return None
    config = getattr(decoder, "config", None)
    factor = getattr(config, "scaling_factor", None)
    if (not isinstance(decoder, nn.Module) or not callable(getattr(decoder, "decode", None))
            or isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor > 0):
        raise ValueError(
            f"decoder: {type(decoder).__name__} is not accepted; accepted: None, or an nn.Module autoencoder with "
            f"decode(z, return_dict=False) and a config with a positive scaling_factor (e.g. diffusers' AutoencoderTiny)"
        )
    return decoder


def _needs_upcast(autoencoder: nn.Module) -> bool:
    """diffusers' rule (SDXL pipelines): a float16 autoencoder whose config sets force_upcast decodes in float32."""
    param = next(autoencoder.parameters(), None)
    upcast = bool(getattr(autoencoder.config, "force_upcast", False))
    return param is not None and param.dtype == torch.float16 and upcast


def _float32_decoder(autoencoder: nn.Module) -> nn.Module:
    """A float32 copy of `autoencoder` for decoding, leaving the original alone. diffusers' pipelines instead
    convert the VAE itself to float32 and back around their decode; doing that at every step would convert it
    twice per step and leave the user's VAE float32 if the step raised. The encoder is not copied (the hook never
    encodes; it holds about 40% of an SD VAE's parameters)."""
    skip = {id(module): None for name in ("encoder", "quant_conv")
            if isinstance(module := getattr(autoencoder, name, None), nn.Module)}
    return copy.deepcopy(autoencoder, memo=skip).float()


def _latent_channels(state: SamplerState, x0: torch.Tensor) -> int:
    """The latent channels of the autoencoder's input for latents x0 in the hooks' layout (a flow pipeline's
    tokens are unpacked first)."""
    to_vae = state.extras.get("decode_latents")
    if to_vae is None:
        return x0.shape[1]
    return to_vae(x0[:1], _vae(state)).shape[1]


def _decode_frames(autoencoder: nn.Module, latents: torch.Tensor, checkpointing: bool, extras: dict) -> torch.Tensor:
    """Flow pipelines: latents in the hooks' layout → frames (B, F, 3, H, W) in about [-1, 1], differentiably, with
    the pipeline's own unpacking and de-normalisation (``extras["decode_latents"]``) and its reading of the
    autoencoder's output (``extras["decoded_frames"]``)."""
    param = next(autoencoder.parameters())
    z = extras["decode_latents"](latents.to(device=param.device, dtype=param.dtype), autoencoder)
    context = _decoder_checkpointing(autoencoder) if checkpointing else contextlib.nullcontext()
    with context:
        return extras["decoded_frames"](autoencoder.decode(z, return_dict=False)[0])


def _checkpointable(vae: nn.Module) -> bool:
    # The video autoencoders of Wan and Qwen-Image carry `gradient_checkpointing` flags that their forward never
    # reads (diffusers marks them `_supports_gradient_checkpointing = False`): switching them on would save nothing.
    if not getattr(vae, "_supports_gradient_checkpointing", True):
        return False
    decoder = getattr(vae, "decoder", None)
    return isinstance(decoder, nn.Module) and any(hasattr(m, "gradient_checkpointing") for m in decoder.modules())


@contextlib.contextmanager
def _decoder_checkpointing(vae: nn.Module):
    """Turn on activation checkpointing in the VAE decoder for the duration of the block, then restore it."""
    from torch.utils.checkpoint import checkpoint

    def run(module, *args):
        return checkpoint(module.__call__, *args, use_reentrant=False)

    missing = object()
    saved = []
    for module in vae.decoder.modules():
        if hasattr(module, "gradient_checkpointing"):
            saved.append((module, module.gradient_checkpointing, module.__dict__.get("_gradient_checkpointing_func", missing)))
            module._gradient_checkpointing_func = run
            module.gradient_checkpointing = True
    try:
        yield
    finally:
        for module, flag, func in saved:
            module.gradient_checkpointing = flag
            if func is missing:
                module.__dict__.pop("_gradient_checkpointing_func", None)
            else:
                module._gradient_checkpointing_func = func
