"""Model families of the entry points (generate, batch jobs, the demo): which hooked pipeline a model folder
loads as, where its guidance slot's scale goes, and which methods run on it.

The family is read from the model's `model_index.json` (`_class_name`), never from its name. Stable Diffusion
1.x/2.x and SDXL run every method as before; the flow-matching families (SD3, Flux, Qwen-Image) run the guidance
slot's methods, CFG and APG, and refuse the others with a message naming the method and the family.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

__all__ = ["Family", "FAMILIES", "FLOW_METHODS", "FLOW_IMAGE_METHODS", "METHOD_NAMES", "MethodRefused", "family_of_config",
           "family_of_pipe", "check_method", "check_scale", "scale_kwargs", "slot_hooks"]

#: What the messages call each method (the key is the name the entry points check).
METHOD_NAMES = {
    "cfg": "CFG",
    "apg": "APG",
    "uam": "UAM (reconstruct/edit)",
    "styleid": "StyleID style transfer",
    "freenoise": "FreeNoise",
    "elucd": "EluCD classifier guidance",
}

#: The methods the flow-matching families run: the guidance slot (CFG, APG), and on the image families EluCD
#: (`guidekit.EluCD` on FlowMatchEuler; the Wan entry point, `guidekit video`, has no classifier option).
FLOW_METHODS = ("cfg", "apg")
FLOW_IMAGE_METHODS = FLOW_METHODS + ("elucd",)


@dataclass(frozen=True)
class Family:
    """One model family.

    Args:
        name (`str`): short name, recorded in manifests ("sd", "sdxl", "sd3", "flux", "qwenimage", "wan").
        label (`str`): the name messages use.
        stock (`str`): the diffusers pipeline class whose subclasses belong to the family.
        hooked (`str`): the `guidekit.pipelines` class the entry points load.
        scale_argument (`str`): the pipeline argument that is the guidance slot's scale w.
        true_cfg (`bool`): whether the unconditional pass runs only with a negative prompt (Flux, Qwen-Image).
        default_scale (`float` or `None`): w when none is given; None keeps the entry point's own default.
        methods (`tuple` or `None`): the methods it runs (keys of `METHOD_NAMES`); None: every method.
        video (`bool`): a text-to-video family.
    """

    name: str
    label: str
    stock: str
    hooked: str
    scale_argument: str = "guidance_scale"
    true_cfg: bool = False
    default_scale: Optional[float] = None
    methods: Optional[tuple] = None
    video: bool = False

    @property
    def is_flow(self) -> bool:
        return self.methods is not None

    def runs(self, method: str) -> bool:
        return self.methods is None or method in self.methods


# Order matters: SDXL before SD is not needed (neither subclasses the other), but a family is found by the
# first stock class the model's class derives from.
FAMILIES = (
    Family("sdxl", "SDXL", "StableDiffusionXLPipeline", "GuidedStableDiffusionXLPipeline"),
    Family("sd", "Stable Diffusion 1.x/2.x", "StableDiffusionPipeline", "GuidedStableDiffusionPipeline"),
    # Stock default w of SD3 (7.0) and Qwen-Image (4.0); stock Flux's true_cfg_scale is 1 (true CFG off), so
    # Flux takes Qwen-Image's 4.0, the value of GuidedFluxPipeline's example.
    Family("sd3", "Stable Diffusion 3", "StableDiffusion3Pipeline", "GuidedStableDiffusion3Pipeline",
           default_scale=7.0, methods=FLOW_IMAGE_METHODS),
    Family("flux", "Flux", "FluxPipeline", "GuidedFluxPipeline", scale_argument="true_cfg_scale", true_cfg=True,
           default_scale=4.0, methods=FLOW_IMAGE_METHODS),
    Family("qwenimage", "Qwen-Image", "QwenImagePipeline", "GuidedQwenImagePipeline",
           scale_argument="true_cfg_scale", true_cfg=True, default_scale=4.0, methods=FLOW_IMAGE_METHODS),
    Family("wan", "Wan", "WanPipeline", "GuidedWanPipeline", default_scale=5.0, methods=FLOW_METHODS, video=True),
)


class MethodRefused(ValueError):
    """A method the model's family cannot run; the message names the method and the family."""


def _stock_class(name: str):
    import diffusers

    try:
        return getattr(diffusers, name, None)
    except Exception:  # noqa: BLE001 - a class whose optional dependencies are missing
        return None


def family_of_class(cls) -> Optional[Family]:
    """The family of a pipeline class, or None when it is none of `FAMILIES`."""
    if not isinstance(cls, type):
        return None
    for family in FAMILIES:
        stock = _stock_class(family.stock)
        if isinstance(stock, type) and issubclass(cls, stock):
            return family
    return None


def family_of_config(config: dict) -> Optional[Family]:
    """The family of a model whose `model_index.json` is `config` (a stock diffusers class or one of
    guidekit's, as `save_pretrained` writes it), or None."""
    import diffusers

    import guidekit.pipelines

    name = config.get("_class_name")
    if not isinstance(name, str):
        return None
    try:
        cls = getattr(diffusers, name, None) or getattr(guidekit.pipelines, name, None)
    except Exception:  # noqa: BLE001 - a class whose optional dependencies are missing: none of ours
        return None
    return family_of_class(cls)


def family_of_pipe(pipe) -> Optional[Family]:
    """The family of a loaded pipeline, or None."""
    return family_of_class(type(pipe))


def hooked_class(family: Family):
    import guidekit.pipelines

    return getattr(guidekit.pipelines, family.hooked)


def refusal(family: Family, method: str) -> str:
    """The message for `method` on `family`: the method, the family and what runs there."""
    accepted = ", ".join(METHOD_NAMES[m] for m in family.methods or ())
    return (f"{METHOD_NAMES.get(method, method)} does not run on {family.label} models ({family.stock}); "
            f"accepted there: {accepted}")


def check_method(family: Optional[Family], method: str) -> None:
    """Raise `MethodRefused` when `family` cannot run `method` (a key of `METHOD_NAMES`); None runs all."""
    if family is not None and not family.runs(method):
        raise MethodRefused(refusal(family, method))


def scale_kwargs(family: Optional[Family], scale: float, negative_prompt=None) -> dict:
    """The pipeline arguments of the guidance slot: w under the family's `scale_argument`, and the negative
    prompt; a true-CFG family (Flux, Qwen-Image) gets "" when none is given, so that the unconditional pass,
    which CFG and APG need, runs."""
    name = family.scale_argument if family is not None else "guidance_scale"
    if family is not None and family.true_cfg and not negative_prompt and scale > 1:
        negative_prompt = ""
    return {name: scale, "negative_prompt": negative_prompt}


def check_scale(family: Optional[Family], scale: float) -> None:
    """Raise `ValueError` for a scale below 1 on a true-CFG family: its pipeline runs no unconditional pass at
    true_cfg_scale <= 1, so w < 1 cannot mean what it means elsewhere (uncond + w (cond - uncond))."""
    if family is not None and family.true_cfg and scale < 1:
        raise ValueError(f"{scale:g} is below 1, where {family.label} ({family.stock}) runs no unconditional pass "
                         f"(its {family.scale_argument} turns true CFG on above 1); accepted there: 1 (no guidance) "
                         "or above")


def slot_hooks(family: Optional[Family], scale: float, hooks: list) -> list:
    """The guidance-slot hooks of a call: none on a true-CFG family at w = 1, whose pipeline then runs only the
    conditional pass; CFG and APG give exactly the conditional prediction at w = 1 (APG asks for no
    unconditional pass at w <= 1), so the image is theirs, and the pipeline's refusal of a hook without an
    unconditional pass does not apply."""
    if family is not None and family.true_cfg and scale <= 1:
        return []
    return list(hooks)
