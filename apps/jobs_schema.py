"""The building blocks of every job kind: fields (`Param`), the fields every generation job has (`COMMON`),
seeds, image files, the validated `Job`, and which model families run a job."""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from guidekit.checks import MAX_IMAGE_SIDE

from .defaults import DEFAULT_METHOD


class JobError(ValueError):
    """A job that cannot run as written; the message names the field, the value and what is accepted."""


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

SEED_FIELDS = ("seed", "seeds")

#: Fields whose default the model decides (`resolve`, through `guidekit.apps.defaults.resolve_defaults`).
MODEL_DEFAULTS = ("guidance", "guidance_scale", "steps")

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


def is_video(params: dict) -> bool:
    """Whether `params` (of `parse_job`) are a video job's."""
    return params.get("frames") is not None


def _json_cell(value: Any) -> Any:
    """A CSV cell holding JSON (an object, true, false) as its value; other values unchanged."""
    if isinstance(value, str) and value.strip()[:1] in ("{", "[") or value in ("true", "false"):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


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


def to_pil(images):
    """Float images in [0, 1] -> 8-bit PIL images (the rounding diffusers uses)."""
    import numpy as np
    from PIL import Image

    arr = (np.asarray(images) * 255.0).round().clip(0, 255).astype("uint8")
    return [Image.fromarray(a) for a in arr]
