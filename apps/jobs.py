"""The job schema shared by `guidekit batch` and the demo: fields, bounds, parsing, and one guided call.

A job is one line of a JSONL file (or one row of a CSV file with a header)::

    {"prompt": "a red circle on a blue background", "seeds": "0-7", "guidance": "apg", "guidance_scale": 12}

A style-transfer job (StyleID, optionally with StyleSSP's start point) names two images instead of a prompt;
their paths are relative to the job file's folder::

    {"content_image": "content.png", "style_image": "style.png", "start_point": "stylessp", "style_prompt": "..."}

Field names are part of the public interface (scripts depend on them). Each guidance method adds its
own parameters, named as its hook's arguments; a later method adds one entry to `GUIDANCE`.
Nothing is clamped: a value out of bounds is an error that names the field, the value and the range.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

from guidekit.checks import MAX_IMAGE_SIDE, check_image_memory, check_image_size

from .defaults import (APG_KEYS, DEFAULT_METHOD, FREENOISE_DEFAULTS, Defaults, ran_settings, resolve_defaults,
                       using_sampler)

__all__ = [
    "Param",
    "Guidance",
    "GUIDANCE",
    "COMMON",
    "Job",
    "JobError",
    "parse_seeds",
    "parse_job",
    "read_jobs",
    "resolve",
    "apg_defaults",
    "job_defaults",
    "apply_defaults",
    "job_sampler",
    "CLASSIFIER",
    "ClassifierCache",
    "resolve_classifier",
    "STYLE",
    "START_POINTS",
    "is_style",
    "style_transfer",
    "generate",
    "job_key",
    "fields_doc",
    "VIDEO",
    "is_video",
    "resolve_video",
    "generate_video",
    "load_video_pipeline",
    "frame_change",
]


class JobError(ValueError):
    """A job that cannot run as written; the message names the field, the value and what is accepted."""


#----------------------------------------------------------------------------
# Field declarations: one source for validation, the demo's sliders and the docs.

@dataclass(frozen=True)
class Param:
    name: str
    kind: type  # int, float or str
    default: Any
    help: str
    min: Optional[float] = None
    max: Optional[float] = None
    choices: Optional[tuple] = None
    multiple_of: Optional[int] = None

    def bounds_text(self) -> str:
        if self.choices:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        what = {int: "an integer", float: "a number", str: "a string"}[self.kind]
        if self.min is not None and self.max is not None:
            what += f" in [{self.min}, {self.max}]"
        elif self.min is not None:
            what += f" >= {self.min}"
        elif self.max is not None:
            what += f" <= {self.max}"
        if self.multiple_of:
            what += f", a multiple of {self.multiple_of}"
        return what

    def check(self, value: Any, where: str = "") -> Any:
        """Return `value` converted to this field's type, or raise JobError. Strings from CSV are parsed."""
        label = f"{where}{self.name}"
        v = value
        if self.kind is str:
            if not isinstance(v, str):
                raise JobError(f"{label}: expected {self.bounds_text()}, got {value!r}")
        elif self.kind is int:
            if isinstance(v, str):
                try:
                    v = int(v.strip())
                except ValueError:
                    raise JobError(f"{label}: expected {self.bounds_text()}, got {value!r}") from None
            elif isinstance(v, float) and v.is_integer():
                v = int(v)
            if isinstance(v, bool) or not isinstance(v, int):
                raise JobError(f"{label}: expected {self.bounds_text()}, got {value!r}")
        elif self.kind is float:
            if isinstance(v, str):
                try:
                    v = float(v.strip())
                except ValueError:
                    raise JobError(f"{label}: expected {self.bounds_text()}, got {value!r}") from None
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise JobError(f"{label}: expected {self.bounds_text()}, got {value!r}")
            v = float(v)
        if self.choices and v not in self.choices:
            raise JobError(f"{label}: expected {self.bounds_text()}, got {value!r}")
        if self.min is not None and v < self.min or self.max is not None and v > self.max:
            raise JobError(f"{label}: expected {self.bounds_text()}, got {value!r}")
        if self.multiple_of and v % self.multiple_of:
            raise JobError(f"{label}: expected {self.bounds_text()}, got {value!r}")
        return v


MAX_SEED = 2**63 - 1

COMMON: dict[str, Param] = {p.name: p for p in [
    Param("prompt", str, None, "What to draw (required)."),
    Param("negative_prompt", str, "", "What to steer away from; empty means the unconditional prompt."),
    Param("name", str, None, "Optional file-name prefix for this job's images (letters, digits, . _ -)."),
    Param("steps", int, None, "Number of denoising steps. Default: the embedded model's (guidekit.toy.settings_for), "
          "else 25; a job with the embedded classifier on the embedded model: the steps of its EluCD sampler "
          "(guidekit.toy.RECOMMENDED_ELUCD_SAMPLER).", min=1, max=1000),
    Param("width", int, None, "Image width in pixels; default: the model's native size.",
          min=8, max=MAX_IMAGE_SIDE, multiple_of=8),
    Param("height", int, None, "Image height in pixels; default: the model's native size.",
          min=8, max=MAX_IMAGE_SIDE, multiple_of=8),
    Param("guidance", str, None, f"Guidance method. Default: {DEFAULT_METHOD['image']} ({DEFAULT_METHOD['video']} in a "
          "video job).", choices=("cfg", "apg")),
    Param("guidance_scale", float, None,
          "Guidance scale w; 1 turns guidance off. CFG oversaturates at high w, APG is built to stay clean there. "
          "Default: the embedded model's (guidekit.toy.settings_for); 1 for an empty prompt without a negative "
          "prompt; the model family's (SD3 7, Flux and Qwen-Image 4); else 7.5.",
          min=0.0, max=100.0),
]}


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

#: Optional classifier guidance on top of the guidance method (EluCD or plain classifier guidance). A job
#: without `classifier` has none of these in its params, so its key is the one it had before they existed.
CLASSIFIER: dict[str, Param] = {p.name: p for p in [
    Param("classifier", str, None,
          "Local folder of a transformers image classifier (with its preprocessor_config.json) that steers each "
          "image toward `label`; a hub id works only with network access or the model in the local Hugging Face "
          "cache. Give it together with `label`. Default: no classifier guidance."),
    Param("label", str, None,
          "The class to steer toward: an id (an integer, or a string of digits) or a name from the classifier's "
          "id2label (case-insensitive). Required with `classifier`; recorded as the class id."),
    Param("classifier_scale", float, None,
          "Classifier scale s; 0 turns the correction off. Default: the scale of guidekit.toy.RECOMMENDED_ELUCD "
          "for the embedded classifier on the embedded model, else 1, the official classifier_scale of the EluCD "
          "DDPM script.", min=0.0, max=1000.0),
    Param("calibration", str, "elucd",
          "elucd: calibrated log-probability, the sine boost and (paper default) Softplus-smoothed ReLUs "
          "(guidekit.EluCD); "
          "plain: uncalibrated classifier guidance (guidekit.ClassifierGuidance). The embedded classifier on the "
          "embedded model gets guidekit.toy.RECOMMENDED_ELUCD (plain: its schedule, input and step window) and "
          "its sampler, guidekit.toy.RECOMMENDED_ELUCD_SAMPLER (ancestral DDPM); both are recorded in the job's "
          "params (classifier_settings, scheduler). Any other pair: the paper's defaults and the model's own "
          "scheduler.", choices=("elucd", "plain")),
]}

#: Style-transfer jobs: StyleID (`StyleIDStableDiffusionPipeline.transfer`) of `content_image` in the style of
#: `style_image`, from the plain StyleID start point or with `guidekit.StyleSSP`'s. Defaults: `guidekit style`'s.
START_POINTS = ("styleid", "stylessp")
#: StyleSSP's negative-guided inversion scale w_inv, named as the hook's argument.
STYLESSP_SCALE = "inversion_guidance_scale"
STYLE: dict[str, Param] = {p.name: p for p in [
    Param("content_image", str, None,
          "Style transfer: the content image (a path relative to the job file's folder, or absolute). Its layout is "
          "kept; the output has its size, a multiple of the model's VAE factor. Give it together with `style_image`; "
          "such a job has no prompt or guidance fields."),
    Param("style_image", str, None,
          "Style transfer: the style image (relative to the job file's folder, or absolute); its size is a multiple "
          "of the model's VAE factor too."),
    Param("content_prompt", str, None,
          "Style transfer: a caption of the content image, the positive side c+ of StyleSSP's negative-guided "
          "inversion (\"\" when left out). Plain StyleID does not use it."),
    Param("style_prompt", str, None,
          "Style transfer: what the style image shows, the negative side c- of StyleSSP's negative-guided inversion; "
          "without it StyleSSP uses its frequency start point only. Plain StyleID does not use it."),
    Param("start_point", str, "stylessp",
          "Style transfer: the sampling start point; styleid: StyleID's AdaIN start point; stylessp: StyleID + "
          "guidekit.StyleSSP() (frequency manipulation, plus the negative-guided inversion with `style_prompt`).",
          choices=START_POINTS),
    Param("gamma", float, 0.75,
          "Style transfer: StyleID query preservation; larger keeps more content (the paper's 0.75; its high style "
          "fidelity setting: 0.3).", min=0.0, max=1.0),
    Param("temperature", float, 1.5,
          "Style transfer: StyleID attention temperature T > 0; > 1 sharpens the injected attention (the paper's "
          "1.5).", min=0.0, max=100.0),
    Param("alpha", float, 0.7,
          "Style transfer, stylessp: factor on the lowest and highest frequencies of the start point; 1 turns the "
          "frequency step off (StyleSSP's official 0.7).", min=0.0, max=1.0),
    Param(STYLESSP_SCALE, float, None,
          "Style transfer, stylessp: w_inv of the negative-guided inversion eps(c-) + w_inv (eps(c+) - eps(c-)) "
          "(StyleSSP's official 1.5); 1 turns it off. Default: 1.5 with `style_prompt`, else 1.", min=1.0, max=11.0),
]}
#: Fields of every job that a style-transfer job uses too (`steps` defaults to 50 there, StyleID's official).
STYLE_SHARED = ("name", "steps")
STYLE_STEPS = 50
#: The StyleSSP-only fields.
STYLESSP_ONLY = ("alpha", STYLESSP_SCALE)

SEED_FIELDS = ("seed", "seeds")
#: Fields whose default the model decides (`resolve`, through `guidekit.apps.defaults.resolve_defaults`).
MODEL_DEFAULTS = ("guidance", "guidance_scale", "steps")

#: Jobs named by a "kind" field: kind -> the module that parses (`parse_job`), resolves (`resolve`) and runs
#: (`run`) them, and its `is_kind(params)`.
KINDS = {"reconstruct": "guidekit.apps.uam_jobs", "edit": "guidekit.apps.uam_jobs"}


def kind_module(kind: Any, where: str = ""):
    """The module of a job's `kind` (`KINDS`); JobError naming the value and the accepted kinds."""
    import importlib

    if not isinstance(kind, str) or kind not in KINDS:
        raise JobError(f"{where}kind: {kind!r} is not accepted; accepted: {', '.join(map(repr, KINDS))}, or no kind "
                       "(a text-to-image, style-transfer or video job)")
    return importlib.import_module(KINDS[kind])


#: Video jobs (AnimateDiff, with FreeNoise for videos longer than the motion model's training length): a job with
#: `frames` writes one animated file per seed. `prompts` and `freenoise` are objects, checked by
#: `_parse_prompts` and `_parse_freenoise`; their `Param` entries here are for the docs.
MAX_FRAMES = 1024
#: `freenoise: true`: `guidekit video`'s settings (`guidekit.apps.defaults.FREENOISE_DEFAULTS`). A job's `freenoise`
#: object may hold any other guidekit.FreeNoise argument too; only the ones it gives are added to these (and to the
#: parameters that name its files).
VIDEO_FILE_FORMATS = ("gif", "webp", "mp4")  # mp4: with PyAV installed (pip install "guidekit[mp4]")
VIDEO: dict[str, Param] = {p.name: p for p in [
    Param("frames", int, None,
          "Video: the number of frames. A job with `frames` is a video job: one animated file per seed, made by the "
          "video model (`--video-model`).", min=1, max=MAX_FRAMES),
    Param("prompts", str, None,
          "Video: prompt travel, an object {frame: prompt} such as {\"0\": \"a red circle\", \"24\": \"a blue "
          "circle\"} (frames below `frames`; in CSV, the object as JSON text). Frames between two keys blend their "
          "prompts linearly. With `prompt` too, `prompt` is frame 0's prompt (then `prompts` must not have frame 0)."),
    Param("freenoise", str, None,
          "Video: true (the default) for guidekit.FreeNoise with `guidekit video`'s settings (context_length 16, "
          "context_stride 4, fusion \"attention\"), false for the plain pipeline (at most the motion model's "
          "motion_max_seq_length frames), or an object of guidekit.FreeNoise keyword arguments that replace those, "
          "such as " + ", ".join(FREENOISE_DEFAULTS) + " (motion_injection: true, or [t_a, t_b]; it needs "
          "`prompts`; injection_blocks: the UNet parts it acts in, e.g. [\"down\", \"mid\"])."),
    Param("fps", float, 8.0, "Video: frames per second of the file.", min=0.0, max=100.0),
    Param("format", str, "gif", "Video: the file format, and the file's suffix; mp4 (H.264, even sizes only) needs "
          "PyAV: pip install \"guidekit[mp4]\".", choices=VIDEO_FILE_FORMATS),
]}
#: Fields of a text-to-image job that a video job does not take (the classifier reads single images;
#: AnimateDiff has no CFG rescale).
VIDEO_REFUSED = ("guidance_rescale",) + tuple(CLASSIFIER)


def all_fields() -> list[str]:
    names = list(COMMON) + list(SEED_FIELDS)
    for g in GUIDANCE.values():
        names += [n for n in g.params if n not in names]
    return names + list(CLASSIFIER) + list(STYLE) + list(VIDEO)


def fields_doc() -> str:
    """A Markdown table of every job field (used for the docs)."""
    rows = ["| field | type / accepted | default | meaning |", "|---|---|---|---|"]
    for p in COMMON.values():
        default = "per model" if p.default is None and p.name in MODEL_DEFAULTS else repr(p.default)
        rows.append(f"| `{p.name}` | {p.bounds_text()} | {default} | {p.help} |")
    rows.append('| `seed` / `seeds` | an int, or a range "0-7", a list "1,5,9" or a JSON list | 0 | One image per seed. |')
    for g in GUIDANCE.values():
        for p in g.params.values():
            default = "per model" if p.default is None else repr(p.default)
            rows.append(f"| `{p.name}` ({g.name}) | {p.bounds_text()} | {default} | {p.help} |")
    for p in CLASSIFIER.values():
        accepted = "an integer or a string" if p.name == "label" else p.bounds_text()
        default = "per model" if p.name == "classifier_scale" else repr(p.default)
        rows.append(f"| `{p.name}` | {accepted} | {default} | {p.help} |")
    for p in STYLE.values():
        accepted = "an existing image file" if p.name.endswith("_image") else p.bounds_text()
        if p.name == "temperature":
            accepted = "a number in (0.0, 100.0]"
        default = "per `style_prompt`" if p.name == STYLESSP_SCALE else repr(p.default)
        rows.append(f"| `{p.name}` | {accepted} | {default} | {p.help} |")
    for p in VIDEO.values():
        accepted = {"prompts": "an object {frame: prompt}", "freenoise": "true, false or an object"}.get(
            p.name, p.bounds_text())
        if p.name == "fps":
            accepted = "a number in (0.0, 100.0]"
        default = "true" if p.name == "freenoise" else repr(p.default)
        rows.append(f"| `{p.name}` | {accepted} | {default} | {p.help} |")
    return "\n".join(rows)


#----------------------------------------------------------------------------
# Seeds.

_SEED_ITEM = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+)\s*)?$")


def parse_seeds(value: Any, where: str = "") -> list[int]:
    """Seeds from an int, "0-7" (inclusive), "1,3,8-9", or a list of ints. Duplicates are an error."""
    label = f"{where}seeds"
    accepted = 'an int, a range like "0-7", a list like "1,3,8-9", or a JSON list of ints, each in [0, 2**63-1]'
    out: list[int] = []
    if isinstance(value, bool):
        raise JobError(f"{label}: expected {accepted}, got {value!r}")
    if isinstance(value, int):
        out = [value]
    elif isinstance(value, list):
        if not value or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise JobError(f"{label}: expected {accepted}, got {value!r}")
        out = list(value)
    elif isinstance(value, str):
        parts = value.split(",")
        for part in parts:
            m = _SEED_ITEM.match(part)
            if not m:
                raise JobError(f"{label}: expected {accepted}, got {value!r}")
            lo = int(m.group(1))
            hi = int(m.group(2)) if m.group(2) is not None else lo
            if hi < lo:
                raise JobError(f"{label}: range {part.strip()!r} ends before it starts; expected {accepted}")
            if hi - lo >= 1_000_000:
                raise JobError(f"{label}: range {part.strip()!r} has more than 1,000,000 seeds")
            out.extend(range(lo, hi + 1))
    else:
        raise JobError(f"{label}: expected {accepted}, got {value!r}")
    for s in out:
        if not 0 <= s <= MAX_SEED:
            raise JobError(f"{label}: seed {s} out of range; expected {accepted}")
    if len(set(out)) != len(out):
        dup = sorted({s for s in out if out.count(s) > 1})
        raise JobError(f"{label}: seed(s) {dup} listed twice in {value!r}; each seed gives one image")
    return out


#----------------------------------------------------------------------------
# Jobs.

_NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


@dataclass
class Job:
    """One validated job: `params` holds every field with defaults filled, except the model-dependent ones
    that `resolve` fills (None here when the job leaves them out): width, height and APG's eta /
    norm_threshold / momentum."""

    line: int
    raw: dict
    params: dict
    seeds: list[int] = field(default_factory=list)
    #: A style-transfer job's images: {"content_image": absolute path, "style_image": absolute path}.
    files: dict = field(default_factory=dict)


def parse_job(raw: Any, line: int = 0, base: Optional[Path] = None) -> Job:
    """Validate one job (a dict from JSON or CSV). Raises JobError naming the line and the field.

    `base`: the folder that relative image paths of a style-transfer job are relative to (the job file's
    folder; None: the current folder)."""
    where = f"line {line}: " if line else ""
    if not isinstance(raw, dict):
        raise JobError(f"{where}expected a JSON object like {{\"prompt\": \"...\"}}, got {type(raw).__name__}")
    if raw.get("kind") is not None:  # a job of another kind parses its own fields (KINDS)
        return kind_module(raw["kind"], where).parse_job(raw, line, base)
    known = set(all_fields())
    unknown = [k for k in raw if k not in known]
    if unknown:
        raise JobError(f"{where}unknown field(s) {', '.join(map(repr, unknown))}; accepted: {', '.join(all_fields())}")
    files: dict = {}
    if any(raw.get(k) is not None for k in STYLE):
        if "seed" in raw and "seeds" in raw:
            raise JobError(f"{where}seed and seeds: give one of them, not both")
        params, files = _parse_style(raw, where, base)
    elif any(raw.get(k) is not None for k in VIDEO):
        params = _parse_video(raw, where)
    else:
        params = _parse_generation(raw, where)
    seeds = _parse_job_seeds(raw, where)
    return Job(line=line, raw=dict(raw), params=params, seeds=seeds, files=files)


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


def is_video(params: dict) -> bool:
    """Whether `params` (of `parse_job`) are a video job's."""
    return params.get("frames") is not None


def _parse_video(raw: dict, where: str) -> dict:
    """A video job's parameters: the common and guidance fields, `frames`, `prompts`, `freenoise`, `fps`, `format`."""
    if raw.get("frames") is None:
        names = ", ".join(k for k in VIDEO if raw.get(k) is not None)
        raise JobError(f"{where}frames: required with {names} (a video job); accepted: an integer in [1, "
                       f"{MAX_FRAMES}], or remove {names}")
    refused = [k for k in VIDEO_REFUSED if raw.get(k) is not None]
    if refused:
        raise JobError(f"{where}{', '.join(refused)}: not accepted in a video job (one with frames); remove "
                       f"{'it' if len(refused) == 1 else 'them'}")
    if raw.get("prompt") in (None, "") and raw.get("prompts") is None:
        raise JobError(f"{where}prompt: required, a non-empty string (or prompts, an object {{frame: prompt}})")
    params = _parse_method({k: v for k, v in raw.items() if k != "prompt" or v != ""}, where, "video")
    params.pop("guidance_rescale", None)
    for p in VIDEO.values():
        if p.name not in ("prompts", "freenoise"):
            params[p.name] = p.default if raw.get(p.name) is None else p.check(raw[p.name], where)
    if params["fps"] <= 0:
        raise JobError(f"{where}fps: expected a number in (0.0, 100.0], got {raw['fps']!r}")
    if params["format"] == "mp4":
        from guidekit.video.export import INSTALL_MP4, mp4_available

        if not mp4_available():
            raise JobError(f"{where}format: 'mp4' needs PyAV with an H.264 encoder, which is not installed; install it "
                           f"with {INSTALL_MP4}; accepted without it: 'gif', 'webp'")
    params["prompts"] = _parse_prompts(raw.get("prompts"), params, where)
    params["freenoise"] = _parse_freenoise(raw.get("freenoise", True), params, where)
    return params


def _json_cell(value: Any) -> Any:
    """A CSV cell holding JSON (an object, true, false) as its value; other values unchanged."""
    if isinstance(value, str) and value.strip()[:1] in ("{", "[") or value in ("true", "false"):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def _parse_prompts(value: Any, params: dict, where: str) -> Optional[dict]:
    """`prompts` as {frame: prompt} with int frames in order (`prompt`, if given, as frame 0), or None."""
    if value is None:
        return None
    accepted = (f"an object {{frame: prompt}} with frames from 0 to {params['frames'] - 1} (integers, or strings of "
                "digits as JSON keys) and non-empty prompts, e.g. {\"0\": \"a red circle\", \"8\": \"a blue circle\"}")
    value = _json_cell(value)
    if not isinstance(value, dict) or not value:
        raise JobError(f"{where}prompts: expected {accepted}, got {value!r}")
    schedule = {}
    for key, text in value.items():
        frame = int(key) if isinstance(key, str) and key.strip().isdigit() else key
        if isinstance(frame, bool) or not isinstance(frame, int) or not 0 <= frame < params["frames"]:
            raise JobError(f"{where}prompts: frame {key!r} is not accepted; expected {accepted}")
        if not isinstance(text, str) or not text.strip():
            raise JobError(f"{where}prompts: the prompt of frame {key!r} is {text!r}; expected {accepted}")
        if frame in schedule:
            raise JobError(f"{where}prompts: frame {frame} is given twice; accepted: one prompt per frame")
        schedule[frame] = text.strip()
    if params["prompt"] is not None:
        if 0 in schedule:
            raise JobError(f"{where}prompt and prompts: both give frame 0's prompt; accepted: one of them (prompt is "
                           "frame 0's prompt when prompts has no frame 0)")
        schedule[0] = params["prompt"]
    return dict(sorted(schedule.items()))


def _freenoise_arguments() -> list[str]:
    """The keyword arguments of guidekit.FreeNoise, in its order."""
    import inspect

    import guidekit

    return [name for name in inspect.signature(guidekit.FreeNoise.__init__).parameters if name != "self"]


def _parse_freenoise(value: Any, params: dict, where: str) -> Optional[dict]:
    """`freenoise` as keyword arguments of guidekit.FreeNoise (`FREENOISE_DEFAULTS` updated with the job's own), or
    None (off)."""
    names = _freenoise_arguments()
    accepted = f"true, false, or an object of guidekit.FreeNoise keyword arguments ({', '.join(names)})"
    value = _json_cell(value)
    if value is False:
        return None
    if value is True:
        value = {}
    if not isinstance(value, dict):
        raise JobError(f"{where}freenoise: expected {accepted}, got {value!r}")
    unknown = [k for k in value if k not in names]
    if unknown:
        raise JobError(f"{where}freenoise: unknown key(s) {', '.join(map(repr, unknown))}; accepted: "
                       + ", ".join(names))
    kwargs = {**FREENOISE_DEFAULTS, **value}
    if isinstance(kwargs["motion_injection"], list):
        kwargs["motion_injection"] = tuple(kwargs["motion_injection"])
    if kwargs["motion_injection"] is not None and kwargs["motion_injection"] is not False and not params["prompts"]:
        raise JobError(f"{where}freenoise: motion_injection needs prompt travel; accepted: it with \"prompts\", or "
                       "without motion_injection")
    scale = params.get("guidance_scale")
    if kwargs["motion_injection"] not in (None, False) and isinstance(scale, (int, float)) and scale <= 1:
        # as in the official code it acts in the conditional pass of classifier-free guidance only
        raise JobError(f"{where}freenoise: motion_injection needs guidance_scale > 1, got {scale!r}; accepted: a larger "
                       "guidance_scale, or without motion_injection")
    import guidekit

    try:
        hook = guidekit.FreeNoise(**kwargs)
    except (ValueError, TypeError) as e:
        raise JobError(f"{where}freenoise: {e}") from None
    kwargs["motion_injection"] = None if hook.motion_injection is None else list(hook.motion_injection)
    if "injection_blocks" in kwargs:
        kwargs["injection_blocks"] = list(hook.injection_blocks)
    return kwargs


def _parse_job_seeds(raw: dict, where: str) -> list[int]:
    seed_value = raw.get("seeds", raw.get("seed", 0))
    if isinstance(seed_value, str) and "seed" in raw:
        seed_value = seed_value.strip()
        if not seed_value.isdigit():
            raise JobError(f"{where}seed: expected an integer in [0, 2**63-1], got {raw['seed']!r} "
                           "(use \"seeds\" for a range)")
        seed_value = int(seed_value)
    elif "seed" in raw and not isinstance(seed_value, int):
        raise JobError(f"{where}seed: expected an integer in [0, 2**63-1], got {raw['seed']!r}")
    return parse_seeds(seed_value, where)


def is_style(params: dict) -> bool:
    """Whether `params` (of `parse_job`) are a style-transfer job's."""
    return params.get("content_image") is not None


_STYLE_ACCEPTED = ", ".join(list(STYLE) + list(STYLE_SHARED) + ["seed", "seeds"])


def _parse_style(raw: dict, where: str, base: Optional[Path]) -> tuple[dict, dict]:
    """A style-transfer job's parameters and its image files (absolute paths)."""
    given = [k for k in raw if raw.get(k) is not None]
    images = [k for k in ("content_image", "style_image") if k in given]
    if not images:
        names = [k for k in given if k in STYLE]
        raise JobError(f"{where}{', '.join(names)}: only appl{'ies' if len(names) == 1 else 'y'} to style-transfer "
                       "jobs; accepted: together with "
                       "\"content_image\" and \"style_image\" (image files), or remove them")
    if len(images) == 1:
        missing = "style_image" if images == ["content_image"] else "content_image"
        raise JobError(f"{where}{missing}: required with {images[0]}; accepted: an image file, its path relative to "
                       "the job file's folder or absolute")
    other = [k for k in given if k not in STYLE and k not in STYLE_SHARED and k not in SEED_FIELDS]
    if other:
        raise JobError(f"{where}{', '.join(other)}: not accepted in a style-transfer job (one with content_image and "
                       f"style_image: the output has the content image's size, no prompt or guidance); accepted "
                       f"there: {_STYLE_ACCEPTED}")
    params: dict[str, Any] = {}
    for name in STYLE_SHARED:
        p = COMMON[name]
        v = raw.get(name)
        params[name] = (STYLE_STEPS if name == "steps" else p.default) if v is None else p.check(v, where)
    if params["name"] is not None and not _NAME.match(params["name"]):
        raise JobError(f"{where}name: expected 1-64 letters, digits, '.', '_' or '-', got {params['name']!r}")
    for p in STYLE.values():
        v = raw.get(p.name)
        params[p.name] = p.default if v is None else p.check(v, where)
    if params["temperature"] <= 0:
        raise JobError(f"{where}temperature: expected a number in (0.0, 100.0], got {raw['temperature']!r}")
    for name in ("content_prompt", "style_prompt"):
        if params[name] is not None:
            params[name] = params[name].strip() or None
    if params["start_point"] == "styleid":
        for name in STYLESSP_ONLY:
            if raw.get(name) is not None:
                raise JobError(f"{where}{name}: only applies to start_point 'stylessp', but this job has start_point "
                               "'styleid'; remove it or set \"start_point\": \"stylessp\"")
            del params[name]
    else:
        scale = params[STYLESSP_SCALE]
        if scale is None:
            params[STYLESSP_SCALE] = 1.5 if params["style_prompt"] else 1.0
        elif scale > 1 and not params["style_prompt"]:
            raise JobError(f"{where}{STYLESSP_SCALE}: {scale:g} needs style_prompt (what the style image shows, the "
                           "negative side of the inversion guidance); accepted: a style_prompt, or 1 (no "
                           "negative-guided inversion)")
    files = {}
    for name in ("content_image", "style_image"):
        path, digest, (w, h) = _image_file(params[name], name, where, base)
        try:
            check_image_size(w, h, multiple_of=8, names=(f"{name} width", f"{name} height"))
        except ValueError as e:
            raise JobError(f"{where}{name}: {params[name]!r} is {w}x{h}; {e}") from None
        files[name] = str(path)
        params[f"{name}_sha256"] = digest
        if name == "content_image":
            params["width"], params["height"] = w, h  # the output has the content's size
    return params, files


_IMAGE_INFO: dict[tuple, tuple[str, tuple[int, int]]] = {}  # (path, mtime, size) -> (sha256, (w, h))


def _image_file(value: str, name: str, where: str, base: Optional[Path]) -> tuple[Path, str, tuple[int, int]]:
    """(absolute path, SHA-256 of the bytes, (width, height)) of a job's image file; JobError when it is missing
    or not an image. Relative paths are relative to `base` (the job file's folder)."""
    accepted = "an image file (PNG, JPEG, ...), its path relative to the job file's folder or absolute"
    written = Path(value).expanduser()
    path = (written if written.is_absolute() else (Path(base) if base is not None else Path.cwd()) / written).absolute()
    if not value.strip() or not path.is_file():
        what = "is not a file" if path.exists() else "not found"
        at = "" if written.is_absolute() else f" (looked for {path})"
        raise JobError(f"{where}{name}: {value!r} {what}{at}; accepted: {accepted}")
    stat = path.stat()
    key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    if key not in _IMAGE_INFO:
        import PIL.Image

        data = path.read_bytes()
        try:
            with PIL.Image.open(io.BytesIO(data)) as im:
                im.load()
                size = im.size
        except (PIL.UnidentifiedImageError, OSError, ValueError) as e:
            raise JobError(f"{where}{name}: {value!r} cannot be read as an image ({e}); accepted: {accepted}") from None
        if len(_IMAGE_INFO) > 4096:
            _IMAGE_INFO.clear()
        _IMAGE_INFO[key] = (hashlib.sha256(data).hexdigest(), size)
    digest, size = _IMAGE_INFO[key]
    return path, digest, size


def _parse_classifier(raw: dict, where: str) -> dict:
    """The classifier fields of a job: {} without `classifier`, else all four (defaults filled, except
    `classifier_scale`: None until `resolve` knows the model and the classifier)."""
    given = {k: raw.get(k) for k in CLASSIFIER if raw.get(k) is not None}
    if not given:
        return {}
    if "classifier" not in given:
        names = ", ".join(given)
        raise JobError(f"{where}{names}: given without classifier; accepted: \"classifier\": a local folder of a "
                       "transformers image classifier, together with \"label\" (or remove them)")
    if "label" not in given:
        raise JobError(f"{where}label: required with classifier; accepted: a class id or name of the classifier")
    out = {}
    for p in CLASSIFIER.values():
        v = given.get(p.name)
        if p.name == "label":
            if isinstance(v, float) and v.is_integer():  # 1.0 from a spreadsheet
                v = int(v)
            if isinstance(v, bool) or not isinstance(v, (int, str)) or isinstance(v, str) and not v.strip():
                raise JobError(f"{where}label: expected a class id (an integer) or a class name, got {v!r}")
            out["label"] = v
        elif p.name == "classifier_scale":
            out[p.name] = None if v is None else p.check(v, where)
        else:
            out[p.name] = p.default if v is None else p.check(v, where)
    if not out["classifier"].strip():
        raise JobError(f"{where}classifier: expected a local folder or hub id of an image classifier, got ''")
    return out


def _csv_rows(text: str):
    reader = csv.DictReader(io.StringIO(text))
    if reader.fieldnames is None:
        return
    for i, row in enumerate(reader, start=2):  # line 1 is the header
        yield i, {k.strip(): v for k, v in row.items() if k is not None and v not in (None, "")}, None


def _jsonl_rows(text: str):
    for i, line in enumerate(text.splitlines(), start=1):
        s = line.strip()
        if not s or s.startswith("#") or s.startswith("//"):
            continue
        try:
            yield i, json.loads(s), None
        except json.JSONDecodeError as e:
            yield i, None, f"line {i}: not valid JSON ({e.msg} at column {e.colno})"


def job_methods(params: dict) -> list[tuple[str, str]]:
    """The methods a job runs on the image model, as (key of `guidekit.apps.families.METHOD_NAMES`, the field
    that asks for it). A video job runs on the video model: none here."""
    if is_video(params):
        return []
    if is_style(params):
        return [("styleid", "content_image")]
    methods = [(params["guidance"], "guidance")]
    if params.get("classifier") is not None:
        methods.append(("elucd", "classifier"))
    return methods


def check_family(params: dict, family, where: str = "") -> None:
    """Raise JobError when the image model's `family` (`guidekit.apps.families.Family`; None: any) cannot run
    the job: the message names the job (`where`), the method and the family."""
    from .families import refusal

    if family is None or not family.is_flow:
        return
    for method, name in job_methods(params):
        if not family.runs(method):
            raise JobError(f"{where}{name}: {refusal(family, method)}; remove it, or use another --model")
    if params.get("guidance_rescale"):
        raise JobError(f"{where}guidance_rescale: CFG rescale is not taken by {family.label} models "
                       f"({family.stock}); accepted there: 0 (or leave it out)")
    if not is_video(params) and not is_style(params) and params.get("guidance_scale") is not None:
        from .families import check_scale

        try:
            check_scale(family, params["guidance_scale"])
        except ValueError as e:
            raise JobError(f"{where}guidance_scale: {e}") from None


def _job_where(line: int, raw: Any) -> str:
    name = raw.get("name") if isinstance(raw, dict) else None
    return f"line {line}" + (f" (job {name!r})" if isinstance(name, str) and name else "") + ": "


def read_jobs(path: str | Path, family=None) -> tuple[list[Job], list[tuple[int, str]]]:
    """Parse a JSONL (default) or CSV (`.csv`) job file. Returns (jobs, [(line, error message), ...]).

    Image paths of style-transfer jobs are relative to the job file's folder. `family`: the image model's
    family (`guidekit.apps.families.Family`, read from its model_index.json); a job whose method it cannot run
    is an error line (`check_family`). None: every job is kept."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise JobError(f"JOBS: file {str(path)!r} does not exist") from None
    except UnicodeDecodeError as e:
        raise JobError(f"JOBS: {str(path)!r} is not UTF-8 text ({e})") from None
    rows = _csv_rows(text) if path.suffix.lower() == ".csv" else _jsonl_rows(text)
    jobs, errors = [], []
    for line, raw, err in rows:
        if err is not None:
            errors.append((line, err))
            continue
        try:
            job = parse_job(raw, line, base=path.parent)
            check_family(job.params, family, _job_where(line, raw))
            jobs.append(job)
        except JobError as e:
            errors.append((line, str(e)))
    return jobs, errors


#----------------------------------------------------------------------------
# Running one call.

def vae_factor(pipe) -> int:
    """The VAE's spatial factor (Wan's pipelines call it `vae_scale_factor_spatial`)."""
    return int(getattr(pipe, "vae_scale_factor", None) or getattr(pipe, "vae_scale_factor_spatial", 8))


def size_multiple(pipe) -> int:
    """The number every width and height must be a multiple of for `pipe`; the one rule of every entry point
    (generate, video, style, batch jobs, the demo).

    The latents are the image shrunk by the VAE factor and, for a transformer denoiser, cut into patches of
    `patch_size` latent pixels, so sizes are multiples of their product. diffusers' Stable Diffusion, SDXL and
    AnimateDiff pipelines also refuse any size that is not a multiple of 8 (their `check_inputs`), whatever the
    VAE: the embedded model's VAE factor is 4, yet 100 px fails there.
    """
    factor = vae_factor(pipe)
    patch = getattr(getattr(getattr(pipe, "transformer", None), "config", None), "patch_size", None)
    if isinstance(patch, (tuple, list)) and patch:
        patch = patch[-1]  # Wan's (frames, height, width) patch: its spatial side
    if hasattr(pipe, "_pack_latents"):
        # Flux and Qwen-Image pack 2x2 latent pixels into one token, whatever the transformer's patch_size says
        # (Flux's is 1); their pipelines ask for multiples of twice the VAE factor
        factor *= 2
    elif isinstance(patch, int) and patch > 1:
        factor *= patch
    return math.lcm(8, factor)


def default_size(pipe) -> int:
    """The model's native image side in pixels: the UNet's sample size, or a transformer pipeline's
    `default_sample_size` (SD3, Flux, Qwen-Image), times the VAE factor."""
    unet = getattr(pipe, "unet", None)
    if unet is not None:
        return int(unet.config.sample_size) * vae_factor(pipe)
    return int(pipe.default_sample_size) * vae_factor(pipe)


def is_embedded_pipe(pipe) -> bool:
    """Whether `pipe` was loaded from a folder holding an embedded model's weights (`guidekit.toy.settings_for`
    recognises it)."""
    from guidekit.toy.settings import embedded_name

    from .defaults import model_path_of

    return embedded_name(model_path_of(pipe)) is not None


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


class ClassifierCache:
    """Image classifiers by the path (or hub id) a job names: each is loaded once, and a failure once too.

    Also keeps one guidance hook per (classifier, label, scale, calibration): a hook serves any number of
    calls, and builds its smoothed copy of the classifier only once.
    """

    def __init__(self):
        self._classifiers: dict[str, Any] = {}  # path -> classifier, or the JobError message of a failed load
        self._hooks: dict[tuple, Any] = {}

    def get(self, path: str):
        """The classifier of `path` (a `guidekit.guidance.TransformersClassifier`); raises JobError if it cannot
        be loaded (the message names the path; the same message for every later job that names it)."""
        if path not in self._classifiers:
            try:
                self._classifiers[path] = self._load(path)
            except JobError as e:
                self._classifiers[path] = str(e)
        found = self._classifiers[path]
        if isinstance(found, str):
            raise JobError(found)
        return found

    @staticmethod
    def _load(path: str):
        from guidekit.guidance import TransformersClassifier

        local = Path(path).expanduser()
        if local.exists() and not local.is_dir():
            raise JobError(f"classifier: {path} is a file; accepted: a folder of a transformers image classifier "
                           "(config.json, weights, preprocessor_config.json)")
        if not local.exists() and not _HUB_ID.match(path):
            raise JobError(f"classifier: {path} is not a folder (nor a hub id like org/name); accepted: a local "
                           "folder of a transformers image classifier (config.json, weights, preprocessor_config.json)")
        hint = "" if local.exists() else \
            " (a hub id needs network access, or the model in the local Hugging Face cache; or pass a local folder)"
        try:
            return TransformersClassifier.from_pretrained(str(local) if local.exists() else path)
        except Exception as e:  # noqa: BLE001 - transformers' OSError/ValueError, a missing normalisation...
            raise JobError(f"classifier: cannot load {path!r}{hint}: {type(e).__name__}: {e}") from None

    def hook(self, params: dict):
        """The correction hook of resolved `params` (`label` a class id): `guidekit.EluCD` or
        `guidekit.ClassifierGuidance`."""
        import guidekit

        settings = params.get("classifier_settings") or {}
        key = (params["classifier"], params["label"], params["classifier_scale"], params["calibration"],
               json.dumps(settings, sort_keys=True))
        if key not in self._hooks:
            cls = guidekit.EluCD if params["calibration"] == "elucd" else guidekit.ClassifierGuidance
            self._hooks[key] = cls(self.get(params["classifier"]), params["label"], scale=params["classifier_scale"],
                                   **settings)
        return self._hooks[key]


_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def resolve_classifier(params: dict, classifiers: Optional[ClassifierCache] = None, where: str = "") -> dict:
    """`params` with its `label` as the class id of its classifier (loaded through `classifiers`). Params
    without a classifier are returned unchanged. Raises JobError naming the line and the field."""
    if params.get("classifier") is None:
        return dict(params)
    from .generate import parse_label

    classifiers = classifiers if classifiers is not None else ClassifierCache()
    try:
        classifier = classifiers.get(params["classifier"])
    except JobError as e:
        raise JobError(f"{where}{e}") from None
    from guidekit.guidance.classifiers import resolve_labels

    label = params["label"]
    try:
        index = resolve_labels(parse_label(label) if isinstance(label, str) else label, classifier.id2label, "label")
    except ValueError as e:
        raise JobError(f"{where}{e}") from None
    return {**params, "label": index}


def resolve(params: dict, pipe, where: str = "", images: int = 1, embedded: Optional[bool] = None,
            classifiers: Optional[ClassifierCache] = None) -> dict:
    """Fill the model-dependent defaults and check the size against the model: a multiple of its VAE factor,
    and small enough that `images` images per call can be decoded in the free memory.

    The defaults: width and height (the model's native size); the method, guidance scale, steps, APG's eta /
    norm_threshold / momentum and the classifier settings and sampler (`job_defaults`, the one resolver of every
    entry point). `embedded` says whether the model is the embedded one; None reads it from the pipeline's folder.

    A job with a classifier gets its `label` as the class id (`resolve_classifier`, loading the classifier
    through `classifiers`: give one cache for a whole run so each classifier loads once).

    A style-transfer job has its size from its content image; it is checked the same way, and the model must
    be a Stable Diffusion 1.x/2.x one (StyleID). A method the model's family cannot run is refused
    (`check_family`)."""
    from .families import family_of_pipe

    check_family(params, family_of_pipe(pipe), where)
    if is_style(params):
        if not styleid_supported(pipe):
            raise JobError(f"{where}content_image: style transfer (StyleID) needs a Stable Diffusion 1.x/2.x model, "
                           f"not a {type(pipe).__name__}; accepted: such a model (--model)")
        out = dict(params)
        try:
            check_image_size(out["width"], out["height"], multiple_of=size_multiple(pipe),
                             names=("content_image width", "content_image height"))
            check_image_memory(pipe, out["width"], out["height"], images=1, name="content_image size")
        except ValueError as e:
            raise JobError(f"{where}{e}") from None
        return out
    if is_video(params):
        raise JobError(f"{where}frames: a video job is resolved by resolve_video, on the video model")
    out = resolve_classifier(params, classifiers, where)
    out = apply_defaults(out, job_defaults(out, pipe, embedded))
    check_family(out, family_of_pipe(pipe), where)  # the resolved scale, on a family with a lower bound
    for key in ("width", "height"):
        if out[key] is None:
            out[key] = default_size(pipe)
    try:
        check_image_size(out["width"], out["height"], multiple_of=size_multiple(pipe))
        check_image_memory(pipe, out["width"], out["height"], images=images, name="width/height")
    except ValueError as e:
        raise JobError(f"{where}{e}") from None
    return out


def job_key(params: dict, model_id: str) -> str:
    """A short content hash of the resolved parameters and the model: it names a job's files."""
    blob = json.dumps({"params": params, "model": model_id}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def styleid_supported(pipe) -> bool:
    """Whether StyleID runs on `pipe`: Stable Diffusion 1.x/2.x pipelines only."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return isinstance(pipe, StableDiffusionPipeline) and not isinstance(pipe, StableDiffusionXLPipeline)


def style_hooks(params: dict) -> list:
    """The start-point hooks of a style-transfer job: none for "styleid", `guidekit.StyleSSP` for "stylessp"."""
    if params["start_point"] != "stylessp":
        return []
    import guidekit

    w_inv = params[STYLESSP_SCALE]
    return [guidekit.StyleSSP(alpha=params["alpha"], inversion_guidance_scale=w_inv, negative_inversion=w_inv > 1)]


def style_transfer(spipe, params: dict, seeds: Iterable[int], files: dict, generator_device: str = "cpu"):
    """A style-transfer job's images: one `transfer` per seed on `spipe` (a `StyleIDStableDiffusionPipeline`;
    `guidekit.apps.style.style_pipeline` makes one from a loaded pipeline), each with its own `torch.Generator`
    (StyleSSP draws its start-point noise from it), so an image never depends on order or process count.
    `files`: the job's image paths (`Job.files`). Returns float numpy images (N, H, W, 3) in [0, 1]."""
    import numpy as np
    import PIL.Image
    import torch

    images = {}
    for name in ("content_image", "style_image"):
        with PIL.Image.open(files[name]) as im:
            images[name] = im.convert("RGB")
    out = []
    for seed in seeds:
        result = spipe.transfer(
            images["content_image"], images["style_image"], num_inference_steps=params["steps"],
            gamma=params["gamma"], temperature=params["temperature"], hooks=style_hooks(params),
            content_prompt=params.get("content_prompt"), style_prompt=params.get("style_prompt"),
            generator=torch.Generator(device=generator_device).manual_seed(int(seed)), output_type="np")
        out.append(np.asarray(result.images[0], dtype=np.float32))
    return np.stack(out)


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


def to_pil(images):
    """Float images in [0, 1] -> 8-bit PIL images (the rounding diffusers uses)."""
    import numpy as np
    from PIL import Image

    arr = (np.asarray(images) * 255.0).round().clip(0, 255).astype("uint8")
    return [Image.fromarray(a) for a in arr]


#----------------------------------------------------------------------------
# Model loading.

def load_pipeline(model: Optional[str] = None, device="cpu", dtype=None):
    """Load `model` (hub id or folder; default: the embedded toy model) with guidekit's hooked pipeline, on
    `device` in `dtype` (default float32).

    Returns (pipeline, model name): the loader `guidekit generate` uses, shared by every app.
    """
    from .generate import load_pipeline as shared

    return shared(model, device=device, dtype=dtype)


#----------------------------------------------------------------------------
# Videos (AnimateDiff with FreeNoise).

#: Frames decoded per VAE call (`guidekit video`'s, and GuidedAnimateDiffPipeline's default).
DECODE_CHUNK = 16
GET_VIDEO_MODEL = ("pass --video-model with a diffusers AnimateDiff pipeline folder (model_index.json), or a "
                   "MotionAdapter folder to pair with the image model")


def embedded_video_model_path() -> Optional[Path]:
    """The embedded video model's folder, or None when this guidekit has none or it is not installed."""
    try:
        from guidekit.toy import default_video_model_path

        path = Path(default_video_model_path())
    except (ImportError, AttributeError, OSError):  # FileNotFoundError: not installed
        return None
    return path if (path / "model_index.json").is_file() or (path / "config.json").is_file() else None


def load_video_pipeline(path, image_pipe=None, device="cpu", dtype=None, option: str = "--video-model"):
    """A `GuidedAnimateDiffPipeline` from `path`: an AnimateDiff pipeline folder (model_index.json), or a
    MotionAdapter folder (config.json) added to `image_pipe` (a Stable Diffusion 1.x pipeline, whose modules
    it shares). Raises JobError naming `option` and what is accepted."""
    import torch

    from guidekit.pipelines import GuidedAnimateDiffPipeline

    folder = Path(path).expanduser()
    accepted = ("a local diffusers AnimateDiff pipeline folder (model_index.json), or a MotionAdapter folder "
                "(config.json) to pair with the image model")
    if not folder.is_dir():
        raise JobError(f"{option}: {str(path)!r} is not a folder; accepted: {accepted}")
    dtype = dtype or torch.float32
    try:
        if (folder / "model_index.json").is_file():
            kind = json.loads((folder / "model_index.json").read_text(encoding="utf-8")).get("_class_name")
            if kind not in ("AnimateDiffPipeline", "GuidedAnimateDiffPipeline"):
                raise JobError(f"{option}: {str(path)!r} is a {kind} (model_index.json); accepted: {accepted}")
            pipe = GuidedAnimateDiffPipeline.from_pretrained(str(folder), local_files_only=True, dtype=dtype)
        elif (folder / "config.json").is_file():
            pipe = _adapter_pipeline(folder, image_pipe, dtype, option)
        else:
            raise JobError(f"{option}: {str(path)!r} has neither model_index.json nor config.json; "
                           f"accepted: {accepted}")
    except JobError:
        raise
    except Exception as e:  # noqa: BLE001 - diffusers' OSError, ValueError...: say which folder failed
        raise JobError(f"{option}: cannot load {str(path)!r}: {type(e).__name__}: {e}") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def _adapter_pipeline(folder: Path, image_pipe, dtype, option: str):
    from diffusers import MotionAdapter, StableDiffusionPipeline, StableDiffusionXLPipeline

    from guidekit.pipelines import GuidedAnimateDiffPipeline

    if not isinstance(image_pipe, StableDiffusionPipeline) or isinstance(image_pipe, StableDiffusionXLPipeline):
        raise JobError(f"{option}: {folder} is a motion adapter, which needs a Stable Diffusion 1.x image model; the "
                       f"image model is a {type(image_pipe).__name__}; accepted: an AnimateDiff pipeline folder")
    kind = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("_class_name")
    if kind != "MotionAdapter":
        raise JobError(f"{option}: {folder} holds a {kind} (config.json); accepted: a MotionAdapter folder, or an "
                       "AnimateDiff pipeline folder")
    adapter = MotionAdapter.from_pretrained(str(folder), local_files_only=True, torch_dtype=dtype)
    return GuidedAnimateDiffPipeline.from_pipe(image_pipe, motion_adapter=adapter)


def motion_limit(vpipe) -> Optional[int]:
    """The video model's motion_max_seq_length: the frames one window of its temporal layers may hold."""
    value = vpipe.unet.config.get("motion_max_seq_length")
    return None if value is None else int(value)


def check_video_windows(vpipe, frames: int, freenoise: Optional[dict], where: str = "",
                        names: tuple[str, str] = ("frames", "freenoise: context_length")) -> None:
    """Raise JobError when the video model cannot run `frames` frames with `freenoise` (None: off)."""
    limit = motion_limit(vpipe)
    if limit is None:
        return
    if freenoise is None and frames > limit:
        raise JobError(f"{where}{names[0]}: {frames} is above the video model's motion_max_seq_length {limit}, which "
                       f"the plain pipeline cannot exceed; accepted: at most {limit} frames, or FreeNoise")
    if freenoise is not None and freenoise["context_length"] is not None and freenoise["context_length"] > limit:
        raise JobError(f"{where}{names[1]}: {freenoise['context_length']} is above the video model's "
                       f"motion_max_seq_length {limit}; accepted: an integer from 1 to {limit}")


def resolve_video(params: dict, vpipe, where: str = "", model=None) -> dict:
    """A video job's params with the model-dependent defaults filled (width and height: the video model's native
    size; method, scale, steps and APG's settings: `guidekit.apps.defaults.resolve_defaults`, for the folder of
    `vpipe`, or `model`: the image model a motion adapter runs on), checked against the video model: size, memory
    of one decode chunk, window."""
    out = apply_defaults(params, job_defaults(params, vpipe, model=model))
    for key in ("width", "height"):
        if out[key] is None:
            out[key] = default_size(vpipe)
    injection = (out.get("freenoise") or {}).get("motion_injection")
    if injection is not None and out["guidance_scale"] <= 1:
        # as in the official code it acts in the conditional pass of classifier-free guidance only
        raise JobError(f"{where}freenoise: motion_injection needs guidance_scale > 1, got {out['guidance_scale']:g}; "
                       "accepted: a larger guidance_scale, or without motion_injection")
    try:
        check_image_size(out["width"], out["height"], multiple_of=size_multiple(vpipe))
        check_image_memory(vpipe, out["width"], out["height"], images=min(out["frames"], DECODE_CHUNK),
                           name="width/height")
    except ValueError as e:
        raise JobError(f"{where}{e}") from None
    check_video_windows(vpipe, out["frames"], out["freenoise"], where)
    return out


def video_prompt(params: dict):
    """The pipeline's prompt of a video job: its `prompt`, or its {frame: prompt} schedule."""
    if params.get("prompts"):
        return {int(k): v for k, v in params["prompts"].items()}
    return params["prompt"]


def generate_video(vpipe, params: dict, seed: int, generator_device: str = "cpu", callback=None,
                   record: Optional[dict] = None):
    """One video of resolved video `params`: float numpy frames (F, H, W, 3) in [0, 1]. `callback(step, steps)`
    is called after each denoising step. `record`, if given, is filled with what the call ran with
    (`guidekit.apps.defaults.ran_settings`)."""
    import guidekit
    import torch

    hooks = list(GUIDANCE[params["guidance"]].build(params))
    if params["freenoise"] is not None:
        kwargs = dict(params["freenoise"])
        if kwargs["motion_injection"] is not None:
            kwargs["motion_injection"] = tuple(kwargs["motion_injection"])
        hooks.append(guidekit.FreeNoise(**kwargs))
    step_end = None
    if callback is not None:
        def step_end(pipe, step, timestep, tensors):
            callback(step + 1, params["steps"])
            return tensors
    if record is not None:
        record.update(ran_settings(params["guidance"], params["guidance_scale"], params["steps"], vpipe.scheduler,
                                   hooks))
    out = vpipe(video_prompt(params), num_frames=params["frames"], width=params["width"], height=params["height"],
                num_inference_steps=params["steps"], guidance_scale=params["guidance_scale"],
                negative_prompt=params.get("negative_prompt") or None, output_type="np", hooks=hooks,
                generator=torch.Generator(device=generator_device).manual_seed(int(seed)),
                decode_chunk_size=DECODE_CHUNK, callback_on_step_end=step_end)
    return out.frames[0]


def frame_change(frames) -> tuple[float, float]:
    """(mean, largest) change between consecutive frames: the mean absolute difference of their 8-bit pixel values
    (0 to 255). Flicker and jumps at window seams raise both; (0, 0) for a single frame."""
    import numpy as np

    arr = np.asarray(frames, dtype=np.float64)
    if len(arr) < 2:
        return 0.0, 0.0
    per_pair = np.abs(np.diff(arr, axis=0)).reshape(len(arr) - 1, -1).mean(axis=1) * 255.0
    return float(per_pair.mean()), float(per_pair.max())


def video_bytes(frames, fmt: str, fps: float) -> bytes:
    """`frames` encoded as an animated file of format `fmt` ("gif" or "webp") by `guidekit.video.save_video`."""
    import tempfile

    from guidekit.video import save_video

    with tempfile.TemporaryDirectory(prefix="guidekit-video-") as folder:
        path = save_video(frames, Path(folder) / f"video.{fmt}", fps=fps)
        return path.read_bytes()
