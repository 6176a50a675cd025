"""What the hooked pipelines share: setting up a call's hooks, the guided prediction of one step, and
`from_pipe` that shares the components without converting them."""

from __future__ import annotations

import inspect
from typing import Callable, Optional, Sequence, Union

import torch

from guidekit.guidance.cfg import CFG
from guidekit.hooks import HookChain, SamplerHook, SamplerState, as_hook_list, resolve_guidance_scale


def _copy_scheduler(scheduler):
    return type(scheduler).from_config(scheduler.config)


class SharedComponentsMixin:
    """`from_pipe` that shares the source pipeline's modules exactly as they are.

    diffusers' `from_pipe` ends with `new.to(dtype)`, float32 unless told otherwise, and the modules are
    shared, so an fp16/bf16 pipeline is converted in place, the user's own object included. Here nothing
    is converted or moved, and the new pipeline gets its own copy of the scheduler (schedulers keep
    per-call state and a config that must not change under the user). Pass `dtype=` / `torch_dtype=` to
    ask for diffusers' conversion explicitly.
    """

    @classmethod
    def from_pipe(cls, pipeline, **kwargs):
        if kwargs.get("dtype") is not None or kwargs.get("torch_dtype") is not None or "custom_pipeline" in kwargs:
            return super().from_pipe(pipeline, **kwargs)
        kwargs.pop("dtype", None)
        kwargs.pop("torch_dtype", None)
        expected, optional = cls._get_signature_keys(cls)
        parameters = inspect.signature(cls.__init__).parameters
        components = {k: v for k, v in pipeline.components.items() if k in expected}
        scheduler = None if "scheduler" in kwargs else components.get("scheduler")
        if scheduler is not None:
            components["scheduler"] = _copy_scheduler(scheduler)
        config = dict(pipeline.config)
        settings = {k: config[k] for k in optional if k in config}
        settings.update({k[1:]: config[k] for k in config if k.startswith("_") and k[1:] in optional and k[1:] not in settings})
        init = {**components, **settings, **kwargs}
        optional_components = getattr(cls, "_optional_components", [])
        for k in expected:
            if k not in init and parameters[k].default is inspect.Parameter.empty:
                if k not in optional_components:
                    raise ValueError(
                        f"pipeline: {type(pipeline).__name__} has no {k!r} component, which {cls.__name__} needs"
                    )
                init[k] = None
        new = cls(**init)
        if scheduler is not None:
            # The SD constructor rewrites some scheduler settings (clip_sample, steps_offset) with a warning;
            # the user's scheduler, as it is, is what the stock pipeline runs, so it is what this one runs.
            new.register_modules(scheduler=_copy_scheduler(scheduler))
        if config.get("_name_or_path") is not None:
            new.register_to_config(_name_or_path=config["_name_or_path"])
        if hasattr(pipeline, "watermark") and "add_watermarker" not in kwargs:
            new.watermark = pipeline.watermark  # SDXL: the source's watermarker, not a new default
        return new


class HookedPipelineMixin(SharedComponentsMixin):
    """Adds `hooks` to a diffusers pipeline: the pipeline's loop calls `guided_prediction` each step."""

    #: The stock default guidance scale of the pipeline class this mixin is combined with.
    default_guidance_scale: float = 7.5
    #: Hooks used when a call passes none (set by `guidekit.attach`).
    attached_hooks: tuple = ()
    #: Whether the running call encoded negative prompts (set by the pipeline after encoding).
    _uncond_encoded: bool = True

    def start_hooks(
        self,
        hooks: Union[SamplerHook, Sequence[SamplerHook], None],
        guidance_scale: Optional[float],
        guidance_rescale: float,
        generator,
    ) -> tuple[HookChain, SamplerState]:
        """Check the hooks, resolve the guidance scale and build the call's `SamplerState`."""
        hooks = list(self.attached_hooks) if hooks is None else as_hook_list(hooks)
        scale = resolve_guidance_scale(guidance_scale, hooks, default=self.default_guidance_scale)
        chain = HookChain(hooks, default_guidance=CFG())
        state = SamplerState(
            num_steps=0,
            scheduler=self.scheduler,
            prediction_type=self.scheduler.config.get("prediction_type", "epsilon"),
            guidance_scale=scale,
            guidance_rescale=guidance_rescale,
            generator=generator,
            extras={"pipeline": self},
        )
        return chain, state

    @staticmethod
    def warn_deprecated_callbacks(callback, callback_steps) -> None:
        """The stock pipelines' deprecation warnings for `callback` / `callback_steps` (still accepted)."""
        from diffusers.utils import deprecate

        message = "Passing `{}` as an input argument to `__call__` is deprecated, consider using `callback_on_step_end`"
        if callback is not None:
            deprecate("callback", "1.0.0", message.format("callback"))
        if callback_steps is not None:
            deprecate("callback_steps", "1.0.0", message.format("callback_steps"))

    def use_uncond(self, chain: HookChain, state: SamplerState) -> bool:
        """Whether this step runs the unconditional batch (never when the call encoded no negative prompt)."""
        return self._uncond_encoded and self.do_classifier_free_guidance and chain.needs_uncond(state)

    def guided_prediction(
        self,
        chain: HookChain,
        state: SamplerState,
        step_index: int,
        t: torch.Tensor,
        latents: torch.Tensor,
        model: Callable[[torch.Tensor, torch.Tensor, bool], torch.Tensor],
    ) -> torch.Tensor:
        """One step's prediction: scale the input, run the model, guide, correct.

        `model(model_input, t, with_uncond)` runs the denoiser on the batch `[uncond, cond]` when `with_uncond`
        and on the conditional batch alone otherwise.
        """
        # Read per step, as stock does: a callback may change `pipe._guidance_scale` mid-run (CFG cutoffs).
        state.guidance_scale = float(self._guidance_scale)
        state.update(step_index, t, latents, model_input=None)
        with_uncond = self.use_uncond(chain, state)
        model_input = torch.cat([latents] * 2) if with_uncond else latents
        if hasattr(self.scheduler, "scale_model_input"):  # flow-matching schedulers have none: input = latents
            model_input = self.scheduler.scale_model_input(model_input, t)
        state.set_model_input(model_input.chunk(2)[1] if with_uncond else model_input)
        chain.step_begin(state)
        pred = model(model_input, t, with_uncond)
        pred_uncond, pred_cond = pred.chunk(2) if with_uncond else (None, pred)
        pred = chain.guide(state, pred_cond, pred_uncond)
        return chain.correct(state, pred)
