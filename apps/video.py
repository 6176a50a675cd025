"""`guidekit video`: an AnimateDiff video from a prompt (or a prompt per key frame), longer than the motion
model's training length with FreeNoise, saved as an animated GIF or WebP.

Examples:
    guidekit video "a red circle on a blue background" --frames 64 --out circle.gif   # the embedded video model
    guidekit video "a red ball rolling" --model SD15_DIR --motion-adapter ADAPTER_DIR --frames 64 --out ball.gif
    guidekit video --prompt 0:"a red circle" --prompt 40:"a blue circle" --model SD15_DIR \\
        --motion-adapter ADAPTER_DIR --frames 64 --motion-injection --apg --out travel.webp
    guidekit video "a red ball rolling" --model WAN_DIR --frames 33 --apg --out ball.webp   # GuidedWanPipeline
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Optional

import click

from .cli import FiniteFloatRange, ImageSize, check_size_option
from .defaults import DEFAULT_STEPS, FREENOISE_DEFAULTS, STOCK_SCALE, resolve_defaults

#: Defaults of guidekit.FreeNoise's window (the official W = 16, S = 4; `guidekit.apps.defaults.FREENOISE_DEFAULTS`,
#: plain numbers, so `--help` imports no torch).
DEFAULT_CONTEXT_LENGTH = FREENOISE_DEFAULTS["context_length"]
DEFAULT_CONTEXT_STRIDE = FREENOISE_DEFAULTS["context_stride"]
#: Frames decoded per VAE call (GuidedAnimateDiffPipeline's decode_chunk_size default).
DECODE_CHUNK = 16


class VideoError(click.ClickException):
    """A video input that cannot be used, with what is accepted."""


class PromptSpec(click.ParamType):
    """`FRAME:TEXT` -> (frame, text): the prompt from key frame FRAME on (blended towards the next key)."""

    name = "frame:text"

    def get_metavar(self, param, ctx=None):
        return "FRAME:TEXT"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        match = re.fullmatch(r"\s*(\d+)\s*:(.*)", str(value), flags=re.DOTALL)
        if not match or not match.group(2).strip():
            self.fail(f"{value!r}; accepted: FRAME:TEXT with FRAME an integer >= 0 and a non-empty TEXT, "
                      "e.g. 0:'a red circle'", param, ctx)
        return int(match.group(1)), match.group(2).strip()


def prompt_schedule(prompt: Optional[str], specs, frames: int):
    """The pipeline's prompt: PROMPT alone (a str), or a {frame: text} dict from the `--prompt` specs (PROMPT,
    if also given, is frame 0's prompt). Raises `click.BadParameter` naming the option at fault."""
    if not specs:
        if prompt is None or not prompt.strip():
            raise click.UsageError("give PROMPT, or one or more --prompt FRAME:TEXT")
        return prompt
    schedule = {}
    for frame, text in specs:
        if frame >= frames:
            raise click.BadParameter(f"frame {frame} ({frame}:{text!r}) is not below --frames {frames}; accepted: "
                                     f"frames from 0 to {frames - 1}", param_hint="'--prompt'")
        if frame in schedule:
            raise click.BadParameter(f"frame {frame} is given twice; accepted: one prompt per frame",
                                     param_hint="'--prompt'")
        schedule[frame] = text
    if prompt is not None and prompt.strip():
        if 0 in schedule:
            raise click.BadParameter("frame 0 is given both as PROMPT and by --prompt 0:...; accepted: one of them",
                                     param_hint="'--prompt'")
        schedule[0] = prompt
    return dict(sorted(schedule.items()))


def _check_folder(path: Path, option: str, marker: str, what: str) -> Path:
    path = path.expanduser()
    if not path.is_dir():
        raise click.BadParameter(f"{path} is not a folder; accepted: a local {what} folder ({marker})",
                                 param_hint=f"'{option}'")
    if not (path / marker).is_file():
        raise click.BadParameter(f"{path} has no {marker}; accepted: a local {what} folder",
                                 param_hint=f"'{option}'")
    return path


def _flow_family(model: Path):
    """The family of a flow-matching --model folder from its model_index.json: Wan runs here (`_wan_video`); an
    image family (SD3, Flux, Qwen-Image) is refused naming `guidekit generate`. None for any other folder
    (AnimateDiff's SD 1.x image model; `_check_folder` and the loader say what is wrong with a bad one)."""
    import json

    from .families import family_of_config

    try:
        config = json.loads((Path(model).expanduser() / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    family = family_of_config(config) if isinstance(config, dict) else None
    if family is None or not family.is_flow:
        return None
    if not family.video:
        raise click.BadParameter(f"{model} is a {config.get('_class_name')} (model_index.json), a {family.label} "
                                 "image model; accepted: a Wan folder, or an SD 1.x folder with --motion-adapter "
                                 "(AnimateDiff); for images run guidekit generate --model", param_hint="'--model'")
    return family


#: Options of the AnimateDiff path that a Wan model has no use for: the motion adapter, prompt travel, FreeNoise.
WAN_REFUSED = {"adapter": ("--motion-adapter", "a motion adapter (AnimateDiff)"),
               "specs": ("--prompt", "prompt travel (FreeNoise)"),
               **{name: ("--" + name.replace("_", "-"), "FreeNoise") for name in
                  ("context_length", "context_stride", "fusion", "motion_injection", "injection_blocks")}}


#: Frames of a Wan video when --frames is not given: stock WanPipeline's default.
WAN_FRAMES = 81


def _wan_video(ctx, family, prompt, model: Path, frames, steps, scale, apg, seed, size, fps, negative_prompt,
               device, out):
    """`guidekit video --model WAN_DIR`: the plain GuidedWanPipeline with CFG or APG in its guidance slot."""
    import torch

    import guidekit
    from guidekit.video.export import save_video

    from .families import METHOD_NAMES, hooked_class, refusal

    for name, (option, method) in WAN_REFUSED.items():
        if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE:
            what = refusal(family, "freenoise") if method == "FreeNoise" else \
                f"{method} does not run on {family.label} models ({family.stock}); accepted there: " + \
                ", ".join(METHOD_NAMES[m] for m in family.methods)
            raise click.BadParameter(what, param_hint=f"'{option}'")
    if not prompt:
        raise click.BadParameter("is required with a Wan model; accepted: a non-empty prompt", param_hint="'PROMPT'")
    start = time.perf_counter()
    try:
        pipe = hooked_class(family).from_pretrained(str(model), local_files_only=True, dtype=torch.float32)
    except Exception as exc:  # noqa: BLE001 - diffusers' OSError, ValueError...: say which folder failed
        raise VideoError(f"--model: cannot load {str(model)!r}: {exc}") from exc
    pipe = pipe.to(device)
    temporal = int(getattr(pipe, "vae_scale_factor_temporal", 4))
    if ctx.get_parameter_source("frames") != click.core.ParameterSource.COMMANDLINE:
        frames = WAN_FRAMES
    if (frames - 1) % temporal:
        raise click.BadParameter(f"{frames}; accepted on {family.label}: {temporal}k + 1 frames (its VAE compresses "
                                 f"{temporal} frames into one), e.g. {frames - (frames - 1) % temporal}",
                                 param_hint="'--frames'")
    # Wan's own default frame is 832x480 (stock WanPipeline); `--size` N is N x N
    width, height = check_size_option(pipe, size or (832, 480), 0, images=min(frames, DECODE_CHUNK))
    settings = resolve_defaults("video", model=model, family=family, method="apg" if apg else None,
                                guidance_scale=scale, steps=steps)
    scale, steps = settings.guidance_scale, settings.steps
    hooks = [guidekit.APG(**settings.apg) if settings.method == "apg" else guidekit.CFG()]
    generator = torch.Generator(device="cpu").manual_seed(seed)
    try:
        result = pipe(prompt, negative_prompt=negative_prompt, num_frames=frames, height=height, width=width,
                      num_inference_steps=steps, guidance_scale=scale, generator=generator, output_type="np",
                      hooks=hooks)
    except ValueError as exc:
        raise VideoError(str(exc)) from None
    out.parent.mkdir(parents=True, exist_ok=True)
    save_video(result.frames[0], out, fps=fps)
    click.echo(f"wrote {out} ({frames} frames, {width}x{height}, {fps:g} fps, {'APG' if apg else 'CFG'} w={scale:g}, "
               f"{family.label} plain pipeline, {steps} steps, seed {seed}) in {time.perf_counter() - start:.1f}s")


def load_adapter(path: Path):
    from diffusers import MotionAdapter

    try:
        return MotionAdapter.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:  # diffusers raises OSError, ValueError, EnvironmentError... say which folder failed
        raise VideoError(f"--motion-adapter: cannot load {str(path)!r}: {exc}") from exc


def load_video_pipeline(model: Path, adapter, device: str):
    import torch

    from guidekit.pipelines import GuidedAnimateDiffPipeline

    try:
        pipe = GuidedAnimateDiffPipeline.from_pretrained(str(model), motion_adapter=adapter, local_files_only=True,
                                                         dtype=torch.float32)
    except Exception as exc:
        raise VideoError(f"--model: cannot load {str(model)!r} with the motion adapter: {exc}") from exc
    return pipe.to(device)


def check_video_size(pipe, dims: Optional[tuple[int, int]], frames: int) -> tuple[int, int]:
    """`--size` (or the model's native size) checked against the model's size rule and the memory of one decode
    chunk."""
    from .jobs import default_size

    return check_size_option(pipe, dims, default_size(pipe), images=min(frames, DECODE_CHUNK))


def _default_out(prompt, seed: int) -> Path:
    text = prompt if isinstance(prompt, str) else next(iter(prompt.values()))
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:48] or "video"
    return Path(f"{slug}-{seed}.gif")


FREENOISE_OPTIONS = ("context_length", "context_stride", "fusion", "motion_injection", "injection_blocks")
INJECTION_BLOCK_NAMES = ("down", "mid", "up")


def _injection_blocks(ctx, param, value: Optional[str]) -> Optional[tuple[str, ...]]:
    """`--injection-blocks down,mid`: the comma-separated UNet parts of motion injection."""
    if value is None:
        return None
    names = [name.strip() for name in value.split(",")]
    if not names or any(name not in INJECTION_BLOCK_NAMES for name in names) or len(set(names)) != len(names):
        raise click.BadParameter(f"{value!r}; accepted: a comma-separated selection of "
                                 f"{', '.join(INJECTION_BLOCK_NAMES)}, each at most once, e.g. down,mid")
    return tuple(names)


@click.command(context_settings={"show_default": True})
@click.argument("prompt", required=False)
@click.option("--model", type=click.Path(path_type=Path), default=None, metavar="DIR",
              help="Local diffusers SD 1.x pipeline folder (the image model), with --motion-adapter; or a Wan "
                   "text-to-video folder (WanPipeline, alone: CFG or APG, no FreeNoise or prompt travel). Default: the "
                   "embedded toy video model (image model and motion adapter).")
@click.option("--motion-adapter", "adapter", type=click.Path(path_type=Path), default=None, metavar="DIR",
              help="Local diffusers MotionAdapter folder (AnimateDiff's motion modules), with --model.")
@click.option("--prompt", "specs", type=PromptSpec(), multiple=True,
              help="Prompt travel: the prompt at key frame FRAME, e.g. --prompt 0:'a red circle' --prompt "
                   "40:'a blue circle'; repeat for each key frame. Frames between keys blend linearly.")
@click.option("--frames", type=click.IntRange(min=1), default=16,
              help="Frames of the video. On a Wan model: 4k + 1 frames, default 81 (stock WanPipeline's).")
@click.option("--steps", type=click.IntRange(1, 1000), default=None,
              help=f"Denoising steps. Default: the embedded model's (guidekit.toy.settings_for), else {DEFAULT_STEPS}.")
@click.option("--scale", type=FiniteFloatRange(min=0.0), default=None,
              help="Guidance scale w (CFG, or APG's). Default: the embedded model's (guidekit.toy.settings_for: its "
                   f"card's), 5 on Wan (stock WanPipeline's), else {STOCK_SCALE:g}.")
@click.option("--apg", is_flag=True, help="Guide with guidekit.APG() instead of CFG (on the embedded model with its "
                                          "recommended settings, guidekit.toy.RECOMMENDED_APG; else APG's defaults).")
@click.option("--seed", type=click.IntRange(min=0), default=0, help="Seed of the start noise.")
@click.option("--size", type=ImageSize(), default=None,
              help="Frame size in pixels, N or WxH, a multiple of the model's VAE factor. Default: the model's.")
@click.option("--fps", type=FiniteFloatRange(min=0.0, min_open=True, max=100.0), default=8.0,
              help="Frames per second of the output.")
@click.option("--context-length", type=click.IntRange(min=1), default=DEFAULT_CONTEXT_LENGTH,
              help="FreeNoise window W, at most the adapter's motion_max_seq_length (official: 16).")
@click.option("--context-stride", type=click.IntRange(min=1), default=DEFAULT_CONTEXT_STRIDE,
              help="FreeNoise stride S between window starts, at most --context-length (official: 4).")
@click.option("--fusion", type=click.Choice(["block", "attention"]), default=FREENOISE_DEFAULTS["fusion"],
              help="FreeNoise fusion point: attention (each temporal attention's output, the official code) or "
                   "block (each temporal transformer block, diffusers' port).")
@click.option("--no-freenoise", is_flag=True,
              help="Run the plain pipeline (at most motion_max_seq_length frames). Default: FreeNoise, which is "
                   "the plain model whenever --frames <= --context-length.")
@click.option("--motion-injection", is_flag=True,
              help="FreeNoise's motion injection (official steps 0.1, 0.3) for prompt travel; needs --prompt.")
@click.option("--injection-blocks", default=None, callback=_injection_blocks, metavar="BLOCKS",
              help="The UNet parts motion injection acts in, comma-separated from down, mid, up. Default: down,mid "
                   "(the official code's); needs --motion-injection.")
@click.option("--negative-prompt", default=None, help="Negative prompt.")
@click.option("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1, mps.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Output .gif or .webp (or .mp4 with PyAV installed). Default: <prompt>-<seed>.gif in the current "
                   "folder.")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists (refused otherwise).")
@click.pass_context
def video(ctx, prompt, model, adapter, specs, frames, steps, scale, apg, seed, size, fps, context_length,
          context_stride, fusion, no_freenoise, motion_injection, injection_blocks, negative_prompt, device, out,
          overwrite):
    """Generate an AnimateDiff video from PROMPT (or --prompt FRAME:TEXT key frames), with FreeNoise for videos
    longer than the motion model's training length."""
    from guidekit.video.export import MP4_SUFFIX, VIDEO_FORMATS, mp4_available

    text = prompt_schedule(prompt, specs, frames)
    out = out or _default_out(text, seed)
    suffixes = list(VIDEO_FORMATS) + ([MP4_SUFFIX] if mp4_available() else [])
    if out.suffix.lower() not in suffixes:
        hint = "" if mp4_available() else f" ({MP4_SUFFIX} with pip install \"guidekit[mp4]\")"
        raise click.BadParameter(f"{out}; accepted: a path ending in {' or '.join(suffixes)}{hint}",
                                 param_hint="'--out'")
    if out.exists() and not overwrite:
        raise click.ClickException(f"--out: {out} exists; pass --overwrite to replace it, or choose another path")
    if motion_injection and not specs:
        raise click.BadParameter("needs prompt travel; accepted: --motion-injection with --prompt FRAME:TEXT",
                                 param_hint="'--motion-injection'")
    if injection_blocks is not None and not motion_injection:
        raise click.BadParameter("acts only with motion injection; accepted: it with --motion-injection",
                                 param_hint="'--injection-blocks'")
    if no_freenoise:
        given = [name for name in FREENOISE_OPTIONS
                 if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE]
        if given:
            option = "--" + given[0].replace("_", "-")
            raise click.BadParameter("is a FreeNoise option; accepted: it without --no-freenoise",
                                     param_hint=f"'{option}'")
    if context_stride > context_length:
        raise click.BadParameter(f"{context_stride} is above --context-length {context_length}; accepted: an "
                                 f"integer from 1 to {context_length}", param_hint="'--context-stride'")
    import guidekit.toy

    family = _flow_family(model) if model is not None else None
    if family is not None:
        return _wan_video(ctx, family, prompt, model, frames, steps, scale, apg, seed, size, fps, negative_prompt,
                          device, out)
    embedded = model is None and adapter is None
    if embedded:
        try:
            model, adapter = guidekit.toy.default_model_path(), guidekit.toy.default_motion_adapter_path()
        except FileNotFoundError as exc:
            raise VideoError(f"{exc}; accepted: --model DIR --motion-adapter DIR") from None
    elif model is None or adapter is None:
        missing = "--model" if model is None else "--motion-adapter"
        raise click.BadParameter("is needed with the other one; accepted: both --model and --motion-adapter, or "
                                 "neither (the embedded video model)", param_hint=f"'{missing}'")
    model = _check_folder(model, "--model", "model_index.json", "diffusers pipeline")
    # The image model's folder decides the defaults (the embedded one's recommendation, else the stock values)
    settings = resolve_defaults("video", model=model, method="apg" if apg else None, guidance_scale=scale, steps=steps)
    scale, steps = settings.guidance_scale, settings.steps
    adapter_dir = _check_folder(adapter, "--motion-adapter", "config.json", "diffusers MotionAdapter")

    start = time.perf_counter()
    motion = load_adapter(adapter_dir)
    limit = motion.config.get("motion_max_seq_length")
    if limit is not None and not no_freenoise and context_length > limit:
        raise click.BadParameter(f"{context_length} is above the adapter's motion_max_seq_length {limit}; accepted: "
                                 f"an integer from 1 to {limit}", param_hint="'--context-length'")
    if limit is not None and no_freenoise and frames > limit:
        raise click.BadParameter(f"{frames} is above the adapter's motion_max_seq_length {limit}, which the plain "
                                 f"pipeline cannot exceed; accepted: at most {limit} frames, or FreeNoise (drop "
                                 "--no-freenoise)", param_hint="'--frames'")

    import torch

    import guidekit
    from guidekit.video.export import save_video

    pipe = load_video_pipeline(model, motion, device)
    width, height = check_video_size(pipe, size, frames)
    hooks = []
    if settings.method == "apg":
        hooks.append(guidekit.APG(**settings.apg))
    windowed = not no_freenoise and frames > context_length
    if not no_freenoise:
        blocks = {} if injection_blocks is None else {"injection_blocks": injection_blocks}  # else FreeNoise's default
        hooks.append(guidekit.FreeNoise(context_length=context_length, context_stride=context_stride, fusion=fusion,
                                        motion_injection=True if motion_injection else None, **blocks))
    generator = torch.Generator(device="cpu").manual_seed(seed)
    try:
        result = pipe(text, num_frames=frames, height=height, width=width, num_inference_steps=steps,
                      guidance_scale=scale, negative_prompt=negative_prompt, generator=generator, output_type="np",
                      decode_chunk_size=DECODE_CHUNK, hooks=hooks)
    except ValueError as exc:
        raise VideoError(str(exc)) from None
    video_frames = result.frames[0]
    out.parent.mkdir(parents=True, exist_ok=True)
    save_video(video_frames, out, fps=fps)
    method = "APG" if apg else "CFG"
    if windowed:
        window = f"FreeNoise W={context_length} S={context_stride} {fusion}"
    else:
        window = "plain pipeline" if no_freenoise else f"one window (frames <= {context_length})"
    if motion_injection:
        window += f" + motion injection ({','.join(hooks[-1].injection_blocks)})"
    keys = f", {len(text)} key prompts" if isinstance(text, dict) else ""
    click.echo(f"wrote {out} ({frames} frames, {width}x{height}, {fps:g} fps, {method} w={scale:g}, {window}{keys}, "
               f"{steps} steps, seed {seed}) in {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    video()
