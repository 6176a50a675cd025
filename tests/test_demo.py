"""The web demo: its API through gradio_client, its input bounds, and a real headless Chromium."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import socket
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

import torch  # noqa: E402

torch.set_num_threads(1)

CHROMIUM = os.environ.get("GUIDEKIT_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def pipe(tiny_sd_dir):
    from guidekit.apps.jobs import load_pipeline

    return load_pipeline(str(tiny_sd_dir))[0]


@pytest.fixture(scope="module")
def backend(pipe):
    from guidekit.apps.demo import DemoBackend, Limits

    return DemoBackend(pipe, "tiny", Limits(max_steps=8, max_size=64))


@pytest.fixture(scope="module")
def server(pipe):
    from guidekit.apps.demo import Limits, build_demo, launch

    app = build_demo(pipe, "tiny", Limits(max_steps=8, max_size=64))
    _, url, _ = launch(app, port=free_port(), prevent_thread_lock=True, quiet=True)
    yield url
    app.close()


@pytest.fixture(scope="module")
def client(server):
    from gradio_client import Client

    return Client(server, verbose=False)


#----------------------------------------------------------------------------
# Without a server.

def test_bounds_are_messages(backend):
    from guidekit.apps.jobs import JobError

    ok = dict(prompt="a red circle", negative_prompt="", seed=0, steps=2, width=32, height=32, guidance_scale=9,
              eta=0.0, norm_threshold=15.0, momentum=-0.5)
    cases = [
        (dict(steps=9), "steps: 9 is over this demo's limit; accepted: 1 to 8"),
        (dict(width=128), "width: 128 is over this demo's limit; accepted: up to 64"),
        (dict(height=36), "height: expected .*multiple of 8, got 36"),
        (dict(prompt=""), "prompt: required"),
        (dict(guidance_scale=31), "guidance_scale: 31 is over this demo's limit"),
        (dict(eta=2.0), r"eta: expected a number in \[0.0, 1.0\], got 2.0"),
        (dict(seed=1.5), "seed: expected an integer"),
    ]
    for change, message in cases:
        with pytest.raises(JobError, match=message):
            backend.compare(**{**ok, **change})
    with pytest.raises(JobError, match="guidance scales: expected a comma-separated list of 1 to 6"):
        backend.sweep("x", "", 0, 2, 32, 32, "1, 2, 3, 4, 5, 6, 7", 0.0, 15.0, -0.5)
    with pytest.raises(JobError, match="guidance scales"):
        backend.sweep("x", "", 0, 2, 32, 32, "1, lots", 0.0, 15.0, -0.5)


def test_sizes_over_the_available_memory_are_messages(backend, monkeypatch):
    import guidekit.checks as checks
    from guidekit.apps.jobs import JobError

    monkeypatch.setattr(checks, "available_memory", lambda device: 2**10, raising=False)  # 1 KiB free
    with pytest.raises(JobError, match=r"width/height: 64x32 needs at least .* and 1.0 KiB is available"):
        backend.compare("a red circle", "", 0, 2, 64, 32, 9.0, 0.0, 15.0, -0.5)
    with pytest.raises(JobError, match="width/height: 32x32 needs at least"):
        backend.sweep("a red circle", "", 0, 2, 32, 32, "1, 9", 0.0, 15.0, -0.5)


def test_uam_shares_the_model_in_its_dtype_without_warnings(tiny_sd_dir):
    import warnings

    from guidekit.apps.demo import DemoBackend, uam_available
    from guidekit.apps.jobs import load_pipeline

    if not uam_available():
        pytest.skip("UAM pipeline not in this build")
    pipe = load_pipeline(str(tiny_sd_dir), dtype=torch.bfloat16)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        uam = DemoBackend(pipe, "tiny").uam()
    assert uam.unet is pipe.unet  # the same modules, not a copy
    assert pipe.unet.dtype == pipe.vae.dtype == torch.bfloat16  # and not converted to float32 for the UAM tab


def test_compare_same_seed(backend):
    cfg, apg, summary = backend.compare("a red circle", "", 3, 2, 32, 32, 1.0, 0.0, 15.0, -0.5)
    assert cfg.size == apg.size == (32, 32)
    # guidance scale 1 turns guidance off: both methods give the same image for the same seed
    import numpy as np

    assert np.array_equal(np.asarray(cfg), np.asarray(apg))
    assert "saturation" in summary and "| **APG** |" in summary
    # an empty seed field means seed 0
    empty, _, summary = backend.compare("a red circle", "", None, 2, 32, 32, 1.0, 0.0, 15.0, -0.5)
    zero, _, _ = backend.compare("a red circle", "", 0, 2, 32, 32, 1.0, 0.0, 15.0, -0.5)
    assert summary.startswith("Seed 0,") and np.array_equal(np.asarray(empty), np.asarray(zero))
    # norm_threshold 0 means no rescaling; momentum 0 no momentum
    cfg, apg, _ = backend.compare("a red circle", "", 3, 2, 32, 32, 9.0, 0.0, 0.0, 0.0)
    assert not np.array_equal(np.asarray(cfg), np.asarray(apg))


def test_uam_tab_present_only_with_uam(pipe, monkeypatch):
    import guidekit.apps.demo as demo_mod

    monkeypatch.setattr(demo_mod, "uam_available", lambda: False)
    app = demo_mod.build_demo(pipe, "tiny")
    assert "/reconstruct_edit" not in {d.api_name and "/" + d.api_name for d in app.fns.values()}


#----------------------------------------------------------------------------
# Through the API.

def test_api_generate_and_sweep(client):
    from PIL import Image

    cfg, apg, summary = client.predict("a red circle", "", 3, 2, 32, 32, 12, 0.0, 15, -0.5, api_name="/generate")
    assert Image.open(cfg).size == Image.open(apg).size == (32, 32)
    assert "| **CFG** |" in summary and "| **APG** |" in summary

    grid, table = client.predict("a red circle", "", 3, 2, 32, 32, "1, 9", 0.0, 15, -0.5, api_name="/sweep")
    assert Image.open(grid).size[0] > 2 * 32
    assert [row[0] for row in table["data"]] == [1.0, 9.0]


def test_api_bounds(client):
    from gradio_client.exceptions import AppError

    good = ["a red circle", "", 3, 2, 32, 32, 12, 0.0, 15, -0.5]
    cases = [
        ({3: 5000}, "Steps: 5000 is out of range; accepted: 1 to 8"),
        ({4: 4096}, "Width: 4096 is out of range; accepted: 32 to 64"),
        ({3: "many"}, "Steps: expected a number from 1 to 8, got 'many'"),
        ({0: ""}, "prompt: required"),
        ({2: -1}, "Seed: -1 is out of range"),
    ]
    for change, message in cases:
        args = [change.get(i, v) for i, v in enumerate(good)]
        with pytest.raises(AppError) as info:
            client.predict(*args, api_name="/generate")
        assert message in str(info.value)
        assert "Traceback" not in str(info.value)


def test_api_reconstruct_edit(client):
    from guidekit.apps.demo import uam_available

    if not uam_available():
        pytest.skip("UAM pipeline not in this build")
    from gradio_client import handle_file
    from PIL import Image

    img = Image.new("RGB", (48, 40), (200, 30, 30))
    path = Path(os.environ.get("PYTEST_TMP", "/tmp")) / f"guidekit-demo-{os.getpid()}.png"
    img.save(path)
    try:
        out = client.predict(handle_file(str(path)), "a red image", "a blue image", 0, 2, 32, 5.0,
                             api_name="/reconstruct_edit")
    finally:
        path.unlink(missing_ok=True)
    original, rec, edit, mask, metrics = out
    assert Image.open(original).size == Image.open(rec).size == Image.open(edit).size == (32, 32)
    assert "PSNR" in metrics


def test_reconstruct_shows_uam_beside_plain_inversion(backend):
    """The Reconstruct / Edit table prints plain DDIM inversion and UAM, each row the numbers of its own run."""
    import re

    from guidekit.apps.demo import uam_available
    from guidekit.metrics import fidelity
    from PIL import Image

    if not uam_available():
        pytest.skip("UAM pipeline not in this build")
    img = Image.new("RGB", (32, 32), (200, 30, 30))
    img.paste((240, 220, 20), (8, 8, 24, 24))
    original, rec, _, _, table = backend.reconstruct_edit(img, "a yellow square", "a blue square", 0, 2, 32, 5.0)
    rows = {line.split("|")[1].strip(): [float(c) for c in line.split("|")[2:4]]
            for line in table.splitlines() if re.match(r"\| (Plain|UAM)", line)}
    assert len(rows) == 2 and any(k.startswith("Plain DDIM inversion") for k in rows), table
    psnr, ssim = next(v for k, v in rows.items() if k.startswith("UAM"))
    # the UAM row measures the reconstruction the tab shows (PNG rounding aside)
    shown = fidelity([rec], [original], with_lpips=False)[0]
    assert abs(shown["psnr"] - psnr) <= 0.02 * psnr and abs(shown["ssim"] - ssim) <= 0.02, (shown, table)


def test_reconstruct_edit_starts_with_the_first_example(pipe):
    from guidekit.apps.demo import Limits, build_demo, example_edits, uam_available

    if not uam_available() or not example_edits():
        pytest.skip("UAM pipeline or its examples not in this build")
    app = build_demo(pipe, "tiny", Limits(max_steps=8, max_size=64))
    blocks = {b.elem_id: b for b in app.blocks.values() if getattr(b, "elem_id", None)}
    assert blocks["uam-image"].value is not None, "the image input starts empty: Run would show errors"
    assert {"uam-original", "uam-reconstruction", "uam-edit", "uam-mask", "uam-metrics"} <= set(blocks)
    app.close()


def test_serves_no_file_outside_assets(server):
    import httpx

    from guidekit.apps.demo import ASSETS, EXAMPLE_EDITS

    repo_file = Path(__file__).resolve().parents[1] / "pyproject.toml"
    for path in (repo_file, Path(__file__).resolve(), Path("/etc/passwd")):
        assert httpx.get(f"{server}gradio_api/file={path}").status_code in (403, 404), path
    example = ASSETS / "examples" / EXAMPLE_EDITS[0][0]
    if example.exists():
        assert httpx.get(f"{server}gradio_api/file={example}").status_code == 200


#----------------------------------------------------------------------------
# In a real browser.

def _browser_missing() -> str | None:
    if not (os.path.exists(CHROMIUM) or shutil.which("chromium")):
        return f"no Chromium at {CHROMIUM} (apt-get install chromium)"
    if importlib.util.find_spec("playwright") is None:
        return "the playwright Python package is not installed (pip install playwright)"
    return None


#: Browser tests run where Chromium is installed; CI requires it (GUIDEKIT_REQUIRE_BROWSER=1).
needs_browser = pytest.mark.skipif(
    _browser_missing() is not None and not os.environ.get("GUIDEKIT_REQUIRE_BROWSER"),
    reason=str(_browser_missing()),
)


@contextlib.contextmanager
def demo_page(server, tab: str):
    """A real headless Chromium page on the demo at `server`, with the tab named `tab` open."""
    # CI sets GUIDEKIT_REQUIRE_BROWSER=1: there a missing Chromium fails the test instead of skipping it.
    assert _browser_missing() is None, _browser_missing()
    from playwright.sync_api import sync_playwright

    executable = CHROMIUM if os.path.exists(CHROMIUM) else shutil.which("chromium")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.goto(server, wait_until="domcontentloaded", timeout=60_000)
            page.get_by_role("tab", name=tab, exact=True).click(timeout=60_000)
            yield page
        finally:
            browser.close()


@pytest.mark.browser
@needs_browser
def test_browser_generate(server, tmp_path):
    from playwright.sync_api import expect

    with demo_page(server, "Generate") as page:
        prompt = page.locator("#gen-prompt textarea")
        prompt.fill("a blue square on a red background", timeout=60_000)
        page.locator("#gen-steps input[type=number]").fill("2")
        page.locator("#gen-steps input[type=number]").press("Enter")
        page.locator("#gen-button").click()
        for side in ("cfg", "apg"):
            expect(page.locator(f"#gen-{side} img")).to_be_visible(timeout=60_000)
        expect(page.locator("#gen-summary")).to_contain_text("saturation", timeout=60_000)
        shot = os.environ.get("GUIDEKIT_DEMO_SCREENSHOT")
        page.screenshot(path=shot or str(tmp_path / "demo.png"), full_page=True)


def set_number(page, elem_id: str, value) -> None:
    """Type `value` into the number box of the slider or number field `elem_id`."""
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Enter")


@pytest.mark.browser
@needs_browser
def test_browser_style(server, tmp_path):
    import re

    from playwright.sync_api import expect

    with demo_page(server, "Style") as page:
        # The second example: a blue square in the style of a yellow circle on red, with its style prompt.
        page.get_by_text("a yellow circle on a red background", exact=True).click(timeout=60_000)
        expect(page.locator("#style-prompt textarea")).to_have_value("a yellow circle on a red background",
                                                                      timeout=60_000)
        # An uploaded content image of another size, with an alpha channel, replaces the example's.
        from PIL import Image

        upload = tmp_path / "content.png"
        Image.new("RGBA", (48, 40), (30, 200, 30, 255)).save(upload)
        page.locator("#style-content button[aria-label='Remove Image']").click()
        page.locator("#style-content input[type=file]").set_input_files(str(upload))
        expect(page.locator("#style-content img")).to_be_visible(timeout=60_000)
        set_number(page, "style-steps", 2)
        set_number(page, "style-seed", 3)
        set_number(page, "style-alpha", 0.5)
        page.locator("#style-button").click()
        for side in ("styleid", "stylessp"):
            expect(page.locator(f"#style-{side} img")).to_be_visible(timeout=120_000)
        summary = page.locator("#style-summary")
        expect(summary).to_contain_text("StyleID+StyleSSP", timeout=120_000)
        text = summary.inner_text()
        assert "2 steps" in text and "alpha 0.5" in text and "seed 3" in text, text
        assert len(re.findall(r"\d+\.\d+ dB", text)) == 2, text  # PSNR of each image
        assert "Error" not in page.locator("body").inner_text()
        page.screenshot(path=str(tmp_path / "style.png"), full_page=True)


@pytest.mark.browser
@needs_browser
def test_browser_classifier_guidance(server, tmp_path):
    import re

    from playwright.sync_api import expect

    from guidekit.apps.demo import embedded_classifier_path

    if embedded_classifier_path() is None:
        pytest.skip("no embedded classifier in this install")
    with demo_page(server, "Classifier guidance") as page:
        label = page.locator("#clf-label input")
        label.fill("green square", timeout=60_000)
        label.press("Enter")
        page.locator("#clf-path textarea, #clf-path input").first.click()  # focus the folder box and leave it:
        page.locator("#clf-scale input[type=number]").click()  # its classes reload, the chosen one stays
        page.wait_for_timeout(1000)
        expect(label).to_have_value("green square", timeout=60_000)
        set_number(page, "clf-scale", 5)
        set_number(page, "clf-seed", 2)
        set_number(page, "clf-steps", 2)
        page.locator("#clf-button").click()
        for key in ("unguided", "naive", "elucd"):
            expect(page.locator(f"#clf-{key} img")).to_be_visible(timeout=120_000)
        summary = page.locator("#clf-summary")
        expect(summary).to_contain_text("p(requested class)", timeout=120_000)
        text = summary.inner_text()
        assert "Class green square (id 7)" in text and "classifier scale 5" in text and "seed 2" in text, text
        assert len(re.findall(r"\(\d\.\d\d\)", text)) == 3, text  # each image's top-class probability
        assert "Error" not in page.locator("body").inner_text()
        page.screenshot(path=str(tmp_path / "classifier.png"), full_page=True)
