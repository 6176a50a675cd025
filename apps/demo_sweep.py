"""The demo's Sweep tab: one prompt and seed over several guidance scales, a row for CFG and a row for APG."""

from __future__ import annotations

from .demo_base import EXAMPLE_PROMPTS, Limits, _apg_controls, _num, _sampling_controls, _ui_errors
from .jobs import JobError, generate, to_pil


#: The Sweep tab's default guidance scales: from no guidance up to the scales where CFG degrades and APG is
#: built not to (w = 15 and above).
SWEEP_SCALES = (1, 5, 10, 15, 20)

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


#: Height in pixels of the Sweep grid's top band, where compose_grid writes the column headers ("w = 1"); the
#: browser test checks nothing the page draws covers it.
GRID_HEADER_PX = 24


def compose_grid(cells: dict, scales: list[float]):
    """One labelled picture: rows CFG / APG, a column per scale, saturation and clipped fraction under each
    image. `cells[name, scale]` is (image, saturation, clipped fraction)."""
    from PIL import Image, ImageDraw

    from PIL import ImageFont

    first = next(iter(cells.values()))[0]
    w, h = first.size
    tile = max(128, min(256, w))  # small models get upscaled so the labels stay readable
    th = round(tile * h / w)
    gap, left, top, cap = 6, 48, GRID_HEADER_PX, 40
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


def sweep_tab(backend, queue: dict):
    """The Sweep tab: a row of CFG images and a row of APG images over several guidance scales."""
    import gradio as gr

    limits = backend.limits
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


class SweepTab:
    """The Sweep tab's work: CFG and APG over several guidance scales."""

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
