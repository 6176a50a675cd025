"""The demo's Long video tab: plain sliding windows and FreeNoise from the same seed, on the embedded video model or --video-model."""

from __future__ import annotations

import re
import tempfile
import time
from pathlib import Path
from typing import Optional

from .defaults import FREENOISE_DEFAULTS, resolve_defaults
from .demo_measure import VIDEO_DEFAULT
from .demo_base import OUTPUT_IMAGE, Limits, Number, Slider, _as_count, _as_int, _ui_errors, log
from .jobs import JobError, parse_job, size_multiple, vae_factor


#: The Long video tab's default prompt schedule (one `FRAME: prompt` per line).
EXAMPLE_SCHEDULE = "0: a red circle on a blue background\n24: a yellow circle on a blue background"

#: Where the tab's seed starts (docs/demo-defaults/video.json, the strict judge, 64 frames, context 16, stride 4,
#: 15 steps, about 65 CPU seconds for both videos): seed 1 is the only one of seeds 0-5 where the teleports tell
#: the two apart (sliding windows 39/41 held frames read right with 2 teleports, FreeNoise 41/41 with none); on
#: seeds 0, 2, 3 and 5 both have none, on seed 4 FreeNoise has one and the windows none. FreeNoise's mean frame
#: change is lower than the windows' on all 5 seeds where it was recorded (1-5).
EXAMPLE_VIDEO_SEED = VIDEO_DEFAULT["seed"]

#: Where the tab's frames start on the embedded video model (the measured pick: four times the context length, so
#: the windows must be fused); on other video models, EXAMPLE_FRAMES.
EXAMPLE_VIDEO_FRAMES = VIDEO_DEFAULT["frames"]
EXAMPLE_FRAMES = 32

#: Where the steps start on the embedded video model: the measured pick, so both videos fit about a minute of CPU
#: time (the resolver's video steps otherwise).
EXAMPLE_VIDEO_STEPS = VIDEO_DEFAULT["steps"]

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

#: What the judge columns of the Long video table mean (embedded video model only).
JUDGE_VIDEO_NOTE = ("Judge: the toy world judge reads every frame; frames read as their prompt counts the frames held "
                    "on one prompt (not those blending two) whose colour, shape, background and texture it reads as "
                    "asked; a teleport is a frame-to-frame jump of the shape's centre above 3x the video's median "
                    "step and 2 px, or a frame without a shape (as in `guidekit eval-video`).")


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

    def example_frames_steps(self) -> tuple[int, int]:
        """Where the tab's frames and steps sliders start: the measured pick on the embedded video model
        (EXAMPLE_VIDEO_FRAMES, EXAMPLE_VIDEO_STEPS), else EXAMPLE_FRAMES and the resolver's steps."""
        if self.embedded:
            return EXAMPLE_VIDEO_FRAMES, EXAMPLE_VIDEO_STEPS
        return EXAMPLE_FRAMES, self.defaults().steps

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
                start_frames, start_steps = video.example_frames_steps()
                frames = Slider(1, lim.max_frames, value=min(start_frames, lim.max_frames), step=1, label="Frames",
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
                steps = Slider(1, lim.max_steps, value=min(start_steps, lim.max_steps), step=1, label="Steps",
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
