"""The default example of `guidekit style` and the demo's Style tab: one pair of the embedded model's style task
(`guidekit.toy.style_task`), shipped as two 64x64 PNGs in ``assets/examples``.

``STYLE_EXAMPLE`` names the two files (content, style), ``STYLE_EXAMPLE_PROMPT`` what the style image shows of its
own (c⁻ of StyleSSP's negative-guided inversion). The pair is ``EXAMPLE_PAIR`` of the task, chosen from the
measured table of docs/style-task.md by `guidekit.toy.eval_style.pick_example` (the first pair on which StyleID
and StyleID + StyleSSP both keep the content's shape, adopt the style and leak nothing); the PNGs are the
world's own rendering of it (`write_example_images`), which a test checks pixel for pixel.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .style_task import Pair, make_pairs
from .world import Scene

__all__ = ["EXAMPLE_PAIR", "STYLE_EXAMPLE", "STYLE_EXAMPLE_PROMPT", "example_pair", "example_file_names",
           "style_example_paths", "write_example_images"]

#: The task pair the example is (its index in `guidekit.toy.style_task.make_pairs`).
EXAMPLE_PAIR = 5
#: (content, style): file names in ``assets/examples``.
STYLE_EXAMPLE = ("content-green-square-on-red-striped.png", "style-green-circle-on-yellow.png")
#: What the style image shows of its own: c⁻ of StyleSSP's negative-guided inversion for the example.
STYLE_EXAMPLE_PROMPT = "a circle"


def example_pair() -> Pair:
    """The task pair ``EXAMPLE_PAIR``, with its images."""
    return make_pairs(EXAMPLE_PAIR + 1)[EXAMPLE_PAIR]


def _slug(scene: Scene) -> str:
    words = [scene.colour, scene.shape, "on", scene.background] + ([scene.texture] if scene.texture else [])
    return "-".join(words)


def example_file_names(pair: Pair) -> tuple:
    """(content, style) file names of a pair: its role, then its scene in words."""
    return f"content-{_slug(pair.content)}.png", f"style-{_slug(pair.style)}.png"


def style_example_paths() -> tuple:
    """(content, style): the paths of the example's PNGs in the installed (or checked-out) assets."""
    from . import _asset_path

    folder = _asset_path("examples", "example images")
    return tuple(folder / name for name in STYLE_EXAMPLE)


def write_example_images(folder) -> tuple:
    """Render the example pair and write its two PNGs into `folder` (created if missing); returns their paths."""
    from PIL import Image

    pair = example_pair()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, image in zip(example_file_names(pair), (pair.content_image, pair.style_image)):
        Image.fromarray(np.asarray(image, dtype=np.uint8)).save(folder / name)
        paths.append(folder / name)
    return tuple(paths)
