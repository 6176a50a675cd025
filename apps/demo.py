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

Each tab has its own module, with its part of the backend (a mixin of `DemoBackend`) and its page:
`demo_generate`, `demo_sweep`, `demo_uam`, `demo_style`, `demo_classifier`, `demo_video`; `demo_base` holds what
they share. This module assembles them: a new method adds its module, its mixin and its tab here.
"""

from __future__ import annotations

from typing import Optional

import click

from guidekit.checks import MAX_IMAGE_SIDE

from .demo_base import ASSETS, CSS, EXAMPLE_PROMPTS, DemoBase, Limits, _model_label, apg_start_values
from .demo_classifier import (DEFAULT_CLASSIFIER_SCALE, GET_CLASSIFIER, MAX_CLASSIFIER_SCALE, ClassifierTab,
                              _classifier_tab, classifier_reading, classifier_tab_available, embedded_classifier_path,
                              judge_reading)
from .demo_generate import COMPARE_SCALE, GenerateTab, generate_tab
from .demo_style import EXAMPLE_STYLES, StyleTab, _style_tab, example_styles, styleid_available
from .demo_sweep import (GRID_HEADER_PX, SWEEP_HEADERS, SWEEP_SCALES, SweepTab, compose_grid, default_sweep_scales,
                         parse_scales, sweep_tab)
from .demo_uam import EXAMPLE_EDITS, UAMTab, _uam_tab, example_edits, uam_available
from .demo_video import (EXAMPLE_SCHEDULE, EXAMPLE_VIDEO_SEED, FUSION_CHOICES, JUDGE_VIDEO_NOTE, VIDEO_FPS, VIDEO_RUNS,
                         VIDEO_SUFFIX, VideoBackend, _video_tab, parse_prompt_text, video_backend,
                         video_judge_reading)
from .jobs import JobError

__all__ = ["DemoBackend", "Limits", "build_demo", "launch", "demo", "VideoBackend", "video_backend", "JobError",
           # re-exported from the tabs' modules
           "ASSETS", "CSS", "EXAMPLE_PROMPTS", "apg_start_values", "DEFAULT_CLASSIFIER_SCALE", "GET_CLASSIFIER",
           "MAX_CLASSIFIER_SCALE", "classifier_reading", "classifier_tab_available", "embedded_classifier_path",
           "judge_reading", "COMPARE_SCALE", "EXAMPLE_STYLES", "example_styles", "styleid_available",
           "SWEEP_HEADERS", "GRID_HEADER_PX", "SWEEP_SCALES", "compose_grid", "default_sweep_scales", "parse_scales", "EXAMPLE_EDITS",
           "example_edits", "uam_available", "EXAMPLE_SCHEDULE", "EXAMPLE_VIDEO_SEED", "FUSION_CHOICES",
           "JUDGE_VIDEO_NOTE", "VIDEO_FPS", "VIDEO_RUNS", "VIDEO_SUFFIX", "parse_prompt_text",
           "video_judge_reading"]


class DemoBackend(GenerateTab, SweepTab, UAMTab, StyleTab, ClassifierTab, DemoBase):
    """Holds the one shared pipeline and runs requests on it: each tab's work comes from its module's mixin."""


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
    queue = dict(concurrency_limit=1, concurrency_id="model")  # one shared model: one request at a time

    with gr.Blocks(title="guidekit demo", analytics_enabled=False) as demo:
        gr.Markdown(f"# guidekit\nTraining-free guidance for diffusers. Model: {_model_label(model_name)}.")
        generate_tab(backend, queue)
        sweep_tab(backend, queue)
        if uam_available():
            _uam_tab(backend, queue)
        if styleid_available(pipe):
            _style_tab(backend, queue)
        if classifier_tab_available(pipe):
            _classifier_tab(backend, queue)
        _video_tab(video, video_note, queue)
    demo.queue(max_size=limits.queue_size)
    return demo


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


if __name__ == "__main__":  # `python -m guidekit.apps.demo` skips the CLI group: be as quiet as it is
    from guidekit.apps.quiet import quiet

    quiet()
    demo()
