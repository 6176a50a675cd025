"""The demo's Reconstruct / Edit tab: UAM's near-exact reconstruction of an image, and a prompt edit with its mask."""

from __future__ import annotations

from .demo_base import DemoBase, ASSETS, OUTPUT_IMAGE, Number, Slider, _first_image, _mask_image, _ui_errors
from .jobs import JobError


# Example edits: (image in assets/examples, source prompt, target prompt).
EXAMPLE_EDITS = [
    ("yellow-circle-on-red.png", "a yellow circle on a red background", "a yellow square on a red background"),
    ("green-triangle-on-yellow.png", "a green triangle on a yellow background", "a blue triangle on a yellow background"),
    ("blue-square-on-magenta.png", "a blue square on a magenta background", "a blue square on a cyan background"),
]


def uam_available() -> bool:
    try:
        from guidekit.pipelines import UAMStableDiffusionPipeline
    except ImportError:
        return False
    return UAMStableDiffusionPipeline is not None


def example_edits() -> list[list[str]]:
    """Example rows for the Reconstruct / Edit tab: images shipped in assets/examples (the only files the
    demo serves besides its own outputs) with their prompts."""
    folder = ASSETS / "examples"
    return [[str(folder / name), src, tgt] for name, src, tgt in EXAMPLE_EDITS if (folder / name).is_file()]


def _uam_tab(backend: DemoBase, queue: dict):
    import gradio as gr

    from . import uam_image

    lim, f = backend.limits, backend.factor
    with gr.Tab("Reconstruct / Edit"):
        gr.Markdown("Uniform attention maps (UAM): invert a real image, rebuild it almost exactly, and edit it "
                    "with a prompt; the mask shows where the edit acted.")
        with gr.Row():
            with gr.Column(scale=2):
                edits = example_edits()
                # preloaded with the first example, so the tab's button works as it starts
                image = gr.Image(value=edits[0][0] if edits else None, label="Image", type="pil", sources=["upload"],
                                 elem_id="uam-image", height=256)
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
                    outs = [gr.Image(label=name, type="pil", format="png", interactive=False, elem_id=f"uam-{key}",
                                     **OUTPUT_IMAGE)
                            for key, name in (("original", "Original"), ("reconstruction", "Reconstruction (UAM)"),
                                              ("edit", "Edit"), ("mask", "Mask"))]
                metrics = gr.Markdown(elem_id="uam-metrics")
        button.click(_ui_errors(backend.reconstruct_edit), [image, source, target, seed, steps, size, scale],
                     [*outs, metrics], api_name="reconstruct_edit", **queue)


class UAMTab:
    """The Reconstruct / Edit tab's work (UAM)."""

    _uam = None  # the UAM pipeline (the same modules), made at the first request

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
        # UAM and plain DDIM inversion in the same setting (the source prompt, w = 1), only the attention differs:
        # the baseline UAM's near-exact reconstruction is measured against. DDIM inversion draws no noise.
        runs = {uniform: uam.reconstruct(original, prompt=source_prompt or "", guidance_scale=1.0, uniform=uniform,
                                         num_inference_steps=params["steps"])
                for uniform in (False, True)}
        # MasaCtrl's mutual self-attention starts at step 4 (the paper's value), or at the last step of short runs
        edit = uam.edit(original, source_prompt or "", target_prompt, guidance_scale=params["guidance_scale"],
                        num_inference_steps=params["steps"], start_step=min(4, params["steps"]), generator=gen())
        mask = edit.masks[0] if getattr(edit, "masks", None) is not None and len(edit.masks) else None
        return original, _first_image(runs[True].images), _first_image(edit.images), _mask_image(mask), \
            reconstruction_table(runs[False].metrics[0], runs[True].metrics[0], params["steps"], bool(source_prompt))


def reconstruction_table(plain: dict, uniform: dict, steps: int, caption: bool) -> str:
    """Markdown: PSNR and SSIM against the original of plain DDIM inversion and of UAM, one row each.

    Args:
        plain, uniform: the `metrics` (psnr, ssim) of the reconstruction with normal and with uniform attention.
        steps: the DDIM steps both ran.
        caption: whether both read the source prompt (else the null prompt)."""
    setting = f"{'source' if caption else 'null'} prompt, w=1"
    rows = [(f"Plain DDIM inversion ({setting})", plain), (f"UAM (uniform maps, {setting})", uniform)]
    lines = ["| reconstruction | PSNR (dB) | SSIM |", "|---|---|---|"]
    lines += [f"| {name} | {m['psnr']:.2f} | {m['ssim']:.3f} |" for name, m in rows]
    return (f"Reconstruction of the original after inversion, {steps} DDIM steps (higher is closer):\n\n"
            + "\n".join(lines))
