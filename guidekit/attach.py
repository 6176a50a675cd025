"""`attach`: a hooked copy of a stock diffusers pipeline, sharing its components."""

from __future__ import annotations

from .hooks import HookChain, SamplerHook
from .guidance.cfg import CFG


def _hooked_classes():
    from diffusers import (
        AnimateDiffPipeline,
        AnimateDiffSDXLPipeline,
        DDPMPipeline,
        DiTPipeline,
        FluxPipeline,
        QwenImagePipeline,
        StableDiffusion3Pipeline,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        WanPipeline,
    )

    from guidekit.pipelines import (
        GuidedAnimateDiffPipeline,
        GuidedAnimateDiffSDXLPipeline,
        GuidedDDPMPipeline,
        GuidedDiTPipeline,
        GuidedFluxPipeline,
        GuidedQwenImagePipeline,
        GuidedStableDiffusion3Pipeline,
        GuidedStableDiffusionPipeline,
        GuidedStableDiffusionXLPipeline,
        GuidedWanPipeline,
    )

    # Most specific first: a hooked pipeline is also an instance of its stock parent.
    return [
        (GuidedStableDiffusionXLPipeline, GuidedStableDiffusionXLPipeline),
        (GuidedStableDiffusionPipeline, GuidedStableDiffusionPipeline),
        (GuidedStableDiffusion3Pipeline, GuidedStableDiffusion3Pipeline),
        (GuidedDiTPipeline, GuidedDiTPipeline),
        (GuidedDDPMPipeline, GuidedDDPMPipeline),
        (GuidedAnimateDiffPipeline, GuidedAnimateDiffPipeline),
        (GuidedAnimateDiffSDXLPipeline, GuidedAnimateDiffSDXLPipeline),
        (GuidedFluxPipeline, GuidedFluxPipeline),
        (GuidedQwenImagePipeline, GuidedQwenImagePipeline),
        (GuidedWanPipeline, GuidedWanPipeline),
        (StableDiffusionXLPipeline, GuidedStableDiffusionXLPipeline),
        (StableDiffusionPipeline, GuidedStableDiffusionPipeline),
        (StableDiffusion3Pipeline, GuidedStableDiffusion3Pipeline),
        (DiTPipeline, GuidedDiTPipeline),
        (DDPMPipeline, GuidedDDPMPipeline),
        (AnimateDiffPipeline, GuidedAnimateDiffPipeline),
        (AnimateDiffSDXLPipeline, GuidedAnimateDiffSDXLPipeline),
        (FluxPipeline, GuidedFluxPipeline),
        (QwenImagePipeline, GuidedQwenImagePipeline),
        (WanPipeline, GuidedWanPipeline),
    ]


def attach(pipe, *hooks: SamplerHook):
    """Return a pipeline that runs `hooks` on every call, built from `pipe` without changing it.

    The new pipeline shares `pipe`'s components (no copy of the weights), as diffusers' `from_pipe` does;
    `pipe` itself keeps its class and its behaviour. A call may still pass `hooks=[...]` to override.

    Example:
        >>> pipe = StableDiffusionPipeline.from_pretrained(model_id)
        >>> apg_pipe = guidekit.attach(pipe, guidekit.APG())
    """
    chain = HookChain(hooks, default_guidance=CFG())  # check the combination now, not at the first call
    for stock, hooked in _hooked_classes():
        if isinstance(pipe, stock):
            check = getattr(hooked, "check_hooks", None)
            if check is not None:
                check(chain)  # what this pipeline cannot run (e.g. APG on an unconditional model)
            new = hooked.from_pipe(pipe)
            new.attached_hooks = tuple(hooks)
            return new
    accepted = ", ".join(sorted({s.__name__ for s, _ in _hooked_classes()}))
    raise ValueError(f"pipe: {type(pipe).__name__} is not supported by attach; accepted: {accepted} (and subclasses)")
