"""Video jobs (AnimateDiff, with FreeNoise for videos longer than the motion model's training length): a job with
`frames` writes one animated file per seed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from guidekit.checks import check_image_memory, check_image_size

from .defaults import FREENOISE_DEFAULTS, ran_settings
from .jobs_classifier import CLASSIFIER
from .jobs_image import GUIDANCE, _parse_method, apply_defaults, job_defaults
from .jobs_schema import JobError, Param, _json_cell
from .models import default_size, size_multiple


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
                decode_chunk_size=DECODE_CHUNK,
                callback_on_step_end=step_end if callback is not None else None)
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
