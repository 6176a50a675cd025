"""The one place that resolves the defaults of a request: its guidance method and scale, steps, sampler, and the
APG and classifier-guidance settings, for the model it runs on.

`guidekit generate`, `guidekit video`, `guidekit batch` (image, classifier and video jobs) and the demo all call
`resolve_defaults`, so that the same request gets the same settings from each of them. The rules, in order:

- A value the user gave (not None) always wins.
- The embedded models have recommended settings (`guidekit.toy.settings_for`, read from the model folder's
  weights): their guidance scale, steps and APG settings; with the embedded classifier, its EluCD settings and
  sampler (`elucd_sampler`, which also sets the steps).
- A request with an empty prompt and no negative prompt gives CFG and APG nothing to steer toward: its scale is 1
  (one pass per step, no unconditional batch), as in the EluCD paper's unconditional runs.
- Any other model: its family's scale (`guidekit.apps.families`: SD3 7.0, Flux and Qwen-Image 4.0, Wan 5.0), else
  `STOCK_SCALE`; `DEFAULT_STEPS`; the papers' APG and EluCD defaults; the pipeline's own scheduler.
- The method: APG for images (guidekit's drop-in replacement for CFG), CFG for videos.

This module imports neither torch nor diffusers at import time.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

__all__ = ["REQUESTS", "METHODS", "DEFAULT_METHOD", "STOCK_SCALE", "DEFAULT_STEPS", "PAPER_CLASSIFIER_SCALE",
           "PLAIN_SHARED", "APG_KEYS", "FREENOISE_DEFAULTS", "Defaults", "resolve_defaults", "default_method",
           "model_settings",
           "model_path_of", "is_embedded_classifier", "paper_apg", "scheduler_for", "using_sampler",
           "sampler_label", "hook_settings", "ran_settings"]

#: The kinds of request: a text-to-image call, one with classifier guidance (EluCD), a video.
REQUESTS = ("image", "classifier", "video")
#: The guidance slot's methods.
METHODS = ("cfg", "apg")
#: The method when none is given, by request.
DEFAULT_METHOD = {"image": "apg", "classifier": "apg", "video": "cfg"}
#: Guidance scale of a Stable Diffusion 1.x/2.x, SDXL or AnimateDiff model without a recommendation (diffusers'
#: StableDiffusionPipeline default).
STOCK_SCALE = 7.5
#: Denoising steps when neither the user nor a recommendation gives them.
DEFAULT_STEPS = 25
#: Classifier scale without a recommendation: `guidekit.EluCD`'s default, the official classifier_scale of the
#: EluCD DDPM script.
PAPER_CLASSIFIER_SCALE = 1.0
#: The keys of a recommended EluCD setting that plain classifier guidance takes too, so that the two differ only
#: by the calibration.
PLAIN_SHARED = ("schedule", "input", "start", "stop")
#: The APG arguments whose defaults depend on the model.
APG_KEYS = ("eta", "norm_threshold", "momentum")
#: guidekit.FreeNoise's settings in `guidekit video`, a batch video job (`freenoise: true`) and the demo's Long video
#: tab: the official window W = 16, stride S = 4 and fusion point, with FreeNoise's noise rescheduling.
FREENOISE_DEFAULTS = {"context_length": 16, "context_stride": 4, "weighting": "pyramid", "noise": "shuffle",
                      "fusion": "attention", "motion_injection": None}


@dataclass(frozen=True)
class Defaults:
    """The resolved settings of one request.

    Args:
        request (`str`): one of `REQUESTS`.
        method (`str`): the guidance slot's method, "cfg" or "apg".
        guidance_scale (`float`): w.
        steps (`int`): denoising steps.
        sampler (`dict` or `None`): the scheduler to swap in for the call, {"scheduler": name, "scheduler_kwargs":
            {...}} (`scheduler_for`); None keeps the pipeline's own.
        apg (`dict`): `guidekit.APG` keyword arguments (`APG_KEYS`, and any others a recommendation gives).
        classifier (`dict` or `None`): keyword arguments of the classifier hook (`guidekit.EluCD`, or
            `guidekit.ClassifierGuidance` for the plain calibration) other than the classifier and labels, its
            `scale` included; None without a classifier.
        recommended (`str` or `None`): the embedded model whose recommendation applied (e.g. "toy-sd"), or None.
        classifier_recommended (`bool`): whether the EluCD recommendation (settings and sampler) applied: the
            embedded model steered by the embedded classifier.
    """

    request: str
    method: str
    guidance_scale: float
    steps: int
    sampler: Optional[dict] = None
    apg: dict = field(default_factory=dict)
    classifier: Optional[dict] = None
    recommended: Optional[str] = None
    classifier_recommended: bool = False

    @property
    def scheduler(self) -> Optional[str]:
        """The name of the scheduler swapped in (`sampler`), or None."""
        return None if self.sampler is None else self.sampler.get("scheduler")


def default_method(request: str) -> str:
    """The guidance method of a `request` (one of `REQUESTS`) that names none."""
    _check_request(request)
    return DEFAULT_METHOD[request]


def _check_request(request: str) -> None:
    if request not in REQUESTS:
        raise ValueError(f"request: {request!r} is not accepted; accepted: {', '.join(map(repr, REQUESTS))}")


def model_path_of(pipe) -> Optional[str]:
    """The folder (or hub id) a loaded pipeline came from, or None."""
    path = getattr(pipe, "name_or_path", None)
    if not path:
        path = getattr(getattr(pipe, "config", None), "_name_or_path", None)
    return str(path) if path else None


def _embedded_model_path() -> Optional[Path]:
    try:
        from guidekit import toy

        return Path(toy.default_model_path())
    except (ImportError, AttributeError, FileNotFoundError):
        return None


def model_settings(model=None, pipe=None, embedded: Optional[bool] = None) -> Optional[dict]:
    """The recommended settings (`guidekit.toy.settings_for`) of the model the request runs on, or None.

    Args:
        model (`str` or `os.PathLike`, *optional*): its folder or hub id; None with no `pipe`: the embedded model.
        pipe (*optional*): the loaded pipeline, whose folder is read when `model` is None.
        embedded (`bool`, *optional*): True: the embedded image model's settings whatever the folder (a caller that
            knows); False: none; None: read from the folder.
    """
    from guidekit import toy

    if embedded is False:
        return None
    if embedded:
        path = _embedded_model_path()
        return toy.settings_for(path) if path is not None else None
    if model is None:
        model = model_path_of(pipe) if pipe is not None else _embedded_model_path()
    return toy.settings_for(model) if model is not None else None


def _recommended_name(model=None, pipe=None, embedded: Optional[bool] = None) -> Optional[str]:
    from guidekit.toy.settings import embedded_name

    if embedded is False:
        return None
    if embedded:
        return embedded_name(_embedded_model_path())
    if model is None:
        model = model_path_of(pipe) if pipe is not None else _embedded_model_path()
    return embedded_name(model)


def is_embedded_classifier(path) -> bool:
    """Whether `path` is the embedded classifier's folder (`guidekit.toy.default_classifier_path`)."""
    if path is None:
        return False
    try:
        from guidekit import toy

        return Path(str(path)).expanduser().resolve() == Path(toy.default_classifier_path()).resolve()
    except (AttributeError, FileNotFoundError, OSError):
        return False


def paper_apg() -> dict:
    """`guidekit.APG`'s own defaults of `APG_KEYS` (the paper's SDXL values)."""
    from guidekit.guidance.apg import APG

    params = inspect.signature(APG.__init__).parameters
    return {k: params[k].default for k in APG_KEYS}


def _classifier_settings(recommendation: Optional[dict], calibration: str, scale: Optional[float]) -> dict:
    if recommendation is None:
        return {"scale": PAPER_CLASSIFIER_SCALE if scale is None else float(scale)}
    rec = dict(recommendation)
    if calibration != "elucd":
        rec = {k: rec[k] for k in ("scale", *PLAIN_SHARED) if k in rec}
    if scale is not None:
        rec["scale"] = float(scale)
    return rec


def resolve_defaults(request: str = "image", *, model=None, pipe=None, family=None, embedded: Optional[bool] = None,
                     prompt: Optional[str] = None, negative_prompt: Optional[str] = None, classifier=None,
                     calibration: str = "elucd", method: Optional[str] = None,
                     guidance_scale: Optional[float] = None, steps: Optional[int] = None,
                     eta: Optional[float] = None, norm_threshold: Optional[float] = None,
                     momentum: Optional[float] = None, classifier_scale: Optional[float] = None) -> Defaults:
    """The settings of one request: each value given (not None), else the default for the model (see the module).

    Args:
        request (`str`): "image", "classifier" (an image with classifier guidance) or "video"; "image" with a
            `classifier` is a "classifier" request.
        model (`str` or `os.PathLike`, *optional*): the model's folder or hub id (for a video, the folder whose
            denoiser it runs: an AnimateDiff folder, or the image model a motion adapter is paired with). None:
            the folder of `pipe`, or the embedded model without one.
        pipe (*optional*): the loaded pipeline; its family is read from it when `family` is None.
        family (`guidekit.apps.families.Family`, *optional*): the model's family (None: Stable Diffusion, or unknown).
        embedded (`bool`, *optional*): whether the model is the embedded image model, when the caller knows
            (`model_settings`); None reads it from the folder.
        prompt (`str`, *optional*): the prompt; "" (with no `negative_prompt`) makes the default scale 1.
        negative_prompt (`str`, *optional*): the negative prompt.
        classifier (`str`, *optional*): the classifier's folder, for a "classifier" request.
        calibration (`str`): "elucd" or "plain" (uncalibrated classifier guidance).
        method, guidance_scale, steps, eta, norm_threshold, momentum, classifier_scale: the user's values; None
            for each not given.

    Returns:
        `Defaults`.
    """
    if request == "image" and classifier is not None:
        request = "classifier"
    _check_request(request)
    if method is not None and method not in METHODS:
        raise ValueError(f"method: {method!r} is not accepted; accepted: {', '.join(map(repr, METHODS))}")
    if family is None and pipe is not None:
        from .families import family_of_pipe

        family = family_of_pipe(pipe)
    settings = model_settings(model, pipe, embedded)
    name = _recommended_name(model, pipe, embedded) if settings is not None else None

    classifier_rec = request == "classifier" and settings is not None and is_embedded_classifier(classifier)
    sampler = None
    if classifier_rec and settings.get("elucd_sampler"):
        rec_sampler = dict(settings["elucd_sampler"])
        sampler = {"scheduler": rec_sampler.get("scheduler"), "scheduler_kwargs": dict(rec_sampler.get(
            "scheduler_kwargs") or {})}
        if sampler["scheduler"] is None and not sampler["scheduler_kwargs"]:
            sampler = None
        rec_steps = rec_sampler.get("steps")
    else:
        rec_steps = None

    if guidance_scale is not None:
        scale = float(guidance_scale)
    elif request != "video" and prompt is not None and not prompt.strip() and not negative_prompt:
        scale = 1.0
    elif settings is not None and settings.get("guidance_scale") is not None:
        scale = float(settings["guidance_scale"])
    elif family is not None and family.default_scale is not None:
        scale = float(family.default_scale)
    else:
        scale = STOCK_SCALE

    if steps is None:
        steps = rec_steps or (settings or {}).get("steps") or DEFAULT_STEPS
    apg = dict(settings["apg"]) if settings is not None and settings.get("apg") is not None else paper_apg()
    for key, value in (("eta", eta), ("norm_threshold", norm_threshold), ("momentum", momentum)):
        if value is not None:
            apg[key] = value
    classifier_kwargs = None
    if request == "classifier":
        recommendation = settings.get("elucd") if classifier_rec else None
        classifier_kwargs = _classifier_settings(recommendation, calibration, classifier_scale)
    return Defaults(request=request, method=method or DEFAULT_METHOD[request], guidance_scale=scale, steps=int(steps),
                    sampler=sampler, apg=apg, classifier=classifier_kwargs, recommended=name,
                    classifier_recommended=classifier_rec)


#----------------------------------------------------------------------------
# The sampler a recommendation swaps in.

#: Short names of schedulers a recommendation may give, besides any diffusers scheduler class name.
SCHEDULER_NAMES = {"ddpm": "DDPMScheduler", "ddim": "DDIMScheduler"}


def sampler_label(name: Optional[str]) -> Optional[str]:
    """The diffusers class name of a sampler's `scheduler` ("ddpm" -> "DDPMScheduler"); None stays None."""
    return None if name is None else SCHEDULER_NAMES.get(name, name)


def scheduler_for(pipe, name: str, kwargs: Optional[dict] = None):
    """A fresh scheduler from `pipe`'s scheduler config (its schedule, prediction type and timestep spacing kept):
    `name` "ddpm", "ddim" or a diffusers scheduler class name; `kwargs` update the config."""
    import diffusers

    cls = getattr(diffusers, sampler_label(name), None) if isinstance(name, str) else None
    if not isinstance(cls, type) or not issubclass(cls, diffusers.SchedulerMixin):
        raise ValueError(f"scheduler: {name!r} is not accepted; accepted: {', '.join(SCHEDULER_NAMES)} or a diffusers "
                         "scheduler class name")
    return cls.from_config(pipe.scheduler.config, **(kwargs or {}))


@contextlib.contextmanager
def using_sampler(pipe, sampler: Optional[dict]):
    """`pipe` with the scheduler of `sampler` ({"scheduler": name, "scheduler_kwargs": {...}}, `scheduler_for`)
    while the block runs, its own put back afterwards (also on an error). None keeps its own. Yields the scheduler
    in use."""
    if sampler is None or (sampler.get("scheduler") is None and not sampler.get("scheduler_kwargs")):
        yield pipe.scheduler
        return
    own = pipe.scheduler
    name = sampler.get("scheduler") or type(own).__name__  # kwargs alone: the pipeline's own kind, reconfigured
    pipe.scheduler = scheduler_for(pipe, name, sampler.get("scheduler_kwargs"))
    try:
        yield pipe.scheduler
    finally:
        pipe.scheduler = own


#----------------------------------------------------------------------------
# What ran, for the manifest.

_NOT_SETTINGS = ("self", "classifier", "decoder")


def _plain(value):
    """`value` as JSON (tuples as lists), or a marker for anything else."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (tuple, list)):
        items = [_plain(v) for v in value]
        return None if any(v is _SKIP for v in items) else items
    return _SKIP


_SKIP = object()


def hook_settings(hook) -> dict:
    """A hook as a manifest records it: {"hook": its class name, and each constructor argument it keeps under the
    same name (the classifier and decoder objects aside), as the hook holds it}."""
    out = {"hook": type(hook).__name__}
    for name in inspect.signature(type(hook).__init__).parameters:
        if name in _NOT_SETTINGS or not hasattr(hook, name):
            continue
        value = _plain(getattr(hook, name))
        if value is not _SKIP:
            out[name] = value
    return out


def ran_settings(method: str, guidance_scale: float, steps: int, scheduler, hooks) -> dict:
    """What one call ran with: the guidance method and scale, the steps, the scheduler's class and every hook
    (`hook_settings`) in order."""
    return {"method": method, "guidance_scale": guidance_scale, "steps": steps,
            "scheduler": type(scheduler).__name__, "hooks": [hook_settings(h) for h in hooks]}
