"""The demo's Style tab: StyleID style transfer with and without StyleSSP's start point."""

from __future__ import annotations

import time

from .demo_base import DemoBase, ASSETS, OUTPUT_IMAGE, Number, Slider, _ui_errors
from .jobs import JobError
from guidekit.toy.style_example import STYLE_EXAMPLE, STYLE_EXAMPLE_PROMPT


# Example style transfers: (content image, style image in assets/examples, what the style image shows). The first,
# the tab's default, is the style task's measured example (guidekit.toy.style_example, docs/style-task.md): a
# style image whose shape takes the content's colour, which this model can transfer without losing the layout.
EXAMPLE_STYLES = [
    (*STYLE_EXAMPLE, STYLE_EXAMPLE_PROMPT),
    ("yellow-circle-on-red.png", "green-triangle-on-yellow.png", "a green triangle on a yellow background"),
    ("blue-square-on-magenta.png", "yellow-circle-on-red.png", "a yellow circle on a red background"),
    ("green-triangle-on-yellow.png", "blue-square-on-magenta.png", "a blue square on a magenta background"),
]


def styleid_available(pipe) -> bool:
    """Whether the Style tab can run on `pipe`: StyleID is implemented for SD 1.x/2.x pipelines only."""
    try:
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

        from guidekit.pipelines import StyleIDStableDiffusionPipeline
    except ImportError:
        return False
    return StyleIDStableDiffusionPipeline is not None and isinstance(pipe, StableDiffusionPipeline) and \
        not isinstance(pipe, StableDiffusionXLPipeline)


def example_styles() -> list[list[str]]:
    """Example rows for the Style tab: content and style images shipped in assets/examples, with the style
    prompt (what the style image shows)."""
    folder = ASSETS / "examples"
    return [[str(folder / c), str(folder / s), p] for c, s, p in EXAMPLE_STYLES
            if (folder / c).is_file() and (folder / s).is_file()]


def _style_tab(backend: DemoBase, queue: dict):
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


class StyleTab:
    """The Style tab's work: StyleID with and without StyleSSP."""

    _styleid = None  # the StyleID pipeline (the same modules), made at the first request

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
