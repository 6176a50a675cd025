"""Text-to-image jobs: the guidance methods (CFG, APG; a later method adds one entry to `GUIDANCE`), their
defaults for the model (`guidekit.apps.defaults`), and one guided pipeline call (`generate`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

from .defaults import APG_KEYS, DEFAULT_METHOD, Defaults, ran_settings, resolve_defaults, using_sampler
from .jobs_classifier import ClassifierCache, _parse_classifier, resolve_classifier
from .jobs_schema import COMMON, JobError, Param, _NAME, check_family, is_style, is_video


@dataclass(frozen=True)
class Guidance:
    """One guidance method: its own parameters (named as its hook's arguments) and how to build its hook."""

    name: str
    params: dict
    build: Callable[[dict], list]  # resolved params -> hooks for the pipeline call
    call_kwargs: Callable[[dict], dict] = lambda p: {}  # resolved params -> extra stock pipeline arguments


def _cfg_hooks(p: dict) -> list:
    return []  # the pipeline's built-in CFG path (identical to stock diffusers)


def _cfg_kwargs(p: dict) -> dict:
    return {"guidance_rescale": p["guidance_rescale"]}


def _apg_hooks(p: dict) -> list:
    try:
        from guidekit import APG
    except ImportError as e:  # pragma: no cover - only before the APG hook exists
        raise JobError(f"guidance: 'apg' is not available in this guidekit build ({e})") from None
    # norm_threshold 0 in a job means "no rescaling", which the hook spells None
    return [APG(eta=p["eta"], norm_threshold=p["norm_threshold"] or None, momentum=p["momentum"],
                space=p["space"], start=p["start"], stop=p["stop"])]


# The default of APG's eta / norm_threshold / momentum ({} is the paper's SDXL value of the field).
_APG_DEFAULT = ("the recommended setting for the embedded model (guidekit.toy.RECOMMENDED_APG), "
                "else the paper's SDXL value {}.")

#: Parameters of a method whose default depends on the model; `resolve` fills them (`apg_defaults`).
MODEL_DEPENDENT = {"apg": ("eta", "norm_threshold", "momentum")}

GUIDANCE: dict[str, Guidance] = {
    "cfg": Guidance("cfg", {p.name: p for p in [
        Param("guidance_rescale", float, 0.0,
              "CFG rescale phi (Lin et al. 2023); 0 is plain CFG, 0.7 is the paper's value.", min=0.0, max=1.0),
    ]}, _cfg_hooks, _cfg_kwargs),
    "apg": Guidance("apg", {p.name: p for p in [
        # eta, norm_threshold, momentum: None until `resolve` knows the model (MODEL_DEPENDENT)
        Param("eta", float, None,
              "Weight of the guidance component parallel to the prediction, the part that oversaturates; "
              "0 drops it, 1 keeps it as CFG does. Default: " + _APG_DEFAULT.format("0"), min=0.0, max=1.0),
        Param("norm_threshold", float, None,
              "Radius r: the guidance update is rescaled to L2 norm at most r (per image); 0 turns rescaling "
              "off. Default: " + _APG_DEFAULT.format("15"), min=0.0, max=1000.0),
        Param("momentum", float, None,
              "Reverse momentum beta on the guidance update; 0 turns it off. Default: "
              + _APG_DEFAULT.format("-0.5"), min=-0.99, max=0.99),
        Param("space", str, "x0", "Where APG acts: the denoised prediction x0 (paper) or the raw model output.",
              choices=("x0", "model")),
        Param("start", float, 0.0, "Fraction of the steps after which APG starts.", min=0.0, max=1.0),
        Param("stop", float, 1.0, "Fraction of the steps after which APG stops.", min=0.0, max=1.0),
    ]}, _apg_hooks),
}


def _parse_generation(raw: dict, where: str) -> dict:
    """The parameters of a text-to-image job (prompt, guidance method, optional classifier)."""
    # Classifier guidance steers an unconditional image too (the EluCD paper's setting): there "" is a prompt.
    if raw.get("prompt") is None or raw.get("prompt") == "" and raw.get("classifier") is None:
        raise JobError(f"{where}prompt: required, a non-empty string (\"\" is accepted with a classifier: "
                       "unconditional classifier guidance)")
    request = "image" if raw.get("classifier") is None else "classifier"
    params = _parse_method(raw, where, request)
    params.update(_parse_classifier(raw, where))
    return params


def _parse_method(raw: dict, where: str, request: str = "image") -> dict:
    """The fields every generation job has (`COMMON`) and those of its guidance method (none given: the default
    of `request`, `guidekit.apps.defaults.DEFAULT_METHOD`)."""
    if "seed" in raw and "seeds" in raw:
        raise JobError(f"{where}seed and seeds: give one of them, not both")

    params: dict[str, Any] = {}
    for p in COMMON.values():
        v = raw.get(p.name)
        params[p.name] = p.default if v is None else p.check(v, where)
    if params["guidance"] is None:  # the method does not depend on the model: known at parse time
        params["guidance"] = DEFAULT_METHOD[request]
    if params["name"] is not None and not _NAME.match(params["name"]):
        raise JobError(f"{where}name: expected 1-64 letters, digits, '.', '_' or '-', got {params['name']!r}")
    method = GUIDANCE[params["guidance"]]
    for g in GUIDANCE.values():
        for p in g.params.values():
            v = raw.get(p.name)
            if g is method:
                params[p.name] = p.default if v is None else p.check(v, where)
            elif v is not None and p.name not in method.params:
                raise JobError(f"{where}{p.name}: only applies to guidance {g.name!r}, but this job has "
                               f"guidance {method.name!r}; remove it or set \"guidance\": \"{g.name}\"")
    if params["guidance"] == "apg" and params["start"] >= params["stop"]:
        raise JobError(f"{where}start/stop: start ({params['start']}) must be below stop ({params['stop']})")
    return params


def job_defaults(params: dict, pipe=None, embedded: Optional[bool] = None, model=None) -> Defaults:
    """The resolved defaults (`guidekit.apps.defaults.resolve_defaults`) of a job's `params` on `pipe`: the job's
    own values win. `embedded` says whether the model is the embedded one (None: read from the folder); `model`:
    the folder whose recommendation applies (None: `pipe`'s)."""
    request = "video" if is_video(params) else "classifier" if params.get("classifier") is not None else "image"
    return resolve_defaults(
        request, model=model, pipe=pipe, embedded=embedded, prompt=params.get("prompt"),
        negative_prompt=params.get("negative_prompt") or None, classifier=params.get("classifier"),
        calibration=params.get("calibration", "elucd"), method=params.get("guidance"),
        guidance_scale=params.get("guidance_scale"), steps=params.get("steps"),
        **{k: params.get(k) for k in APG_KEYS}, classifier_scale=params.get("classifier_scale"))


def apply_defaults(params: dict, defaults: Defaults) -> dict:
    """`params` with the resolved `defaults` filled in: the method, scale and steps; APG's eta / norm_threshold /
    momentum (APG jobs); the classifier scale. The embedded classifier on the embedded model also records
    `classifier_settings` (the hook's other keyword arguments) and `scheduler` (the sampler swapped in for the
    call, and `scheduler_kwargs` when it has any); other jobs get no such keys, so their keys (file names) do not
    depend on a recommendation they do not use."""
    out = {**params, "guidance": defaults.method, "guidance_scale": defaults.guidance_scale, "steps": defaults.steps}
    for name in MODEL_DEPENDENT.get(defaults.method, ()):
        out[name] = defaults.apg[name]
    if defaults.classifier is not None and params.get("classifier") is not None:
        settings = dict(defaults.classifier)
        out["classifier_scale"] = settings.pop("scale")
        if defaults.classifier_recommended:
            out["classifier_settings"] = settings
            if defaults.sampler is not None:
                out["scheduler"] = defaults.sampler["scheduler"]
                if defaults.sampler.get("scheduler_kwargs"):
                    out["scheduler_kwargs"] = dict(defaults.sampler["scheduler_kwargs"])
    return out


def job_sampler(params: dict) -> Optional[dict]:
    """The sampler (`guidekit.apps.defaults.using_sampler`) recorded in resolved `params`, or None."""
    if params.get("scheduler") is None and not params.get("scheduler_kwargs"):
        return None
    return {"scheduler": params.get("scheduler"), "scheduler_kwargs": dict(params.get("scheduler_kwargs") or {})}


def _unresolved(params: dict) -> bool:
    """Whether `params` still have a default to fill (they did not come through `resolve`)."""
    names = ["guidance_scale", "steps", *MODEL_DEPENDENT.get(params.get("guidance"), ())]
    if params.get("classifier") is not None:
        names.append("classifier_scale")
    return any(params.get(n) is None for n in names)


def apg_defaults(params: dict, embedded: bool) -> dict:
    """`params` with the APG parameters the job left unset (None) filled for the model: the embedded model's
    recommended setting (`guidekit.toy.RECOMMENDED_APG`) when `embedded`, else the paper's SDXL values.
    Values the job gave are kept. Other methods' parameters are returned unchanged."""
    names = MODEL_DEPENDENT.get(params.get("guidance"), ())
    if not names or all(params.get(n) is not None for n in names):
        return dict(params)
    settings = job_defaults(params, embedded=embedded).apg
    return {**params, **{n: settings[n] for n in names}}


def generate(pipe, params: dict, seeds: Iterable[int], generator_device: str = "cpu",
             classifiers: Optional[ClassifierCache] = None, record: Optional[dict] = None):
    """One pipeline call: an image per seed, each from its own `torch.Generator` (so an image never depends
    on batch size, order or process count). Returns float numpy images (N, H, W, 3) in [0, 1].

    Params with a classifier add its correction hook after the guidance method's, from `classifiers` (the
    run's cache; None: loaded for this call). `record`, if given, is filled with what the call ran with
    (`guidekit.apps.defaults.ran_settings`: method, scale, steps, the scheduler and every hook)."""
    import torch

    if is_style(params):
        raise JobError("content_image: a style-transfer job runs through style_transfer, not generate")
    if is_video(params):
        raise JobError("frames: a video job runs through generate_video, not generate")
    seeds = list(seeds)
    if params.get("guidance") is None or _unresolved(params):  # not through `resolve`
        params = apply_defaults(params, job_defaults(params, pipe))
    method = GUIDANCE[params["guidance"]]
    gens = [torch.Generator(device=generator_device).manual_seed(int(s)) for s in seeds]
    n = len(seeds)
    scale = guidance_call(pipe, params)
    negative = scale.pop("negative_prompt")
    kwargs = dict(
        prompt=[params["prompt"]] * n,
        negative_prompt=[negative] * n if negative is not None else None,
        num_inference_steps=params["steps"],
        width=params["width"],
        height=params["height"],
        **scale,
        generator=gens,
        output_type="np",
    )
    extra = method.call_kwargs(params)
    from .families import family_of_pipe, slot_hooks

    family = family_of_pipe(pipe)
    if family is not None and family.is_flow:
        check_family(params, family)  # not through `resolve`: a nonzero rescale is refused there
        extra.pop("guidance_rescale", None)  # 0: plain CFG, the flow pipelines' only CFG
    kwargs.update(extra)
    hooks = slot_hooks(family, params["guidance_scale"], method.build(params))
    if params.get("classifier") is not None:
        classifiers = classifiers if classifiers is not None else ClassifierCache()
        if not isinstance(params["label"], int):  # not through `resolve`
            params = resolve_classifier(params, classifiers)
        hooks.append(classifiers.hook(params))
    if hooks:
        kwargs["hooks"] = hooks
    with using_sampler(pipe, job_sampler(params)) as scheduler:  # the recommended sampler, for this call only
        if record is not None:
            record.update(ran_settings(params["guidance"], params["guidance_scale"], params["steps"], scheduler,
                                       hooks))
        out = pipe(**kwargs)
    return out.images, getattr(out, "nsfw_content_detected", None)


def guidance_call(pipe, params: dict) -> dict:
    """The guidance slot's pipeline arguments of a job on `pipe`: its scale under the family's name
    (guidance_scale; Flux and Qwen-Image: true_cfg_scale) and the negative prompt (None: the unconditional
    prompt; Flux and Qwen-Image: "" when the job has none, so that their unconditional pass runs)."""
    from .families import family_of_pipe, scale_kwargs

    return scale_kwargs(family_of_pipe(pipe), params["guidance_scale"], params.get("negative_prompt") or None)
