"""The demo's Generate tab: the same seed with CFG and with APG, with the saturation and clipped fraction of each."""

from __future__ import annotations

import time

from .demo_base import EXAMPLE_PROMPTS, OUTPUT_IMAGE, Slider, _apg_controls, _sampling_controls, _ui_errors
from .jobs import COMMON, generate, to_pil


#: Where the Generate tab's scale starts: above the models' defaults, where CFG and APG differ visibly (the model's
#: default scale is in the slider's text).
COMPARE_SCALE = 10.0


def generate_tab(backend, queue: dict):
    """The Generate tab: CFG and APG side by side from the same seed."""
    import gradio as gr

    limits = backend.limits
    scale_param = COMMON["guidance_scale"]
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


class GenerateTab:
    """The Generate tab's work: the same seed with CFG and with APG."""

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
