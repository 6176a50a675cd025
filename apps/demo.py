"""The guidekit web demo: CFG vs APG side by side, a guidance-scale sweep, UAM reconstruct/edit, StyleID
style transfer with and without StyleSSP, classifier guidance (naive vs EluCD), and long videos (plain
sliding windows vs FreeNoise, on the embedded video model or --video-model).

Start it with::

    guidekit demo                       # the embedded toy model, offline, on CPU
    guidekit demo --model ID_OR_PATH --host 0.0.0.0 --port 7860

One model is loaded once and shared by every request; requests run one at a time through Gradio's
queue, and each request is bounded (steps, size, number of images) so none can exhaust the machine.
Inputs are checked on the server as well as by the sliders: a bad value is a message in the page,
never a stack trace. The demo serves no file outside its own assets and never runs remote code.
"""

from __future__ import annotations

import functools
import logging
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import click

from guidekit.checks import MAX_IMAGE_SIDE

from .defaults import FREENOISE_DEFAULTS, PAPER_CLASSIFIER_SCALE, resolve_defaults
from .families import family_of_pipe
from .jobs import (COMMON, GUIDANCE, JobError, default_size, generate, is_embedded_pipe, parse_job, resolve,
                   size_multiple, to_pil, vae_factor)

log = logging.getLogger("guidekit.demo")

ASSETS = Path(__file__).resolve().parent.parent / "assets"
EXAMPLE_PROMPTS = [
    "a red circle on a blue background",
    "a yellow square on a green background",
    "a green triangle on a cyan background",
]
#: Largest classifier scale the Classifier guidance tab accepts.
MAX_CLASSIFIER_SCALE = 100.0
#: Where that tab's scale slider starts on other models than the embedded one: the official classifier_scale of
#: the EluCD DDPM script (on the embedded model: the scale of guidekit.toy.RECOMMENDED_ELUCD).
DEFAULT_CLASSIFIER_SCALE = PAPER_CLASSIFIER_SCALE
#: Where the Generate tab's scale starts: above the models' defaults, where CFG and APG differ visibly (the model's
#: default scale is in the slider's text).
COMPARE_SCALE = 10.0
#: The Sweep tab's default guidance scales: from no guidance up to the scales where CFG degrades and APG is
#: built not to (w = 15 and above).
SWEEP_SCALES = (1, 5, 10, 15, 20)


#----------------------------------------------------------------------------
# Limits of one request.

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


#----------------------------------------------------------------------------
# The work behind each button (plain functions: testable without a browser).

class DemoBackend:
    """Holds the one shared pipeline and runs requests on it."""

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
        self._uam = None
        self._styleid = None
        self._classifier: Optional[tuple[str, object]] = None  # (path, ClassifierCache): the last one used

    def defaults(self, request: str = "image", **given):
        """The resolved defaults (`guidekit.apps.defaults.resolve_defaults`) of a request on this model."""
        return resolve_defaults(request, pipe=self.pipe, family=self.family, embedded=self.embedded, **given)

    # -- parameters

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

    # -- Generate

    def compare(self, prompt, negative_prompt, seed, steps, width, height, guidance_scale, eta, norm_threshold,
                momentum):
        """The same seed with CFG and with APG: (cfg image, apg image, Markdown summary)."""
        from guidekit.metrics import clipped_fraction, mean_saturation

        common = (prompt, negative_prompt, seed, steps, width, height, guidance_scale)
        cfg, seed = self.params("cfg", *common)
        apg, _ = self.params("apg", *common, eta=eta, norm_threshold=norm_threshold, momentum=momentum)
        results = []
        for params in (cfg, apg):
            t0 = time.perf_counter()
            images, _ = generate(self.pipe, params, [seed])
            results.append((images, time.perf_counter() - t0))
        rows = ["| | saturation | clipped (0 or 255) | time |", "|---|---|---|---|"]
        for name, (images, dt) in zip(("CFG", "APG"), results):
            rows.append(f"| **{name}** | {mean_saturation(images):.3f} | {clipped_fraction(images):.4f} | {dt:.1f} s |")
        summary = (f"Seed {seed}, guidance scale {cfg['guidance_scale']:g}, {cfg['steps']} steps, "
                   f"{cfg['width']}x{cfg['height']}; APG eta {apg['eta']:g}, r {apg['norm_threshold']:g}, "
                   f"beta {apg['momentum']:g}.\n\n" + "\n".join(rows) +
                   "\n\nSaturation: mean HSV saturation. Clipped: fraction of 8-bit channel values at 0 or 255.")
        return to_pil(results[0][0])[0], to_pil(results[1][0])[0], summary

    # -- Sweep

    def sweep(self, prompt, negative_prompt, seed, steps, width, height, scales, eta, norm_threshold, momentum):
        """A grid: one row for CFG, one for APG, one column per guidance scale. (grid image, table rows).

        Each table row: guidance scale, CFG saturation, CFG clipped fraction, APG saturation, APG clipped
        fraction (`SWEEP_HEADERS`)."""
        from guidekit.metrics import clipped_fraction, mean_saturation

        values = parse_scales(scales, self.limits)
        calls = []
        for scale in values:  # check every call before running any
            common = (prompt, negative_prompt, seed, steps, width, height, scale)
            calls.append((scale, "CFG", *self.params("cfg", *common)))
            calls.append((scale, "APG", *self.params("apg", *common, eta=eta, norm_threshold=norm_threshold,
                                                      momentum=momentum)))
        cells, table = {}, []
        for scale, name, params, seed_ in calls:
            images, _ = generate(self.pipe, params, [seed_])
            cells[name, scale] = (to_pil(images)[0], mean_saturation(images), clipped_fraction(images))
        for scale in values:
            (_, cfg_sat, cfg_clip), (_, apg_sat, apg_clip) = cells["CFG", scale], cells["APG", scale]
            table.append([scale, round(cfg_sat, 4), round(cfg_clip, 4), round(apg_sat, 4), round(apg_clip, 4)])
        return compose_grid(cells, values), table

    # -- Reconstruct / Edit (UAM)

    def check_method(self, method: str) -> None:
        """Raise JobError (a message in the page) when the model's family cannot run `method` (a key of
        `guidekit.apps.families.METHOD_NAMES`)."""
        from .families import MethodRefused
        from .families import check_method as check

        try:
            check(self.family, method)
        except MethodRefused as e:
            raise JobError(f"model: {e}") from None

    def uam(self):
        self.check_method("uam")
        if self._uam is None:
            from diffusers import StableDiffusionXLPipeline

            from guidekit.pipelines import UAMStableDiffusionPipeline, UAMStableDiffusionXLPipeline

            cls = UAMStableDiffusionXLPipeline if isinstance(self.pipe, StableDiffusionXLPipeline) else \
                UAMStableDiffusionPipeline
            # The same modules, in the dtype they were loaded in: guidekit's from_pipe converts nothing unless
            # given a dtype (diffusers' own converts to float32 by default).
            self._uam = cls.from_pipe(self.pipe)
            self._uam.set_progress_bar_config(disable=True)
        return self._uam

    def reconstruct_edit(self, image, source_prompt, target_prompt, seed, steps, size, guidance_scale):
        """(original, reconstruction, edit, mask, Markdown metrics)."""
        import torch

        self.check_method("uam")  # before any input check: no input makes it run on this model

        if image is None:
            raise JobError("image: upload an image or pick an example")
        if not target_prompt:
            raise JobError("target prompt: required for the edit (what the image should become)")
        params, seed = self.params("cfg", source_prompt or "an image", None, seed, steps, size, size,
                                   guidance_scale)
        original = image.convert("RGB").resize((params["width"], params["height"]))
        uam = self.uam()
        gen = lambda: torch.Generator("cpu").manual_seed(seed)  # noqa: E731
        rec = uam.reconstruct(original, prompt=source_prompt or "", guidance_scale=1.0, uniform=True,
                              num_inference_steps=params["steps"], generator=gen())
        # MasaCtrl's mutual self-attention starts at step 4 (the paper's value), or at the last step of short runs
        edit = uam.edit(original, source_prompt or "", target_prompt, guidance_scale=params["guidance_scale"],
                        num_inference_steps=params["steps"], start_step=min(4, params["steps"]), generator=gen())
        m = rec.metrics[0] if getattr(rec, "metrics", None) else {}
        metrics = " · ".join(f"{k.upper()} {v:.4g}" for k, v in m.items() if isinstance(v, (int, float)))
        mask = edit.masks[0] if getattr(edit, "masks", None) is not None and len(edit.masks) else None
        return original, _first_image(rec.images), _first_image(edit.images), _mask_image(mask), \
            f"Reconstruction: {metrics or 'no metrics'}"


    # -- Style (StyleID, StyleID + StyleSSP)

    def styleid(self):
        self.check_method("styleid")
        if self._styleid is None:
            from .style import style_pipeline

            self._styleid = style_pipeline(self.pipe)  # the same modules; refuses SDXL with a message
        return self._styleid

    def style(self, content, style, style_prompt, seed, steps, size, gamma, temperature, alpha):
        """StyleID and StyleID + StyleSSP on the same content and style: (StyleID image, StyleID+StyleSSP image,
        Markdown numbers). Both images are resized to `size` x `size` first."""
        from guidekit.checks import check_number

        from .style import negative_scale_for, run_transfer, style_numbers

        self.check_method("styleid")
        if content is None:
            raise JobError("content image: upload an image or pick an example")
        if style is None:
            raise JobError("style image: upload an image or pick an example")
        params, seed = self.params("cfg", "an image", None, seed, steps, size, size, 1.0)
        gamma = check_number("gamma", gamma, 0.0, 1.0)
        temperature = check_number("temperature", temperature, 0.0, 10.0, low_open=True)
        alpha = check_number("alpha", alpha, 0.0, 1.0)
        style_prompt = (style_prompt or "").strip() or None
        dims = (params["width"], params["height"])
        content, style = content.convert("RGB").resize(dims), style.convert("RGB").resize(dims)
        settings = dict(steps=params["steps"], gamma=gamma, temperature=temperature, alpha=alpha,
                        style_prompt=style_prompt, seed=seed)
        spipe = self.styleid()
        rows = ["| | SSIM vs content | PSNR vs content | colour distance to style | time |", "|---|---|---|---|---|"]
        images = []
        for name, ssp in (("StyleID", False), ("StyleID+StyleSSP", True)):
            t0 = time.perf_counter()
            image = run_transfer(spipe, content, style, stylessp=ssp, **settings)
            n = style_numbers(image, content, style)
            rows.append(f"| **{name}** | {n['ssim']:.4f} | {n['psnr']:.2f} dB | {n['colour_dist']:.4f} | "
                        f"{time.perf_counter() - t0:.1f} s |")
            images.append(image)
        s = negative_scale_for(None, style_prompt)
        summary = (f"{params['steps']} steps, {dims[0]}x{dims[1]}, gamma {gamma:g}, T {temperature:g}; StyleSSP "
                   f"alpha {alpha:g}, negative-guided inversion scale {s:g}"
                   f"{'' if style_prompt else ' (no style prompt)'}, seed {seed}.\n\n" + "\n".join(rows) +
                   "\n\nSSIM and PSNR against the content: higher keeps more of its layout. Colour distance: "
                   "between the per-channel RGB mean and standard deviation of the result and of the style image; "
                   "lower matches the style's colours better.")
        return images[0], images[1], summary


    # -- Classifier guidance (naive vs EluCD)

    def classifier_cache(self, classifier):
        """The path of `classifier` (empty: the embedded classifier) and a cache holding it, loaded once; only
        the last classifier asked for stays loaded."""
        from .jobs import ClassifierCache

        path = (classifier or "").strip() if isinstance(classifier, str) or classifier is None else None
        if path is None:
            raise JobError(f"classifier: expected a folder path, got {classifier!r}")
        if not path:
            found = embedded_classifier_path()
            if found is None:
                raise JobError("classifier: the embedded classifier is not installed; " + GET_CLASSIFIER)
            path = str(found)
        if self._classifier is None or self._classifier[0] != path:
            cache = ClassifierCache()
            cache.get(path)  # raises JobError naming the path
            self._classifier = (path, cache)
        return self._classifier

    def classifier_labels(self, classifier) -> list[str]:
        """The class names of `classifier` (empty: the embedded one) in id order; ids when it has no names."""
        path, cache = self.classifier_cache(classifier)
        clf = cache.get(path)
        names = clf.id2label or {}
        if names:
            return [names[k] for k in sorted(names)]
        n = clf.num_labels or 0
        return [str(i) for i in range(n)]

    def classifier_guidance(self, classifier, label, scale, seed, steps):
        """Unguided, naive classifier guidance (`guidekit.ClassifierGuidance`) and EluCD (`guidekit.EluCD`) from
        the same start noise, unconditional as in the EluCD paper (empty prompt, guidance scale 1), at the
        model's native size (at most the demo's size limit): (three images, Markdown readings).

        Each image is read by the classifier (top class and its probability, and the probability of the
        requested class) and, on the embedded model, by the toy world's judge (shape colour and shape)."""
        import guidekit
        import torch
        from guidekit.checks import check_number
        from guidekit.guidance.elucd import check_elucd_scheduler

        from .defaults import scheduler_for, using_sampler
        from .jobs import resolve_classifier

        self.check_method("elucd")
        if label is None or (isinstance(label, str) and not label.strip()):
            raise JobError("class: pick the class to steer toward")
        path, cache = self.classifier_cache(classifier)
        target = resolve_classifier({"classifier": path, "label": label}, cache)["label"]
        scale = check_number("classifier scale", scale, 0.0, MAX_CLASSIFIER_SCALE)
        size = min(self.default_size, self.limits.max_size) // self.factor * self.factor
        params, seed = self.params("cfg", "an image", None, seed, steps, size, size, 1.0)
        clf = cache.get(path)
        # The request's defaults: with the embedded classifier on the embedded model, its recommended settings and
        # sampler, for all three runs; unconditional (empty prompt), so guidance scale 1
        settings = {calibration: self.defaults("classifier", prompt="", classifier=path, calibration=calibration,
                                               steps=params["steps"], classifier_scale=scale)
                    for calibration in ("plain", "elucd")}
        chosen = settings["elucd"]
        recommended, sampler = chosen.classifier_recommended, chosen.sampler
        # the hooks' own refusal of the sampler, before the unguided run
        check_elucd_scheduler(scheduler_for(self.pipe, sampler["scheduler"], sampler["scheduler_kwargs"]) if sampler
                              else self.pipe.scheduler)
        # CFG and APG give the conditional prediction at w <= 1: the slot needs a hook only above it
        slot = [] if chosen.guidance_scale <= 1 else \
            [guidekit.APG(**chosen.apg) if chosen.method == "apg" else guidekit.CFG()]
        runs = [("Unguided", None, None), ("Naive (ClassifierGuidance)", guidekit.ClassifierGuidance, "plain"),
                ("EluCD", guidekit.EluCD, "elucd")]
        images, rows = [], []
        for name, cls, calibration in runs:
            hooks = slot + ([] if cls is None else [cls(clf, target, **settings[calibration].classifier)])
            kwargs = {"hooks": hooks} if hooks else {}
            t0 = time.perf_counter()
            with using_sampler(self.pipe, sampler) as scheduler:
                sampler_name = type(scheduler).__name__
                # one generator per run: the same start noise (and DDPM step noise) for all three
                out = self.pipe(prompt="", num_inference_steps=chosen.steps, guidance_scale=chosen.guidance_scale,
                                width=params["width"], height=params["height"], output_type="np",
                                generator=torch.Generator("cpu").manual_seed(seed), **kwargs)
            dt = time.perf_counter() - t0
            image = to_pil(out.images)[0]
            images.append(image)
            top, p_top, p_target = classifier_reading(clf, out.images[0], target)
            judged = f" | {judge_reading(image)}" if self.embedded else ""
            rows.append(f"| **{name}** | {_class_name(clf, top)} ({p_top:.2f}) | {p_target:.2f}{judged} | {dt:.1f} s |")
        judge_head = (" | judge: colour, shape", "|---") if self.embedded else ("", "")
        if recommended:
            rec = chosen.classifier
            described = (f"{str(sampler['scheduler']).upper()} ({sampler_name}), {chosen.steps} steps, EluCD window "
                         f"{rec['start']:g}–{rec['stop']:g} (the embedded model's recommended settings, "
                         "guidekit.toy.RECOMMENDED_ELUCD; the naive run shares its window)")
        else:
            described = f"{sampler_name}, {chosen.steps} steps, the paper's defaults"
        summary = (f"Class **{_class_name(clf, target)}** (id {target}), classifier scale {scale:g}, seed {seed}, "
                   f"{described}, {params['width']}x{params['height']}, unconditional (empty prompt, "
                   f"guidance scale {chosen.guidance_scale:g}).\n\n"
                   f"| | classifier: top class (probability) | p(requested class){judge_head[0]} | time |\n"
                   f"|---|---|---{judge_head[1]}|---|\n" + "\n".join(rows) +
                   "\n\nThe same start noise for all three; the classifier reads the final images."
                   + (" The judge reads the toy world's shapes by their pixels." if self.embedded else ""))
        return images[0], images[1], images[2], summary


#----------------------------------------------------------------------------
# Long video (FreeNoise).

#: The Long video tab's default prompt schedule (one `FRAME: prompt` per line).
EXAMPLE_SCHEDULE = "0: a red circle on a blue background\n24: a yellow circle on a blue background"
#: Where the tab's seed starts. On the embedded video model, seed 0 is the worst of seeds 0-7 for the default
#: schedule (its FreeNoise video loses the shape for four frames); the other seven read 9/9 held frames there.
EXAMPLE_VIDEO_SEED = 1
#: Frames per second of the tab's videos.
VIDEO_FPS = 8
#: How the tab's videos are written (guidekit.video.save_video): lossless animated WebP.
VIDEO_SUFFIX = ".webp"
#: The tab's two videos: (title, guidekit.FreeNoise's `noise`): fresh noise after the first window (the windows'
#: fusion alone), then FreeNoise's rescheduling (the official block shuffle).
VIDEO_RUNS = (("Sliding windows, i.i.d. noise", "random"), ("FreeNoise", "shuffle"))
#: The tab's fusion-point choices: (label, guidekit.FreeNoise's `fusion`).
FUSION_CHOICES = (("each temporal attention (official code)", "attention"),
                  ("each transformer block (diffusers)", "block"))
_KEY_LINE = re.compile(r"\s*(\d+)\s*:(.*)", flags=re.DOTALL)
PROMPT_ACCEPTED = ("one prompt, or one `FRAME: prompt` per line (e.g. `0: a red circle`) with frames below the "
                   "frame count")


def parse_prompt_text(text, frames: int):
    """The Long video tab's prompt field: a plain prompt (str), or {frame: prompt} when every non-empty line is
    `FRAME: prompt` (one such line: its prompt, a str). Raises JobError naming the line at fault."""
    if not isinstance(text, str) or not text.strip():
        raise JobError(f"prompt: required; accepted: {PROMPT_ACCEPTED}")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    matches = [_KEY_LINE.fullmatch(line) for line in lines]
    if not any(matches):
        return " ".join(lines)
    schedule = {}
    for line, match in zip(lines, matches):
        if match is None or not match.group(2).strip():
            raise JobError(f"prompt: the line {line!r} is not `FRAME: prompt`; accepted: {PROMPT_ACCEPTED}")
        frame = int(match.group(1))
        if frame >= frames:
            raise JobError(f"prompt: frame {frame} ({line!r}) is not below the number of frames {frames}; accepted: "
                           f"frames from 0 to {frames - 1}")
        if frame in schedule:
            raise JobError(f"prompt: frame {frame} is given twice; accepted: one prompt per frame")
        schedule[frame] = match.group(2).strip()
    return next(iter(schedule.values())) if len(schedule) == 1 else dict(sorted(schedule.items()))


class VideoBackend:
    """The Long video tab's work: one video model, the same seed with plain sliding windows (i.i.d. noise) and
    with FreeNoise, each written as an animated WebP into a folder of its own (the last request's files only)."""

    def __init__(self, vpipe, limits: Limits = Limits(), embedded: bool = False):
        from .jobs import motion_limit

        self.pipe = vpipe
        self.limits = limits
        # the embedded video model: guidance scale 3 (its card's) and the toy world judge's reading of each video
        self.embedded = embedded
        self.max_length = motion_limit(vpipe) or 16
        self.factor = size_multiple(vpipe)
        self.default_size = int(vpipe.unet.config.sample_size) * vae_factor(vpipe)
        self._folder = tempfile.TemporaryDirectory(prefix="guidekit-demo-video-")
        self._count = 0

    def defaults(self):
        """The resolved defaults of a video request on this model (`guidekit.apps.defaults.resolve_defaults`)."""
        return resolve_defaults("video", pipe=self.pipe, embedded=True if self.embedded else None)

    @property
    def default_scale(self) -> float:
        """Where the guidance-scale slider starts: the model's default scale (the embedded model's, else 7.5)."""
        return self.defaults().guidance_scale

    def params(self, prompt, frames, context_length, context_stride, seed, guidance_scale, steps, size,
               fusion: str = "attention", motion_injection: bool = False) -> dict:
        """Validated, resolved parameters of the FreeNoise video (a video job's; messages name the field)."""
        from .jobs import resolve_video

        frames = _as_count(frames, "frames")
        self.limits.check_frames(frames)
        text = parse_prompt_text(prompt, frames)
        fusions = [value for _, value in FUSION_CHOICES]
        if fusion not in fusions:
            raise JobError(f"fusion: got {fusion!r}; accepted: {', '.join(fusions)}")
        if not isinstance(motion_injection, bool):
            raise JobError(f"motion injection: got {motion_injection!r}; accepted: true or false")
        if motion_injection and not isinstance(text, dict):
            raise JobError("motion injection: needs a prompt schedule (two or more `FRAME: prompt` lines; the last "
                           "prompt is the injected one); accepted: such a schedule, or motion injection off")
        raw = {"frames": frames, "seed": _as_int(seed, "seed") or 0, "steps": steps, "width": size, "height": size,
               "guidance_scale": guidance_scale, "format": VIDEO_SUFFIX[1:], "fps": VIDEO_FPS,
               "freenoise": {"context_length": _as_count(context_length, "context length"),
                             "context_stride": _as_count(context_stride, "context stride"), "fusion": fusion,
                             "motion_injection": True if motion_injection else None}}
        raw.update({"prompts": {str(k): v for k, v in text.items()}} if isinstance(text, dict) else {"prompt": text})
        job = parse_job(raw)
        self.limits.check(job.params)
        params = resolve_video(job.params, self.pipe)
        params["seed"] = job.seeds[0]
        return params

    def long_video(self, prompt, frames, context_length, context_stride, seed, guidance_scale, steps, size,
                   fusion: str = "attention", motion_injection: bool = False, progress=None):
        """(plain sliding-windows video, FreeNoise video, Markdown numbers): paths of two animated WebP files.
        `fusion` and `motion_injection` apply to both videos. `progress(share, desc)`, if given, is told after each
        denoising step."""
        params = self.params(prompt, frames, context_length, context_stride, seed, guidance_scale, steps, size,
                             fusion, motion_injection)
        self._clear()
        runs = [self._render(params, i, name, noise, progress) for i, (name, noise) in enumerate(VIDEO_RUNS)]
        return str(runs[0][0]), str(runs[1][0]), self._summary(params, [row for _, row in runs])

    def _render(self, params: dict, index: int, name: str, noise: str, progress) -> tuple[Path, str]:
        """One video of the pair with FreeNoise's `noise` mode: (its file, its row of the table)."""
        from .jobs import frame_change, generate_video, video_prompt

        def tell(step, steps):
            progress((index * steps + step) / (2 * steps), desc=f"{name}: step {step}/{steps}")

        run = {**params, "freenoise": {**params["freenoise"], "noise": noise}}
        t0 = time.perf_counter()
        frames = generate_video(self.pipe, run, params["seed"], callback=tell if progress is not None else None)
        dt = time.perf_counter() - t0
        mean, largest = frame_change(frames)
        path = self._save(frames, "freenoise" if noise == "shuffle" else "plain")
        judged = f" | {video_judge_reading(frames, video_prompt(params))}" if self._judged(params) else ""
        return path, f"| **{name}** | {mean:.2f} | {largest:.2f}{judged} | {dt:.1f} s |"

    def _judged(self, params: dict) -> bool:
        """Whether the judge reads the videos: the embedded model at its native frame size."""
        return self.embedded and params["width"] == params["height"] == self.default_size

    def _summary(self, params: dict, rows: list[str]) -> str:
        fn = params["freenoise"]
        keys = f", {len(params['prompts'])} key prompts" if params.get("prompts") else ""
        point = "each temporal attention" if fn["fusion"] == "attention" else "each transformer block"
        windowed = (f"windows of {fn['context_length']} frames every {fn['context_stride']}, fused at {point}"
                    if params["frames"] > fn["context_length"] else
                    f"one window (frames <= context length {fn['context_length']}: both are the plain model)")
        injected = (", motion injection (official steps: the down and mid blocks read the last prompt)"
                    if fn["motion_injection"] is not None else "")
        judged = self._judged(params)
        head = " | judge: frames read as their prompt | teleports" if judged else ""
        return (f"{params['frames']} frames, {params['width']}x{params['height']}, {params['steps']} steps, guidance "
                f"scale {params['guidance_scale']:g}, seed {params['seed']}{keys}; {windowed}{injected}, "
                f"{VIDEO_FPS} fps.\n\n"
                f"| | frame-to-frame change (mean) | largest change{head} | time |\n"
                f"|---|---|---{'|---|---' if judged else ''}|---|\n" + "\n".join(rows) +
                "\n\nChange: mean absolute difference of consecutive frames' 8-bit pixel values (0 to 255); jumps "
                "at window seams raise the largest one. Both videos have the same start noise in the first window; "
                "after it, the left one draws fresh noise, FreeNoise reschedules the first window's noise."
                + (" " + JUDGE_VIDEO_NOTE if judged else ""))

    def _save(self, frames, stem: str) -> Path:
        from guidekit.video import save_video

        self._count += 1
        return save_video(frames, Path(self._folder.name) / f"{stem}-{self._count}{VIDEO_SUFFIX}", fps=VIDEO_FPS)

    def _clear(self) -> None:
        """Delete the previous request's videos (the page has its own copies by then)."""
        for old in Path(self._folder.name).glob(f"*{VIDEO_SUFFIX}"):
            old.unlink(missing_ok=True)


#: What the judge columns of the Long video table mean (embedded video model only).
JUDGE_VIDEO_NOTE = ("Judge: the toy world judge reads every frame; frames read as their prompt counts the frames held "
                    "on one prompt (not those blending two) whose colour, shape, background and texture it reads as "
                    "asked; a teleport is a frame-to-frame jump of the shape's centre above 3x the video's median "
                    "step and 2 px, or a frame without a shape (as in `guidekit eval-video`).")


def video_judge_reading(frames, prompt) -> str:
    """The toy world judge's reading of one video: "frames read as their prompt | teleports" (table cells).

    `prompt`: one caption, or a {frame: caption} schedule; only the frames held on one caption are scored (a blend
    of two captions has no one right answer). "–" where a caption is outside the toy world's grammar."""
    from guidekit.toy.video_measures import frames_correct, frames_to_uint8, read_video, teleports
    from guidekit.toy.world import parse_caption
    from guidekit.video import interpolate_prompt_schedule

    video = frames_to_uint8(frames)
    reading = read_video(video)
    schedule = interpolate_prompt_schedule(prompt if isinstance(prompt, dict) else {0: prompt}, len(video))
    held = [(i, blend.key_a) for i, blend in enumerate(schedule) if blend.t == 0.0 or blend.key_a == blend.key_b]
    try:
        for caption in {caption for _, caption in held}:
            parse_caption(caption)
    except ValueError:
        read = "–"
    else:
        correct = frames_correct([reading.judgements[i] for i, _ in held], [caption for _, caption in held])
        read = f"{int(correct.sum())}/{len(held)}"
    return f"{read} | {teleports(reading.centroids)}"


def _as_count(value, name: str) -> int:
    """A slider's whole number (Gradio may send 8.0) as an int; JobError for anything else."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise JobError(f"{name}: expected an integer >= 1, got {value!r}")
    return value


def video_backend(pipe, video_model: Optional[str], limits: Limits) -> tuple[Optional[VideoBackend], str]:
    """The Long video tab's backend and, when there is none, the message the tab shows instead.

    `video_model`: an AnimateDiff pipeline folder or a MotionAdapter folder (paired with `pipe`); None: the
    embedded video model, when installed. A `video_model` that cannot be loaded raises JobError; a missing or
    broken embedded one is a message."""
    from .jobs import GET_VIDEO_MODEL, embedded_video_model_path, load_video_pipeline

    if video_model is not None:
        return VideoBackend(load_video_pipeline(video_model, pipe, device=pipe.device, dtype=pipe.dtype), limits), ""
    path = embedded_video_model_path()
    if path is None:
        return None, ("**No video model here**: the embedded video model is not installed. To use this tab, restart "
                      f"the demo and {GET_VIDEO_MODEL}.")
    try:
        vpipe = load_video_pipeline(path, pipe, device=pipe.device, dtype=pipe.dtype)
    except JobError as e:
        log.exception("the embedded video model cannot be loaded")
        return None, f"**No video model here**: the embedded video model cannot be loaded ({e})."
    return VideoBackend(vpipe, limits, embedded=True), ""


GET_CLASSIFIER = ("reinstall guidekit (its package ships it in guidekit/assets), or give the folder of any "
                  "transformers image classifier (config.json, weights, preprocessor_config.json)")


def embedded_classifier_path() -> Optional[Path]:
    """The embedded classifier's folder, or None when this guidekit has none or it is not installed."""
    try:
        from guidekit.toy import default_classifier_path

        path = Path(default_classifier_path())
    except (ImportError, AttributeError, OSError):  # FileNotFoundError: not installed
        return None
    return path if (path / "config.json").is_file() else None


def classifier_reading(clf, image, target: int) -> tuple[int, float, float]:
    """(top class id, its probability, probability of `target`) of one float image (H, W, 3) in [0, 1]."""
    import numpy as np
    import torch

    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).permute(2, 0, 1)[None] * 2.0 - 1.0
    with torch.no_grad():
        probs = clf.eval()(x).float().softmax(-1)[0]
    top = int(probs.argmax())
    return top, float(probs[top]), float(probs[target])


def judge_reading(image) -> str:
    """The toy world judge's reading of one image: shape colour and shape ("no shape" when it finds none)."""
    from guidekit.toy.judge import judge

    j = judge(image)
    return "no shape" if j.colour is None else f"{j.colour}, {j.shape}"


def _class_name(clf, index: int) -> str:
    names = clf.id2label or {}
    return names.get(index, str(index))


def classifier_tab_available(pipe) -> bool:
    """Whether the Classifier guidance tab runs on `pipe`: SD 1.x/2.x pipelines only."""
    try:
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

        from guidekit import EluCD  # noqa: F401
    except ImportError:
        return False
    return isinstance(pipe, StableDiffusionPipeline) and not isinstance(pipe, StableDiffusionXLPipeline)


def _as_int(value, name):
    if value is None or value == "":
        return None
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise JobError(f"{name}: expected an integer >= 0, got {value!r}")


SWEEP_HEADERS = ["guidance scale", "CFG saturation", "CFG clipped", "APG saturation", "APG clipped"]


def default_sweep_scales(limits: Limits) -> str:
    """The Sweep tab's starting list: `SWEEP_SCALES` within this demo's limits."""
    values = [v for v in SWEEP_SCALES if v <= limits.max_scale][-limits.max_sweep:]
    return ", ".join(_num(v) for v in values)


def parse_scales(text, limits: Limits) -> list[float]:
    """'1, 3, 7.5' -> [1.0, 3.0, 7.5], each in [0, max_scale], at most `max_sweep` of them."""
    accepted = f"a comma-separated list of 1 to {limits.max_sweep} numbers in [0, {limits.max_scale}]"
    if isinstance(text, (int, float)):
        text = str(text)
    if not isinstance(text, str) or not text.strip():
        raise JobError(f"guidance scales: expected {accepted}, got {text!r}")
    try:
        values = [float(v) for v in text.replace(";", ",").split(",") if v.strip()]
    except ValueError:
        raise JobError(f"guidance scales: expected {accepted}, got {text!r}") from None
    if not 1 <= len(values) <= limits.max_sweep or any(not 0 <= v <= limits.max_scale for v in values):
        raise JobError(f"guidance scales: expected {accepted}, got {text!r}")
    return values


def compose_grid(cells: dict, scales: list[float]):
    """One labelled picture: rows CFG / APG, a column per scale, saturation and clipped fraction under each
    image. `cells[name, scale]` is (image, saturation, clipped fraction)."""
    from PIL import Image, ImageDraw

    from PIL import ImageFont

    first = next(iter(cells.values()))[0]
    w, h = first.size
    tile = max(128, min(256, w))  # small models get upscaled so the labels stay readable
    th = round(tile * h / w)
    gap, left, top, cap = 6, 48, 24, 40
    try:
        font = ImageFont.load_default(size=15)
    except TypeError:  # Pillow < 10.1
        font = ImageFont.load_default()
    grid = Image.new("RGB", (left + (tile + gap) * len(scales), top + 2 * (th + cap)), "white")
    draw = ImageDraw.Draw(grid)
    for c, scale in enumerate(scales):
        x = left + c * (tile + gap)
        draw.text((x + 4, 4), f"w = {scale:g}", fill="black", font=font)
        for r, name in enumerate(("CFG", "APG")):
            img, sat, clipped = cells[name, scale]
            y = top + r * (th + cap)
            grid.paste(img.resize((tile, th), Image.NEAREST), (x, y))
            draw.text((x + 4, y + th + 2), f"saturation {sat:.2f}", fill="black", font=font)
            draw.text((x + 4, y + th + 20), f"clipped {clipped:.4f}", fill="black", font=font)
    for r, name in enumerate(("CFG", "APG")):
        draw.text((6, top + r * (th + cap) + th // 2 - 8), name, fill="black", font=font)
    return grid


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


def uam_available() -> bool:
    try:
        from guidekit.pipelines import UAMStableDiffusionPipeline  # noqa: F401
    except ImportError:
        return False
    return True


def styleid_available(pipe) -> bool:
    """Whether the Style tab can run on `pipe`: StyleID is implemented for SD 1.x/2.x pipelines only."""
    try:
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

        from guidekit.pipelines import StyleIDStableDiffusionPipeline  # noqa: F401
    except ImportError:
        return False
    return isinstance(pipe, StableDiffusionPipeline) and not isinstance(pipe, StableDiffusionXLPipeline)


# Example style transfers: (content image, style image in assets/examples, what the style image shows).
EXAMPLE_STYLES = [
    ("yellow-circle-on-red.png", "green-triangle-on-yellow.png", "a green triangle on a yellow background"),
    ("blue-square-on-magenta.png", "yellow-circle-on-red.png", "a yellow circle on a red background"),
    ("green-triangle-on-yellow.png", "blue-square-on-magenta.png", "a blue square on a magenta background"),
]


def example_styles() -> list[list[str]]:
    """Example rows for the Style tab: content and style images shipped in assets/examples, with the style
    prompt (what the style image shows)."""
    folder = ASSETS / "examples"
    return [[str(folder / c), str(folder / s), p] for c, s, p in EXAMPLE_STYLES
            if (folder / c).is_file() and (folder / s).is_file()]


# Example edits: (image in assets/examples, source prompt, target prompt).
EXAMPLE_EDITS = [
    ("yellow-circle-on-red.png", "a yellow circle on a red background", "a yellow square on a red background"),
    ("green-triangle-on-yellow.png", "a green triangle on a yellow background", "a blue triangle on a yellow background"),
    ("blue-square-on-magenta.png", "a blue square on a magenta background", "a blue square on a cyan background"),
]


def example_edits() -> list[list[str]]:
    """Example rows for the Reconstruct / Edit tab: images shipped in assets/examples (the only files the
    demo serves besides its own outputs) with their prompts."""
    folder = ASSETS / "examples"
    return [[str(folder / name), src, tgt] for name, src, tgt in EXAMPLE_EDITS if (folder / name).is_file()]


#----------------------------------------------------------------------------
# The page.

# Small models make small images: show them large, with crisp pixels.
OUTPUT_IMAGE = dict(height=320, elem_classes=["gk-out"])
CSS = ".gk-out img { width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated; }"

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


def _sampling_controls(backend: DemoBackend, tab: str):
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


def _apg_controls(backend: DemoBackend, tab: str):
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


def build_demo(pipe, model_name: str = "", limits: Limits = Limits(), embedded: Optional[bool] = None,
               video_model: Optional[str] = None):
    """The Gradio Blocks app around one loaded pipeline. `embedded`: whether it is the embedded toy model
    (None: from `model_name` or the pipeline's folder); it sets where the APG sliders start.

    `video_model`: the Long video tab's model, an AnimateDiff pipeline folder or a MotionAdapter folder (paired
    with `pipe`); None: the embedded video model (without it, the tab says how to get one). A `video_model`
    that cannot be loaded raises JobError."""
    import gradio as gr

    pipe.set_progress_bar_config(disable=True)
    backend = DemoBackend(pipe, model_name, limits, embedded=embedded)
    video, video_note = video_backend(pipe, video_model, limits)
    scale_param = COMMON["guidance_scale"]
    queue = dict(concurrency_limit=1, concurrency_id="model")  # one shared model: one request at a time

    with gr.Blocks(title="guidekit demo", analytics_enabled=False) as demo:
        gr.Markdown(f"# guidekit\nTraining-free guidance for diffusers. Model: {_model_label(model_name)}.")
        with gr.Tab("Generate"):
            gr.Markdown("The same seed with classifier-free guidance (CFG) and adaptive projected guidance "
                        "(APG). At high guidance scales CFG tends to oversaturate; APG is designed not to.")
            with gr.Row():
                with gr.Column(scale=2):
                    prompt = gr.Textbox(label="Prompt", value=EXAMPLE_PROMPTS[0], lines=2, elem_id="gen-prompt")
                    negative, seed, steps, width, height = _sampling_controls(backend, "gen")
                    scale = Slider(1.0, limits.max_scale, value=COMPARE_SCALE, step=0.5, label="Guidance scale w",
                                   info=scale_param.help.split(" Default: ")[0] + f" Starts at {COMPARE_SCALE:g}, "
                                   "where the two differ; the model's default (guidekit generate's) is "
                                   f"{backend.defaults().guidance_scale:g}.", elem_id="gen-scale")
                    eta, norm, momentum = _apg_controls(backend, "gen")
                    button = gr.Button("Generate", variant="primary", elem_id="gen-button")
                with gr.Column(scale=3):
                    with gr.Row():
                        cfg_img = gr.Image(label="CFG", type="pil", format="png", interactive=False,
                                           elem_id="gen-cfg", **OUTPUT_IMAGE)
                        apg_img = gr.Image(label="APG", type="pil", format="png", interactive=False,
                                           elem_id="gen-apg", **OUTPUT_IMAGE)
                    summary = gr.Markdown(elem_id="gen-summary")
            gr.Examples([[p] for p in EXAMPLE_PROMPTS], inputs=[prompt], label="Prompts")
            button.click(_ui_errors(backend.compare),
                         [prompt, negative, seed, steps, width, height, scale, eta, norm, momentum],
                         [cfg_img, apg_img, summary], api_name="generate", **queue)

        with gr.Tab("Sweep"):
            gr.Markdown("One prompt and seed over several guidance scales: a row for CFG, a row for APG, "
                        "with the mean saturation and the clipped fraction (8-bit channel values at 0 or 255) "
                        "under each image. The default scales reach w = 20: high scales are where CFG "
                        "degrades and APG is meant to help.")
            with gr.Row():
                with gr.Column(scale=2):
                    s_prompt = gr.Textbox(label="Prompt", value=EXAMPLE_PROMPTS[0], lines=2, elem_id="sweep-prompt")
                    s_neg, s_seed, s_steps, s_width, s_height = _sampling_controls(backend, "sweep")
                    s_scales = gr.Textbox(label="Guidance scales", value=default_sweep_scales(limits),
                                          info=f"Comma-separated, up to {limits.max_sweep} values in "
                                               f"[0, {limits.max_scale}].", elem_id="sweep-scales")
                    s_eta, s_norm, s_momentum = _apg_controls(backend, "sweep")
                    s_button = gr.Button("Run sweep", variant="primary", elem_id="sweep-button")
                with gr.Column(scale=3):
                    grid = gr.Image(label="CFG (top) vs APG (bottom)", type="pil", format="png",
                                    interactive=False, elem_id="sweep-grid", elem_classes=["gk-out"])
                    table = gr.Dataframe(headers=SWEEP_HEADERS,
                                         interactive=False, elem_id="sweep-table")
            s_button.click(_ui_errors(backend.sweep),
                           [s_prompt, s_neg, s_seed, s_steps, s_width, s_height, s_scales, s_eta, s_norm, s_momentum],
                           [grid, table], api_name="sweep", **queue)

        if uam_available():
            _uam_tab(backend, queue)
        if styleid_available(pipe):
            _style_tab(backend, queue)
        if classifier_tab_available(pipe):
            _classifier_tab(backend, queue)
        _video_tab(video, video_note, queue)
    demo.queue(max_size=limits.queue_size)
    return demo


def _uam_tab(backend: DemoBackend, queue: dict):
    import gradio as gr

    from . import uam_image

    lim, f = backend.limits, backend.factor
    with gr.Tab("Reconstruct / Edit"):
        gr.Markdown("Uniform attention maps (UAM): invert a real image, rebuild it almost exactly, and edit it "
                    "with a prompt; the mask shows where the edit acted.")
        with gr.Row():
            with gr.Column(scale=2):
                image = gr.Image(label="Image", type="pil", sources=["upload"], elem_id="uam-image", height=256)
                edits = example_edits()
                source = gr.Textbox(label="Source prompt", info="Describes the image as it is.",
                                    value=edits[0][1] if edits else "")
                target = gr.Textbox(label="Target prompt", info="Describes the image after the edit.",
                                    value=edits[0][2] if edits else "")
                if edits:
                    gr.Examples(edits, inputs=[image, source, target], label="Examples")
                seed = Number(label="Seed", value=0, precision=0, minimum=0, maximum=2**31 - 1)
                steps = Slider(1, lim.max_steps, value=min(uam_image.DEFAULT_STEPS, lim.max_steps), step=1,
                               label="Steps", info="DDIM steps of the inversion and of the rebuild (UAM paper: 50).")
                size = Slider(f * 4 if f * 4 <= backend.default_size else f, lim.max_size,
                                 value=min(backend.default_size, lim.max_size), step=f, label="Size",
                                 info=f"The image is resized to this square size (a multiple of {f}).")
                scale = Slider(1.0, lim.max_scale, value=uam_image.DEFAULT_GUIDANCE, step=0.5,
                               label="Edit guidance scale",
                               info="CFG scale of the edit (guidekit edit's default); the reconstruction uses 1 (no "
                                    "guidance).")
                button = gr.Button("Reconstruct and edit", variant="primary", elem_id="uam-button")
            with gr.Column(scale=3):
                with gr.Row():
                    outs = [gr.Image(label=name, type="pil", format="png", interactive=False, **OUTPUT_IMAGE)
                            for name in ("Original", "Reconstruction", "Edit", "Mask")]
                metrics = gr.Markdown()
        button.click(_ui_errors(backend.reconstruct_edit), [image, source, target, seed, steps, size, scale],
                     [*outs, metrics], api_name="reconstruct_edit", **queue)


def _style_tab(backend: DemoBackend, queue: dict):
    import gradio as gr
    from PIL import Image

    from .style import DEFAULT_ALPHA, DEFAULT_GAMMA, DEFAULT_TEMPERATURE

    lim, f = backend.limits, backend.factor
    with gr.Tab("Style"):
        gr.Markdown("StyleID style transfer (no extra weights) with and without StyleSSP's start point: the "
                    "content's layout in the style image's look. The numbers: how much of the content's layout "
                    "each keeps (SSIM, PSNR) and how close its colours are to the style image's.")
        examples = example_styles()
        with gr.Row():
            with gr.Column(scale=2):
                with gr.Row():
                    content = gr.Image(label="Content", type="pil", sources=["upload"], elem_id="style-content",
                                       height=200, value=Image.open(examples[0][0]) if examples else None)
                    style = gr.Image(label="Style", type="pil", sources=["upload"], elem_id="style-style",
                                     height=200, value=Image.open(examples[0][1]) if examples else None)
                prompt = gr.Textbox(label="Style prompt", value=examples[0][2] if examples else "",
                                    info="What the style image shows: the negative of StyleSSP's inversion "
                                         "guidance (scale 0.5, the official w_inv 1.5). Empty: frequency start "
                                         "point only.", elem_id="style-prompt")
                if examples:
                    gr.Examples(examples, inputs=[content, style, prompt], label="Examples")
                seed = Number(label="Seed", value=0, precision=0, minimum=0, maximum=2**31 - 1,
                              info="Seed of StyleSSP's start-point noise.", elem_id="style-seed")
                steps = Slider(1, lim.max_steps, value=min(25, lim.max_steps), step=1, label="Steps",
                               info="DDIM steps of each inversion and of the sampling (official StyleID code: 50; "
                                    f"this demo allows up to {lim.max_steps}).", elem_id="style-steps")
                size = Slider(f * 4 if f * 4 <= backend.default_size else f, lim.max_size,
                              value=min(backend.default_size, lim.max_size), step=f, label="Size",
                              info=f"Both images are resized to this square size (a multiple of {f}).",
                              elem_id="style-size")
                gamma = Slider(0.0, 1.0, value=DEFAULT_GAMMA, step=0.05, label=f"gamma, default {DEFAULT_GAMMA:g}",
                               info="StyleID query preservation; larger keeps more content. Default: the paper's "
                                    "0.75 (high style fidelity: 0.3).", elem_id="style-gamma")
                temperature = Slider(0.1, 10.0, value=DEFAULT_TEMPERATURE, step=0.1,
                                     label=f"temperature T, default {DEFAULT_TEMPERATURE:g}",
                                     info="StyleID attention temperature; > 1 sharpens the injected attention. "
                                          "Default: the paper's 1.5.", elem_id="style-temperature")
                alpha = Slider(0.0, 1.0, value=DEFAULT_ALPHA, step=0.05, label=f"alpha, default {DEFAULT_ALPHA:g}",
                               info="StyleSSP factor on the lowest and highest frequencies of the start point; 1 "
                                    "turns the frequency step off. Default: StyleSSP's official 0.7.",
                               elem_id="style-alpha")
                button = gr.Button("Transfer", variant="primary", elem_id="style-button")
            with gr.Column(scale=3):
                with gr.Row():
                    plain = gr.Image(label="StyleID", type="pil", format="png", interactive=False,
                                     elem_id="style-styleid", **OUTPUT_IMAGE)
                    ssp = gr.Image(label="StyleID + StyleSSP", type="pil", format="png", interactive=False,
                                   elem_id="style-stylessp", **OUTPUT_IMAGE)
                summary = gr.Markdown(elem_id="style-summary")
        button.click(_ui_errors(backend.style), [content, style, prompt, seed, steps, size, gamma, temperature, alpha],
                     [plain, ssp, summary], api_name="style", **queue)


def _classifier_tab(backend: DemoBackend, queue: dict):
    import gradio as gr

    lim = backend.limits
    default = embedded_classifier_path()
    choices: list[str] = []
    if default is not None:
        try:
            choices = backend.classifier_labels("")
        except ValueError:  # a broken install: the textbox still takes another folder
            log.exception("the embedded classifier cannot be loaded")
            default = None
    # The sliders start at the request's defaults: on the embedded model with the embedded classifier, its
    # recommended settings and sampler
    resolved = backend.defaults("classifier", prompt="", classifier=str(default) if default is not None else "")
    default_scale = float(resolved.classifier["scale"])
    default_steps = min(resolved.steps, lim.max_steps)
    if resolved.classifier_recommended:
        scale_origin = ("the embedded model's recommended scale with the embedded classifier "
                        "(guidekit.toy.RECOMMENDED_ELUCD).")
        kind = str(resolved.scheduler).upper()
        steps_origin = (f" Default: the recommended sampler's steps ({kind}, guidekit.toy.RECOMMENDED_ELUCD_SAMPLER), "
                        "which the embedded classifier's three runs use.")
    else:
        scale_origin, steps_origin = "the official classifier_scale of the EluCD DDPM script.", ""
    with gr.Tab("Classifier guidance"):
        gr.Markdown("Steer an unconditional image (empty prompt, guidance scale 1, as in the EluCD paper) toward "
                    "a class of an off-the-shelf image classifier: no guidance, naive classifier guidance and EluCD "
                    "(calibrated: joint and marginal temperatures, sine-boosted schedule, and Softplus-smoothed "
                    "ReLUs where its settings ask for them) side by side from the same start noise, each with the "
                    "classifier's reading" + (" and the toy world judge's reading (colour, shape)." if backend.embedded
                                               else "."))
        if default is None:
            gr.Markdown("No embedded classifier here: give the folder of a transformers image classifier below "
                        "(press Enter to load its classes). To get the embedded one: " + GET_CLASSIFIER + ".")
        with gr.Row():
            with gr.Column(scale=2):
                path = gr.Textbox(label="Classifier", value="", placeholder=str(default) if default else
                                  "folder of a transformers image classifier",
                                  info="A local folder of a transformers image classifier with its "
                                       "preprocessor_config.json. Empty: the embedded classifier"
                                       + ("." if default else " (not installed here).") +
                                       " Press Enter to load its classes.", elem_id="clf-path")
                label = gr.Dropdown(choices=choices, value=choices[0] if choices else None, label="Class",
                                    allow_custom_value=True, elem_id="clf-label",
                                    info="The class to steer toward (a name from the classifier's id2label, or an id).")
                scale = Slider(0.0, MAX_CLASSIFIER_SCALE, value=default_scale, step=0.5,
                               label=f"Classifier scale s, default {default_scale:g}",
                               info="Strength of both corrections; 0 gives the unguided image. Default: "
                                    + scale_origin, elem_id="clf-scale")
                seed = Number(label="Seed", value=0, precision=0, minimum=0, maximum=2**31 - 1,
                              info="Same seed, same start noise for all three images.", elem_id="clf-seed")
                steps = Slider(1, lim.max_steps, value=default_steps, step=1, label="Steps",
                               info=f"Denoising steps (this demo allows up to {lim.max_steps})." + steps_origin,
                               elem_id="clf-steps")
                button = gr.Button("Generate", variant="primary", elem_id="clf-button")
            with gr.Column(scale=3):
                with gr.Row():
                    outs = [gr.Image(label=name, type="pil", format="png", interactive=False, elem_id=f"clf-{key}",
                                     **OUTPUT_IMAGE)
                            for key, name in (("unguided", "Unguided"), ("naive", "Naive classifier guidance"),
                                              ("elucd", "EluCD"))]
                summary = gr.Markdown(elem_id="clf-summary")

        def load_classes(folder, current):
            names = backend.classifier_labels(folder)
            # leaving the folder box reloads the classes: a class the user chose stays if this classifier has it
            keep = current in names or isinstance(current, str) and current.strip().isdigit() and \
                int(current) < len(names)
            return gr.Dropdown(choices=names, value=current if keep else names[0] if names else None)

        for event in (path.submit, path.blur):
            event(_ui_errors(load_classes), [path, label], [label], api_name=False, **queue)
        button.click(_ui_errors(backend.classifier_guidance), [path, label, scale, seed, steps], [*outs, summary],
                     api_name="classifier_guidance", **queue)


def _video_tab(video: Optional[VideoBackend], note: str, queue: dict):
    import gradio as gr

    with gr.Tab("Long video"):
        gr.Markdown("FreeNoise: videos longer than the motion model was trained on. The temporal layers run on "
                    "overlapping windows whose outputs are fused; on the right, FreeNoise also reschedules the start "
                    "noise (shuffled copies of the first window's), on the left each frame draws fresh noise. Same "
                    "seed, same settings; the numbers say how much the picture changes from frame to frame.")
        if video is None:
            gr.Markdown(note, elem_id="video-missing")
            return
        lim, f = video.limits, video.factor
        with gr.Row():
            with gr.Column(scale=2):
                prompt = gr.Textbox(label="Prompt", value=EXAMPLE_SCHEDULE, lines=3, elem_id="video-prompt",
                                    info="One prompt, or a prompt schedule: one `FRAME: prompt` per line (frames "
                                         "between two keys blend their prompts).")
                frames = Slider(1, lim.max_frames, value=min(32, lim.max_frames), step=1, label="Frames",
                                info=f"Length of the video (this demo allows up to {lim.max_frames}).",
                                elem_id="video-frames")
                # the window of guidekit video and of a batch video job, within the motion model's length
                window = min(FREENOISE_DEFAULTS["context_length"], video.max_length)
                length = Slider(1, video.max_length, value=window, step=1, label="Context length W",
                                info=f"Frames per window, at most the motion model's training length "
                                     f"({video.max_length}). Default: {window} (official: 16).", elem_id="video-length")
                stride = Slider(1, video.max_length, value=min(FREENOISE_DEFAULTS["context_stride"], window), step=1,
                                label="Context stride S", info="Frames between two window starts, at most W (official: "
                                                               "4).", elem_id="video-stride")
                seed = Number(label="Seed", value=EXAMPLE_VIDEO_SEED, precision=0, minimum=0, maximum=2**31 - 1,
                              info="Same seed for both videos.", elem_id="video-seed")
                scale = Slider(0.0, lim.max_scale, value=min(video.default_scale, lim.max_scale), step=0.5,
                               label="Guidance scale w",
                               info=f"CFG scale; 1 turns guidance off. Default: {video.default_scale:g}, the model's "
                                    "(guidekit video's and a batch video job's).",
                               elem_id="video-scale")
                steps = Slider(1, lim.max_steps, value=min(video.defaults().steps, lim.max_steps), step=1, label="Steps",
                               info=f"Denoising steps (this demo allows up to {lim.max_steps}).", elem_id="video-steps")
                low = f * 4 if f * 4 <= video.default_size else f
                size = Slider(low, max(low, lim.max_size), value=min(video.default_size, lim.max_size), step=f,
                              label="Size", info=f"Square frames, a multiple of {f}; the model's native size is "
                                                 f"{video.default_size}.", elem_id="video-size")
                fusion = gr.Radio(choices=list(FUSION_CHOICES), value=FREENOISE_DEFAULTS["fusion"], label="Fusion point",
                                  info="Where the windows' outputs are fused, in both videos.", elem_id="video-fusion")
                injection = gr.Checkbox(value=False, label="Motion injection",
                                        info="With a prompt schedule: at the first and last denoising steps "
                                             "(official: steps 0-4 and 16-49 of 50) the down- and mid-block "
                                             "cross-attention read the last prompt, in both videos.",
                                        elem_id="video-injection")
                button = gr.Button("Render both", variant="primary", elem_id="video-button")
            with gr.Column(scale=3):
                with gr.Row():
                    plain = gr.Image(label="Sliding windows, i.i.d. noise", type="filepath", interactive=False,
                                     elem_id="video-plain", **OUTPUT_IMAGE)
                    freenoise = gr.Image(label="FreeNoise", type="filepath", interactive=False,
                                         elem_id="video-freenoise", **OUTPUT_IMAGE)
                summary = gr.Markdown(elem_id="video-summary")

        def render(prompt, frames, length, stride, seed, scale, steps, size, fusion="attention", injection=False,
                   progress=gr.Progress()):
            return video.long_video(prompt, frames, length, stride, seed, scale, steps, size, fusion, injection,
                                    progress=progress)

        button.click(_ui_errors(render), [prompt, frames, length, stride, seed, scale, steps, size, fusion, injection],
                     [plain, freenoise, summary], api_name="long_video", **queue)


def launch(demo, host: str = "127.0.0.1", port: Optional[int] = None, **kwargs):
    """Launch with the demo's file policy: only the shipped assets besides Gradio's own cache."""
    return demo.launch(server_name=host, server_port=port, show_error=True, allowed_paths=[str(ASSETS / "examples")],
                       max_file_size="20mb", footer_links=["api"], css=CSS, **kwargs)


#----------------------------------------------------------------------------
# Command line.

@click.command(context_settings={"show_default": True, "help_option_names": ["-h", "--help"]})
@click.option("--model", metavar="ID_OR_PATH", default=None,
              help="Hub id or local folder of a Stable Diffusion 1.x/2.x, SDXL, SD3, Flux or Qwen-Image model (the "
                   "family is read from its model_index.json; SD3, Flux and Qwen-Image run the Generate and Sweep "
                   "tabs); default: the embedded toy model.")
@click.option("--host", default="127.0.0.1", metavar="ADDR", help="Address to listen on (0.0.0.0: every interface).")
@click.option("--port", default=7860, metavar="INT", type=click.IntRange(1, 65535), help="Port to listen on.")
@click.option("--max-steps", default=Limits.max_steps, metavar="INT", type=click.IntRange(1, 1000),
              help="Most denoising steps one request may ask for (the default leaves room for the embedded "
                   "model's recommended EluCD sampler, guidekit.toy.RECOMMENDED_ELUCD_SAMPLER).")
@click.option("--max-size", default=Limits.max_size, metavar="INT", type=click.IntRange(8, MAX_IMAGE_SIDE),
              help="Largest width/height one request may ask for, in pixels (sizes that cannot be decoded in "
                   "the free memory are refused too).")
@click.option("--max-frames", default=Limits.max_frames, metavar="INT", type=click.IntRange(1, 1024),
              help="Most frames one Long video request may ask for.")
@click.option("--video-model", metavar="DIR", default=None,
              help="Long video tab: a local AnimateDiff pipeline folder, or a MotionAdapter folder paired with "
                   "--model; default: the embedded video model.")
@click.option("--device", default=None, metavar="DEVICE",
              help="Torch device, e.g. cuda or cpu; default: cuda when available, else cpu.")
def demo(model, host, port, max_steps, max_size, max_frames, video_model, device):
    """Start the web demo: CFG vs APG, a guidance-scale sweep, UAM reconstruct/edit, StyleID style transfer,
    classifier guidance (naive vs EluCD) and long videos (sliding windows vs FreeNoise).

    \b
    Examples:
      guidekit demo
      guidekit demo --model runwayml/stable-diffusion-v1-5 --host 0.0.0.0 --port 7860
    """
    from .jobs import load_pipeline

    import torch

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    pipe, name = load_pipeline(model, device=device, dtype=torch.float16 if device.type == "cuda" else None)
    pipe.set_progress_bar_config(disable=True)
    try:
        app = build_demo(pipe, name, Limits(max_steps=max_steps, max_size=max_size, max_frames=max_frames),
                         video_model=video_model)
    except JobError as e:
        raise click.BadParameter(str(e).removeprefix("--video-model: "), param_hint="'--video-model'") from None
    launch(app, host=host, port=port)


if __name__ == "__main__":
    demo()
