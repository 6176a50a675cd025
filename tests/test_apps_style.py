"""`guidekit style` and the demo's Style tab, on the tiny SD test model."""

from __future__ import annotations

import os

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"

import torch  # noqa: E402

torch.set_num_threads(1)

SIZE = 32  # a multiple of the tiny model's VAE factor


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Two world images of the embedded model's world, resized to SIZE: (content path, style path)."""
    from PIL import Image

    from guidekit.toy import world

    folder = tmp_path_factory.mktemp("style-images")
    paths = []
    for name, seed in (("content", 1), ("style", 2)):
        im = world.generate(seed).image
        im = (im if isinstance(im, Image.Image) else Image.fromarray(im)).convert("RGB").resize((SIZE, SIZE))
        paths.append(folder / f"{name}.png")
        im.save(paths[-1])
    return paths


def run(args):
    from click.testing import CliRunner

    from guidekit.apps.cli import main

    return CliRunner().invoke(main, ["style", *map(str, args)])


def test_defaults_match_the_library():
    import guidekit
    from guidekit.apps import style
    from guidekit.latents.stylessp import DEFAULT_NEGATIVE_GUIDANCE
    from guidekit.pipelines.styleid_sd import DEFAULT_GAMMA, DEFAULT_TEMPERATURE

    assert (style.DEFAULT_GAMMA, style.DEFAULT_TEMPERATURE) == (DEFAULT_GAMMA, DEFAULT_TEMPERATURE) == (0.75, 1.5)
    assert style.DEFAULT_ALPHA == guidekit.StyleSSP().alpha == 0.7
    assert style.DEFAULT_NEGATIVE_SCALE == DEFAULT_NEGATIVE_GUIDANCE


def test_cli_writes_png_and_refuses_overwrite(tiny_sd_dir, images, tmp_path):
    from PIL import Image

    content, style_path = images
    out = tmp_path / "out.png"
    args = [content, style_path, "--out", out, "--model", tiny_sd_dir, "--steps", 2]
    result = run(args)
    assert result.exit_code == 0, result.output
    assert Image.open(out).size == (SIZE, SIZE)
    again = run(args)
    assert again.exit_code != 0 and "--overwrite" in again.output
    assert run(args + ["--overwrite", "--no-stylessp"]).exit_code == 0


def test_cli_side_by_side_has_labelled_panels(tiny_sd_dir, images, tmp_path):
    import numpy as np
    from PIL import Image

    from guidekit.apps.style import STRIP_LABELS

    content, style_path = images
    out = tmp_path / "strip.png"
    result = run([content, style_path, "--out", out, "--model", tiny_sd_dir, "--steps", 2, "--side-by-side",
                  "--style-prompt", "a red circle on a blue background", "--alpha", 0.5])
    assert result.exit_code == 0, result.output
    assert STRIP_LABELS == ("content", "style", "StyleID", "StyleID + StyleSSP")
    # guidekit.apps.uam_image.labelled_strip: panels scaled to 128 px, a 16 px white band of labels above them
    strip = np.asarray(Image.open(out).convert("L"))
    assert strip.shape == (128 + 16, 4 * 128)
    band, panels = strip[:16], strip[16:]
    for i in range(4):
        label = band[:, i * 128 : (i + 1) * 128]
        assert (label < 100).sum() > 10 * len(STRIP_LABELS[i]) // 2  # dark text on white, longer labels ink more
        assert (label > 250).mean() > 0.5
    content_panel = np.asarray(Image.open(content).convert("L").resize((128, 128), Image.NEAREST))
    assert np.array_equal(panels[:, :128], content_panel)
    assert "StyleID: SSIM vs content" in result.output and "StyleID+StyleSSP: SSIM vs content" in result.output


def test_cli_runs_the_example_pair_without_images(tiny_sd_dir, tmp_path):
    from PIL import Image

    from guidekit.toy.style_example import style_example_paths

    out = tmp_path / "example.png"
    result = run(["--out", out, "--model", tiny_sd_dir, "--steps", 1])
    assert result.exit_code == 0, result.output
    assert Image.open(out).size == Image.open(style_example_paths()[0]).size
    one = run([style_example_paths()[0], "--out", tmp_path / "one.png", "--model", tiny_sd_dir])
    assert one.exit_code == 2 and "CONTENT and STYLE" in one.output


def test_cli_errors(tiny_sd_dir, images, tmp_path):
    from PIL import Image

    content, style_path = images
    out = tmp_path / "x.png"
    missing = run([tmp_path / "nope.png", style_path, "--out", out, "--model", tiny_sd_dir])
    assert missing.exit_code != 0 and "CONTENT" in missing.output and "not found" in missing.output
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    unreadable = run([content, bad, "--out", out, "--model", tiny_sd_dir])
    assert unreadable.exit_code != 0 and "STYLE" in unreadable.output and "cannot be read" in unreadable.output
    odd = tmp_path / "odd.png"
    Image.open(content).resize((SIZE + 3, SIZE)).save(odd)
    result = run([odd, style_path, "--out", out, "--model", tiny_sd_dir, "--steps", 1])
    assert result.exit_code != 0 and "VAE factor" in result.output and "Traceback" not in result.output
    assert not out.exists()
    scale = run([content, style_path, "--out", out, "--model", tiny_sd_dir, "--negative-scale", 0.5])
    assert scale.exit_code != 0 and "style prompt" in scale.output
    assert run([content, style_path, "--out", out, "--gamma", 2]).exit_code == 2
    assert run([content, style_path, "--out", tmp_path / "x.jpg"]).exit_code != 0


def test_demo_style(tiny_sd_dir, images):
    from PIL import Image

    from guidekit.apps.demo import DemoBackend, JobError, Limits, example_styles
    from guidekit.apps.jobs import load_pipeline

    backend = DemoBackend(load_pipeline(str(tiny_sd_dir))[0], "tiny", Limits(max_steps=8, max_size=64))
    content, style = (Image.open(p) for p in images)
    plain, ssp, summary = backend.style(content, style, "a red circle", 0, 2, SIZE, 0.75, 1.5, 0.7)
    assert plain.size == ssp.size == (SIZE, SIZE)
    assert "| **StyleID** |" in summary and "| **StyleID+StyleSSP** |" in summary and "SSIM" in summary
    with pytest.raises(JobError, match="style image"):
        backend.style(content, None, "", 0, 2, SIZE, 0.75, 1.5, 0.7)
    with pytest.raises(ValueError, match="gamma"):
        backend.style(content, style, "", 0, 2, SIZE, 1.5, 1.5, 0.7)
    assert all(os.path.isfile(p) for row in example_styles() for p in row[:2])
