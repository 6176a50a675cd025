"""The sampler-hook interface every guidekit method plugs into.

A guided call runs this loop (the pipeline files keep it visible)::

    hooks.begin(state)
    latents = hooks.init_latents(state, latents)
    for each step:
        state.update(...)            # step index, timestep, model input, alphas/sigmas
        hooks.step_begin(state)
        model forward(s)             # uncond/cond batches as the guidance slot asks
        pred = hooks.guide(state, pred_cond, pred_uncond)   # exactly one guidance hook
        pred = hooks.correct(state, pred)                   # corrections, in the order given
        latents = scheduler.step(pred, ...)
        hooks.step_end(state)
    hooks.end(state)                 # always, also when the call raises

`SamplerState` carries what hooks need and converts between the eps, v and x0 parameterisations of
the schedulers people use with Stable Diffusion, and the velocity of flow-matching models (SD3, Flux,
Qwen-Image, Wan).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Sequence, Union

import torch

from .precision import math_dtype

__all__ = [
    "SamplerHook",
    "SamplerState",
    "HookChain",
    "HookConflictError",
    "SUPPORTED_SCHEDULERS",
    "FLOW_SCHEDULERS",
    "FLOW_SOLVERS",
    "FLOW_PREDICTION",
    "as_hook_list",
    "check_flow_scheduler",
    "scheduler_family",
]


class HookConflictError(ValueError):
    """Two hooks that cannot run in the same call."""


# Schedulers whose alphas/sigmas SamplerState knows how to read.
# "vp": x_t = alpha_t x0 + sigma_t eps with alpha_t^2 = alphas_cumprod[t] (model input = latents).
# "ve": latents = x0 + s eps, model input = latents / sqrt(s^2 + 1) (Karras-style sigma schedulers).
# "dpm": latents = alpha_t x0 + sigma_t eps with alpha_t, sigma_t from scheduler.sigmas[step].
SUPPORTED_SCHEDULERS = {
    "DDIMScheduler": "vp",
    "PNDMScheduler": "vp",
    "DDPMScheduler": "vp",
    "EulerDiscreteScheduler": "ve",
    "EulerAncestralDiscreteScheduler": "ve",
    "LMSDiscreteScheduler": "ve",
    "DPMSolverMultistepScheduler": "dpm",
}

# Flow matching: x_sigma = (1 - sigma) x0 + sigma eps, the model predicts the velocity v = eps - x0, and
# sigma is read from the scheduler's sigmas at the step (never derived from the timestep, which UniPC
# and DPM-Solver truncate to integers).
FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler")
# Multistep solvers that run flow models when built with `use_flow_sigmas=True` and
# `prediction_type="flow_prediction"`.
FLOW_SOLVERS = ("UniPCMultistepScheduler", "DPMSolverMultistepScheduler")
FLOW_PREDICTION = "flow_prediction"


def _class_names(scheduler: Any) -> list[str]:
    return [cls.__name__ for cls in type(scheduler).__mro__]


def scheduler_family(scheduler: Any) -> Optional[str]:
    """How a scheduler parameterises x_t, or None when guidekit cannot read it.

    ``"vp"``, ``"ve"`` and ``"dpm"`` for the DDPM-family schedulers, ``"flow"`` for flow matching. Read
    from the class hierarchy, so a user's subclass of a supported scheduler is supported too.
    """
    names = _class_names(scheduler)
    if any(name in FLOW_SCHEDULERS for name in names):
        return "flow"
    if any(name in FLOW_SOLVERS for name in names) and getattr(scheduler, "config", {}).get("use_flow_sigmas", False):
        return "flow"
    for name in names:
        family = SUPPORTED_SCHEDULERS.get(name)
        if family is not None:
            return family
    return None


def check_flow_scheduler(scheduler: Any, argument: str = "scheduler") -> None:
    """Raise a ValueError unless `scheduler` is one whose flow-matching sigmas guidekit can read.

    Accepted: FlowMatchEulerDiscreteScheduler (static or dynamic shift, `shift_terminal`, either time-shift
    type, `stochastic_sampling`), FlowMatchHeunDiscreteScheduler, and UniPC / DPM-Solver++ multistep built with
    `use_flow_sigmas=True, prediction_type="flow_prediction"`. Every other scheduler (FlowMatchLCMScheduler
    among them: it adds fresh noise each step after rescaling x0) is refused on a flow model.
    """
    names = _class_names(scheduler)
    config = getattr(scheduler, "config", {})
    accepted = (
        "FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler, or UniPCMultistepScheduler / "
        "DPMSolverMultistepScheduler with use_flow_sigmas=True and prediction_type='flow_prediction'"
    )
    if any(name in FLOW_SCHEDULERS for name in names):
        if config.get("invert_sigmas", False):
            raise ValueError(f"{argument}: invert_sigmas=True (a data-to-noise schedule) is not supported; accepted: {accepted}")
        return
    if any(name in FLOW_SOLVERS for name in names):
        if not config.get("use_flow_sigmas", False) or config.get("prediction_type") != FLOW_PREDICTION:
            raise ValueError(
                f"{argument}: {type(scheduler).__name__} with use_flow_sigmas={config.get('use_flow_sigmas', False)} and "
                f"prediction_type={config.get('prediction_type')!r} does not run a flow-matching model; accepted: {accepted}"
            )
        return
    raise ValueError(f"{argument}: {type(scheduler).__name__} is not supported on a flow-matching model; accepted: {accepted}")


@dataclass
class SamplerState:
    """What every hook sees at one point of one sampling call.

    Args:
        num_steps (`int`): number of denoising steps of this call.
        scheduler: the pipeline's scheduler (after `set_timesteps`).
        prediction_type (`str`): the model's output: ``"epsilon"``, ``"v_prediction"`` or ``"sample"``, or
            ``"flow_prediction"`` (the velocity v = eps - x0 of a flow-matching model).
        guidance_scale (`float`): the resolved guidance scale of the call.
        guidance_rescale (`float`): the call's `guidance_rescale` (CFG rescale φ).
        generator: the call's generator (or list of generators), for hooks that draw noise.
        step_index (`int`): index of the current step, 0-based; -1 before the loop.
        timestep: the current timestep.
        latents (`torch.Tensor`): the scheduler's current sample.
        model_input (`torch.Tensor`): what the model saw for this step (scaled by the scheduler).
        extras (`dict`): free room for hooks that need to share per-call data (e.g. the pipeline).

    `to_x0` / `from_x0` refer to the current step's model input and its noise level at every hook point,
    `step_end` included: the noise level is pinned when the step's model input is set, so a sigma
    scheduler that has already advanced its index (Euler, LMS, DPM-Solver after `scheduler.step`) still
    converts with the sigma the model saw. Hooks keep per-call state in `state.memory(self)`, so one hook
    object serves several calls at once.

    Flow matching (``family == "flow"``): the model input is the latents, x = (1 - sigma) x0 + sigma eps with
    sigma = `scheduler.sigmas` at the pinned index, and x0 = x - sigma v, eps = x + (1 - sigma) v. With an
    order-2 scheduler (FlowMatchHeun) the hook points run once per model call: the second call of a step
    sees the Euler predictor at the next sigma, and converts with that sigma.
    """

    num_steps: int
    scheduler: Any
    prediction_type: str = "epsilon"
    guidance_scale: float = 7.5
    guidance_rescale: float = 0.0
    generator: Any = None
    step_index: int = -1
    timestep: Any = None
    latents: Optional[torch.Tensor] = None
    model_input: Optional[torch.Tensor] = None
    extras: dict = field(default_factory=dict)
    _alpha_sigma_cache: Optional[tuple] = field(default=None, repr=False, compare=False)
    _model_input64: Optional[tuple] = field(default=None, repr=False, compare=False)
    _sigma_index: Optional[int] = field(default=None, repr=False, compare=False)
    _memories: dict = field(default_factory=dict, repr=False, compare=False)

    def update(self, step_index: int, timestep: Any, latents: torch.Tensor, model_input: Optional[torch.Tensor]) -> None:
        self.step_index = step_index
        self.timestep = timestep
        self.latents = latents
        self.set_model_input(model_input)

    def set_model_input(self, model_input: Optional[torch.Tensor]) -> None:
        """Set this step's model input and pin the scheduler index its noise level is read from."""
        self.model_input = model_input
        self._sigma_index = getattr(self.scheduler, "step_index", None)

    def memory(self, hook: Any) -> dict:
        """A dict private to `hook` for the duration of this call (momentum buffers, recorded features).

        Per call, not per hook object: two calls that share a hook object never see each other's state.
        """
        return self._memories.setdefault(id(hook), {})

    @property
    def progress(self) -> float:
        """Fraction of the steps already done before the current one, in [0, 1)."""
        return self.step_index / max(self.num_steps, 1)

    # ------------------------------------------------------------------ alphas and sigmas

    def alpha_sigma(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha_t, sigma_t) in float64 such that model_input = alpha_t x0 + sigma_t eps.

        For sigma schedulers (Euler, LMS) the model input is the scaled latents, so the VP form holds
        for it with alpha = 1/sqrt(s^2+1) and sigma = s/sqrt(s^2+1). Cached per step: a guidance hook
        converts cond, uncond and the result with the same pair.
        """
        key = (self.step_index, id(self.scheduler), self._sigma_index, self._timestep_key())
        if self._alpha_sigma_cache is not None and self._alpha_sigma_cache[0] == key:
            return self._alpha_sigma_cache[1]
        value = self._compute_alpha_sigma()
        self._alpha_sigma_cache = (key, value)
        return value

    def _input64(self) -> torch.Tensor:
        # A guidance hook converts cond, uncond and its result against the same model input.
        if self._model_input64 is None or self._model_input64[0] is not self.model_input:
            x = self.model_input
            self._model_input64 = (x, x.to(math_dtype(x.device)))
        return self._model_input64[1]

    def _coefficients(self) -> tuple[float, float]:
        # Python floats are doubles: scaling a float64 tensor by them stays float64 on any device,
        # without a host-to-device copy per conversion.
        alpha, sigma = self.alpha_sigma()
        return float(alpha), float(sigma)

    def _timestep_key(self):
        return float(self.timestep) if self.timestep is not None else None

    def _compute_alpha_sigma(self) -> tuple[torch.Tensor, torch.Tensor]:
        family = scheduler_family(self.scheduler)
        if family is None:
            raise ValueError(
                f"scheduler: {type(self.scheduler).__name__} is not supported for x0 conversions; "
                f"accepted: {', '.join(sorted(SUPPORTED_SCHEDULERS + FLOW_SCHEDULERS))}, or UniPC / DPM-Solver++ "
                "with use_flow_sigmas=True (or use space='model')"
            )
        if family == "vp":
            t = int(self.timestep)
            alpha_bar = self.scheduler.alphas_cumprod[t].to(torch.float64)
            return alpha_bar.sqrt(), (1.0 - alpha_bar).sqrt()
        s = self._current_sigma()
        if family == "flow":
            return 1.0 - s, s
        alpha = 1.0 / torch.sqrt(s * s + 1.0)
        return alpha, s * alpha

    def _current_sigma(self) -> torch.Tensor:
        sched = self.scheduler
        # The index pinned with the model input: after `scheduler.step` the scheduler's own index points
        # at the next sigma, which does not belong to this step's model input.
        index = self._sigma_index
        if index is None and getattr(sched, "begin_index", None) is not None:
            index = sched.begin_index  # Flux, Qwen-Image, Wan and img2img set it before the loop
        if index is None:
            index = sched.index_for_timestep(self.timestep) if hasattr(sched, "index_for_timestep") else self.step_index
        return sched.sigmas[index].to(torch.float64)

    # ------------------------------------------------------------------ conversions

    def to_x0(self, pred: torch.Tensor, model_input: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Model prediction (eps, v or x0) -> predicted clean sample, in float64 (float32 on MPS)."""
        x = self._input64() if model_input is None else model_input.to(math_dtype(model_input.device))
        pred = pred.to(x.dtype)
        alpha, sigma = self._coefficients()
        if self.prediction_type == "epsilon":
            return (x - sigma * pred) / alpha
        if self.prediction_type == "v_prediction":
            return alpha * x - sigma * pred
        if self.prediction_type == "sample":
            return pred
        if self.prediction_type == FLOW_PREDICTION:
            self._check_flow()
            return x - sigma * pred
        raise self._unsupported_prediction()

    def from_x0(self, x0: torch.Tensor, model_input: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Predicted clean sample -> the model's prediction type, in float64 (float32 on MPS); inverse of `to_x0`."""
        x = self._input64() if model_input is None else model_input.to(math_dtype(model_input.device))
        x0 = x0.to(x.dtype)
        alpha, sigma = self._coefficients()
        if self.prediction_type == "epsilon":
            return (x - alpha * x0) / sigma
        if self.prediction_type == "v_prediction":
            return (alpha * x - x0) / sigma
        if self.prediction_type == "sample":
            return x0
        if self.prediction_type == FLOW_PREDICTION:
            self._check_flow()
            return (x - x0) / sigma
        raise self._unsupported_prediction()

    def to_eps(self, pred: torch.Tensor, model_input: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Model prediction -> the noise eps of model_input = alpha x0 + sigma eps, in float64 (float32 on MPS).

        For a flow model eps = x + (1 - sigma) v, the point the Euler step moves towards.
        """
        x = self._input64() if model_input is None else model_input.to(math_dtype(model_input.device))
        alpha, sigma = self._coefficients()
        if self.prediction_type == FLOW_PREDICTION:
            self._check_flow()
            return x + alpha * pred.to(x.dtype)
        if self.prediction_type == "epsilon":
            return pred.to(x.dtype)
        return (x - alpha * self.to_x0(pred, model_input)) / sigma

    def _check_flow(self) -> None:
        if scheduler_family(self.scheduler) != "flow":
            raise ValueError(
                f"prediction_type: 'flow_prediction' needs a flow-matching scheduler, not {type(self.scheduler).__name__}; "
                "accepted: FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler, or UniPC / DPM-Solver++ "
                "multistep with use_flow_sigmas=True"
            )

    def _unsupported_prediction(self) -> ValueError:
        return ValueError(
            f"prediction_type: {self.prediction_type!r} is not supported; "
            "accepted: 'epsilon', 'v_prediction', 'sample', 'flow_prediction'"
        )


class SamplerHook:
    """Base class of every guidekit hook; every point is a no-op by default.

    Subclasses that fill the guidance slot set ``slot = "guidance"`` and implement `guide`.
    A hook that keeps state across steps resets it in `begin`, which runs at the start of every call.
    """

    #: ``"guidance"`` for hooks that combine the conditional and unconditional predictions.
    slot: Optional[str] = None
    #: Guidance hooks: the scale this hook asks for, or None to take the pipeline call's.
    guidance_scale: Optional[float] = None
    #: Attention layers (names) whose processors this hook replaces; two hooks may not share one.
    attention_layers: Optional[frozenset] = None

    def validate(self, state: SamplerState) -> None:
        """Raise a ValueError when this hook cannot run with this pipeline/scheduler."""

    def begin(self, state: SamplerState) -> None:
        pass

    def init_latents(self, state: SamplerState, latents: torch.Tensor) -> torch.Tensor:
        return latents

    def step_begin(self, state: SamplerState) -> None:
        pass

    def needs_uncond(self, state: SamplerState) -> bool:
        """Guidance hooks: whether this step needs the unconditional prediction."""
        return False

    def guide(self, state: SamplerState, pred_cond: torch.Tensor, pred_uncond: Optional[torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def correct(self, state: SamplerState, pred: torch.Tensor) -> torch.Tensor:
        return pred

    def step_end(self, state: SamplerState) -> None:
        pass

    def end(self, state: SamplerState) -> None:
        pass

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class HookChain:
    """An ordered, checked set of hooks for one call: one guidance hook plus the others in order.

    Args:
        hooks: the user's hooks, in the order they should run.
        default_guidance: the guidance hook used when `hooks` has none (CFG).
    """

    def __init__(self, hooks: Union[SamplerHook, Iterable[SamplerHook], None], default_guidance: SamplerHook):
        hooks = as_hook_list(hooks)
        for hook in hooks:
            if not isinstance(hook, SamplerHook):
                raise ValueError(
                    f"hooks: {hook!r} is not a guidekit SamplerHook; accepted: instances such as guidekit.CFG(), guidekit.APG()"
                )
        guidance = [h for h in hooks if h.slot == "guidance"]
        if len(guidance) > 1:
            raise HookConflictError(
                f"hooks: {guidance[0]!r} and {guidance[1]!r} both fill the guidance slot; pass exactly one guidance hook"
            )
        for i, a in enumerate(hooks):
            for b in hooks[i + 1 :]:
                if a is b:
                    raise HookConflictError(f"hooks: {a!r} is passed twice; pass each hook once")
                if a.attention_layers and b.attention_layers and a.attention_layers & b.attention_layers:
                    shared = sorted(a.attention_layers & b.attention_layers)
                    raise HookConflictError(
                        f"hooks: {a!r} and {b!r} both replace the attention processors of {shared[:3]}"
                        f"{' ...' if len(shared) > 3 else ''}; give them disjoint layers"
                    )
        self.guidance: SamplerHook = guidance[0] if guidance else default_guidance
        self.others: list[SamplerHook] = [h for h in hooks if h.slot != "guidance"]
        self.all: list[SamplerHook] = [self.guidance] + self.others

    def validate(self, state: SamplerState) -> None:
        for hook in self.all:
            hook.validate(state)

    def begin(self, state: SamplerState) -> None:
        """Run every hook's `begin`; if one raises, end the ones already begun (in reverse) and re-raise.

        So a failed start leaves nothing installed (attention processors, buffers) on the user's model.
        """
        begun: list[SamplerHook] = []
        try:
            for hook in self.all:
                hook.begin(state)
                begun.append(hook)
        except BaseException:
            for hook in reversed(begun):
                try:
                    hook.end(state)
                except BaseException:  # the begin error is the one to report
                    pass
            raise

    def init_latents(self, state: SamplerState, latents: torch.Tensor) -> torch.Tensor:
        for hook in self.all:
            latents = hook.init_latents(state, latents)
        return latents

    def step_begin(self, state: SamplerState) -> None:
        for hook in self.all:
            hook.step_begin(state)

    def needs_uncond(self, state: SamplerState) -> bool:
        return self.guidance.needs_uncond(state)

    def guide(self, state: SamplerState, pred_cond: torch.Tensor, pred_uncond: Optional[torch.Tensor]) -> torch.Tensor:
        return self.guidance.guide(state, pred_cond, pred_uncond)

    def correct(self, state: SamplerState, pred: torch.Tensor) -> torch.Tensor:
        for hook in self.others:
            pred = hook.correct(state, pred)
        return pred

    def step_end(self, state: SamplerState) -> None:
        for hook in self.all:
            hook.step_end(state)

    def end(self, state: SamplerState) -> None:
        """Run every hook's `end`, even if one of them raises (restores what `begin` installed)."""
        error: Optional[BaseException] = None
        for hook in reversed(self.all):
            try:
                hook.end(state)
            except BaseException as exc:  # keep tearing down the others, re-raise the first
                error = error or exc
        if error is not None:
            raise error


def as_hook_list(hooks: Union[SamplerHook, Iterable[SamplerHook], None]) -> list:
    """`hooks` as a list: None, one hook, or an iterable of hooks (checked in `HookChain`)."""
    if hooks is None:
        return []
    if isinstance(hooks, SamplerHook):
        return [hooks]
    if isinstance(hooks, (str, bytes)) or not isinstance(hooks, Iterable):
        raise ValueError(
            f"hooks: {hooks!r} is not accepted; accepted: a guidekit SamplerHook such as guidekit.APG(), "
            "a list of them, or None"
        )
    return list(hooks)


def resolve_guidance_scale(call_scale: Optional[float], hooks: Sequence[SamplerHook], default: float = 7.5) -> float:
    """The call's guidance scale: the call's, else the guidance hook's, else `default`.

    A guidance hook whose own scale contradicts an explicitly passed call scale is an error. Any finite
    scale is accepted, as in the stock pipelines: at w <= 1 no unconditional pass runs.
    """
    hook_scales = [(h, h.guidance_scale) for h in hooks if h.slot == "guidance" and h.guidance_scale is not None]
    if call_scale is not None:
        call_scale = float(call_scale)
        for hook, scale in hook_scales:
            if float(scale) != call_scale:
                raise ValueError(
                    f"guidance_scale: the call passes {call_scale} but {hook!r} was built with guidance_scale={scale}; "
                    "pass the scale in one place (or the same value in both)"
                )
        scale = call_scale
    elif hook_scales:
        scale = float(hook_scales[0][1])
    else:
        scale = float(default)
    if not math.isfinite(scale):
        raise ValueError(f"guidance_scale: {scale} is not accepted; accepted: a finite number (w <= 1 disables guidance)")
    return scale
