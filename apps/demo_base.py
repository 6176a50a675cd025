"""What every tab of the demo shares: the limits of one request, the backend's core (the one pipeline, its
defaults, a request's parameters), error messages in the page, and the common controls."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .defaults import resolve_defaults
from .families import family_of_pipe
from .jobs import GUIDANCE, JobError, default_size, is_embedded_pipe, parse_job, resolve, size_multiple, to_pil


log = logging.getLogger("guidekit.demo")

ASSETS = Path(__file__).resolve().parent.parent / "assets"

EXAMPLE_PROMPTS = [
    "a red circle on a blue background",
    "a yellow square on a green background",
    "a green triangle on a cyan background",
]

# Small models make small images: show them large, with crisp pixels.
OUTPUT_IMAGE = dict(height=320, elem_classes=["gk-out"])

CSS = """
.gk-out img { width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated; }
/* Table headers wrap between words, never inside one ("tim e"). */
.prose th, .prose td { word-break: normal; overflow-wrap: normal; }
/* A table wider than its column scrolls instead of being cut off at the page's edge. */
.prose table { display: block; max-width: 100%; overflow-x: auto; }
/* The Sweep grid's column headers ("w = 1") start below the image's label and buttons, not under them. */
#sweep-grid .image-frame { padding-top: 2.5rem; }
"""


@dataclass(frozen=True)
class Limits:
    max_steps: int = 100  # room for the embedded model's recommended EluCD sampler (RECOMMENDED_ELUCD_SAMPLER)
    max_size: int = 512
    max_sweep: int = 6  # guidance scales per sweep: 2 x max_sweep images per request
    max_scale: float = 30.0
    max_frames: int = 64  # frames of one Long video request (two videos are made)
    queue_size: int = 16

    def check(self, params: dict, images: int = 2) -> None:
        if params["steps"] > self.max_steps:
            raise JobError(f"steps: {params['steps']} is over this demo's limit; accepted: 1 to {self.max_steps} "
                           "(start the demo with --max-steps to change it)")
        for key in ("width", "height"):
            if params[key] > self.max_size:
                raise JobError(f"{key}: {params[key]} is over this demo's limit; accepted: up to {self.max_size} "
                               "pixels (start the demo with --max-size to change it)")
        if params["guidance_scale"] > self.max_scale:
            raise JobError(f"guidance_scale: {_num(params['guidance_scale'])} is over this demo's limit; "
                           f"accepted: 0 to {_num(self.max_scale)}")

    def check_frames(self, frames: int) -> None:
        if frames > self.max_frames:
            raise JobError(f"frames: {frames} is over this demo's limit; accepted: 1 to {self.max_frames} "
                           "(start the demo with --max-frames to change it)")


def _ui_errors(fn):
    """Turn every error into a message in the page (gr.Error); the traceback goes to the server log only."""
    import gradio as gr

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except ValueError as e:  # JobError and the library's argument errors: the message says it all
            raise gr.Error(str(e), print_exception=False) from None
        except Exception as e:  # noqa: BLE001 - a demo must answer, not crash
            log.exception("request failed")
            raise gr.Error(f"generation failed: {type(e).__name__}: {e}", print_exception=False) from None

    return wrapper


def _as_count(value, name: str) -> int:
    """A slider's whole number (Gradio may send 8.0) as an int; JobError for anything else."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise JobError(f"{name}: expected an integer >= 1, got {value!r}")
    return value


def _as_int(value, name):
    if value is None or value == "":
        return None
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise JobError(f"{name}: expected an integer >= 0, got {value!r}")


def _first_image(images):
    if images is None:
        return None
    img = images[0]
    if hasattr(img, "save"):
        return img
    return to_pil([img])[0]


def _mask_image(mask):
    if mask is None:
        return None
    import numpy as np
    from PIL import Image

    if hasattr(mask, "detach"):
        mask = mask.detach().float().cpu().numpy()
    arr = np.squeeze(np.asarray(mask, dtype=np.float32))
    if arr.ndim == 3:
        arr = arr.mean(axis=0) if arr.shape[0] < arr.shape[-1] else arr.mean(axis=-1)
    return Image.fromarray((np.clip(arr, 0, 1) * 255).round().astype("uint8"), mode="L")


def _num(x) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def _name_bound_errors(component):
    """Make a Gradio number/slider's server-side bound check name the field (Gradio's message does not).

    The instance's `preprocess` is wrapped rather than subclassed: Gradio writes a .pyi stub next to the
    source file of every component subclass, and the demo writes no file into its package.
    """
    import gradio as gr
    from gradio.components.number import Number as _Number

    plain = component.preprocess

    def preprocess(payload):
        if payload is None:
            return plain(payload)
        lo, hi = component.minimum, component.maximum
        if isinstance(payload, bool) or not isinstance(payload, (int, float)):
            raise gr.Error(f"{component.label}: expected a number from {_num(lo)} to {_num(hi)}, got {payload!r}",
                           print_exception=False)
        try:
            _Number.raise_if_out_of_bounds(payload, lo, hi)
        except gr.Error:
            raise gr.Error(f"{component.label}: {payload} is out of range; accepted: {_num(lo)} to {_num(hi)}",
                           print_exception=False) from None
        return plain(payload)

    component.preprocess = preprocess
    return component


def Slider(*args, **kwargs):  # noqa: N802 - gr.Slider with a field-naming bound check
    import gradio as gr

    return _name_bound_errors(gr.Slider(*args, **kwargs))


def Number(*args, **kwargs):  # noqa: N802 - gr.Number with a field-naming bound check
    import gradio as gr

    return _name_bound_errors(gr.Number(*args, **kwargs))


def _slider(param, label=None, **kw):
    kw.setdefault("minimum", param.min)
    kw.setdefault("maximum", param.max)
    kw.setdefault("value", param.default)
    kw.setdefault("info", param.help)
    return Slider(label=label or param.name, **kw)


def _sampling_controls(backend: DemoBase, tab: str):
    """Negative prompt, seed, steps, width, height: the same controls in each tab."""
    import gradio as gr

    lim, f = backend.limits, backend.factor
    size_min = f * 4 if f * 4 <= backend.default_size else f
    negative = gr.Textbox(label="Negative prompt", placeholder="optional", elem_id=f"{tab}-negative")
    seed = Number(label="Seed", value=0, precision=0, minimum=0, maximum=2**31 - 1,
                     info="Same seed, same start noise: CFG and APG start from the same point.", elem_id=f"{tab}-seed")
    steps = Slider(1, lim.max_steps, value=min(backend.defaults().steps, lim.max_steps), step=1, label="Steps",
                   info=f"Denoising steps (this demo allows up to {lim.max_steps}).", elem_id=f"{tab}-steps")
    size_info = f"Pixels, a multiple of {f}; the model's native size is {backend.default_size}."
    width = Slider(size_min, lim.max_size, value=min(backend.default_size, lim.max_size), step=f, label="Width",
                   info=size_info, elem_id=f"{tab}-width")
    height = Slider(size_min, lim.max_size, value=min(backend.default_size, lim.max_size), step=f, label="Height",
                    info=size_info, elem_id=f"{tab}-height")
    return negative, seed, steps, width, height


def apg_start_values(embedded: bool) -> dict:
    """Where the APG sliders start: the embedded model's recommended setting (`guidekit.toy.RECOMMENDED_APG`)
    when the demo runs that model, else the paper's SDXL values (`guidekit.APG`'s defaults)."""
    from guidekit.toy import apg_settings

    return apg_settings(embedded)


def _apg_controls(backend: DemoBase, tab: str):
    import gradio as gr

    p = GUIDANCE["apg"].params
    start = apg_start_values(backend.embedded)
    source = ("the embedded model's recommended setting (guidekit.toy.RECOMMENDED_APG)" if backend.embedded
              else "the paper's SDXL value (guidekit.APG's default; the recommended setting is for the embedded "
                   "model only)")

    def info(name: str) -> str:
        what = p[name].help.split(" Default: ")[0]  # the field's meaning, without the job file's default rule
        return f"{what} Starts at {start[name]:g}: {source}."

    with gr.Accordion("APG parameters", open=True):
        eta = _slider(p["eta"], f"eta (parallel weight), default {start['eta']:g}", value=start["eta"], step=0.05,
                      info=info("eta"), elem_id=f"{tab}-eta")
        norm = _slider(p["norm_threshold"], f"norm_threshold r, default {start['norm_threshold']:g}",
                       value=start["norm_threshold"], step=0.25, maximum=100.0, info=info("norm_threshold"),
                       elem_id=f"{tab}-norm")
        momentum = _slider(p["momentum"], f"momentum beta, default {start['momentum']:g}", value=start["momentum"],
                           step=0.05, info=info("momentum"), elem_id=f"{tab}-momentum")
    return eta, norm, momentum


def _is_embedded_name(model_name: str) -> bool:
    """Whether the folder `model_name` holds an embedded model's weights (`guidekit.toy.settings_for`)."""
    from guidekit.toy.settings import embedded_name

    return bool(model_name) and embedded_name(model_name) is not None


def _model_label(model_name: str) -> str:
    if _is_embedded_name(model_name):
        return "the embedded toy model (64x64 coloured shapes)"
    return f"`{model_name or 'custom'}`"


class DemoBase:
    """The shared part of the demo's backend: the one pipeline, its limits and defaults, and a request's parameters."""

    def __init__(self, pipe, model_name: str = "", limits: Limits = Limits(), embedded: Optional[bool] = None):
        self.pipe = pipe
        self.pipe.set_progress_bar_config(disable=True)
        self.model_name = model_name
        self.limits = limits
        # the embedded toy model: APG's defaults are its recommended setting (guidekit.toy.RECOMMENDED_APG)
        self.embedded = (_is_embedded_name(model_name) or is_embedded_pipe(pipe)) if embedded is None else embedded
        self.factor = size_multiple(pipe)  # sizes: the one rule of every entry point
        self.default_size = default_size(pipe)
        self.family = family_of_pipe(pipe)  # SD3, Flux, Qwen-Image: CFG and APG only (`check_method`)

    def defaults(self, request: str = "image", **given):
        """The resolved defaults (`guidekit.apps.defaults.resolve_defaults`) of a request on this model."""
        return resolve_defaults(request, pipe=self.pipe, family=self.family, embedded=self.embedded, **given)

    def params(self, guidance: str, prompt, negative_prompt, seed, steps, width, height, guidance_scale,
               **extra) -> tuple[dict, int]:
        """Validated, resolved parameters of one call and its seed (messages name the field)."""
        raw = {"prompt": prompt, "negative_prompt": negative_prompt or None, "seed": _as_int(seed, "seed"),
               "steps": steps, "width": width, "height": height, "guidance": guidance,
               "guidance_scale": guidance_scale}
        raw.update({k: v for k, v in extra.items() if k in GUIDANCE[guidance].params})
        job = parse_job({k: v for k, v in raw.items() if v is not None})
        params = resolve(job.params, self.pipe, embedded=self.embedded)
        self.limits.check(params)
        return params, job.seeds[0]

    def check_method(self, method: str) -> None:
        """Raise JobError (a message in the page) when the model's family cannot run `method` (a key of
        `guidekit.apps.families.METHOD_NAMES`)."""
        from .families import MethodRefused
        from .families import check_method as check

        try:
            check(self.family, method)
        except MethodRefused as e:
            raise JobError(f"model: {e}") from None
