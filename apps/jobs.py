"""The job schema shared by `guidekit batch` and the demo: fields, bounds, parsing, and one guided call.

A job is one line of a JSONL file (or one row of a CSV file with a header)::

    {"prompt": "a red circle on a blue background", "seeds": "0-7", "guidance": "apg", "guidance_scale": 12}

A style-transfer job (StyleID, optionally with StyleSSP's start point) names two images instead of a prompt;
their paths are relative to the job file's folder::

    {"content_image": "content.png", "style_image": "style.png", "start_point": "stylessp", "style_prompt": "..."}

Field names are part of the public interface (scripts depend on them). Each guidance method adds its
own parameters, named as its hook's arguments; a later method adds one entry to `GUIDANCE`.
Nothing is clamped: a value out of bounds is an error that names the field, the value and the range.

Each job kind has its own module, and this one reads a job file and sends each job to its kind:
`jobs_schema` (fields every kind shares, seeds, image files), `jobs_image` (text-to-image jobs and their guidance
methods), `jobs_classifier` (classifier guidance in an image job), `jobs_style` (style transfer), `jobs_video`
(videos), `uam_jobs` (the kinds "reconstruct" and "edit"). A new kind adds its module, and its parser here.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from pathlib import Path
from typing import Any, Optional

from guidekit.checks import check_image_memory, check_image_size

from .defaults import FREENOISE_DEFAULTS
from .jobs_classifier import CLASSIFIER, ClassifierCache, resolve_classifier
from .jobs_image import (GUIDANCE, MODEL_DEPENDENT, Guidance, _parse_generation, apg_defaults, apply_defaults,
                         generate, guidance_call, job_defaults, job_sampler)
from .jobs_schema import (COMMON, MAX_SEED, MODEL_DEFAULTS, SEED_FIELDS, Job, JobError, Param, _parse_job_seeds,
                          check_family, is_style, is_video, job_methods, parse_seeds, to_pil)
from .jobs_style import (START_POINTS, STYLE, STYLE_SHARED, STYLE_STEPS, STYLESSP_ONLY, STYLESSP_SCALE, _parse_style,
                         style_hooks, style_transfer, styleid_supported)
from .jobs_video import (DECODE_CHUNK, GET_VIDEO_MODEL, MAX_FRAMES, VIDEO, VIDEO_FILE_FORMATS, VIDEO_REFUSED,
                         _parse_video, check_video_windows, embedded_video_model_path, frame_change, generate_video,
                         load_video_pipeline, motion_limit, resolve_video, video_bytes, video_prompt)
from .models import default_size, is_embedded_pipe, load_pipeline, size_multiple, vae_factor

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
# Re-exported from the modules of each kind, for the apps and scripts that import them from here.
__all__ += ["FREENOISE_DEFAULTS", "SEED_FIELDS", "GET_VIDEO_MODEL", "guidance_call", "to_pil",
            "embedded_video_model_path", "motion_limit", "video_bytes", "video_prompt", "load_pipeline",
            "default_size", "size_multiple", "vae_factor", "is_embedded_pipe", "styleid_supported", "MODEL_DEPENDENT",
            "MODEL_DEFAULTS", "MAX_SEED", "job_methods", "check_family", "STYLE_SHARED", "STYLE_STEPS", "STYLESSP_ONLY",
            "STYLESSP_SCALE", "style_hooks", "DECODE_CHUNK", "MAX_FRAMES", "VIDEO_FILE_FORMATS", "VIDEO_REFUSED",
            "check_video_windows"]


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


