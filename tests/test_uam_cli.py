"""`guidekit reconstruct`, `guidekit edit` and their batch jobs, on the embedded model with a toy-world image."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

STEPS = 2  # seconds per command on the embedded model; the numbers are checked against the written files
SOURCE = None  # the world image's caption, set by the `image` fixture


@pytest.fixture(scope="module")
def embedded():
    """The embedded model, loaded once for the module: (pipeline, name)."""
    from guidekit.apps.generate import load_pipeline

    return load_pipeline(None)


@pytest.fixture(autouse=True)
def cached_model(embedded, monkeypatch):
    """The commands load the model through `guidekit.apps.generate.load_pipeline`: hand them the loaded one."""
    import guidekit.apps.generate as generate

    def load(model=None, device="cpu", dtype=None):
        assert model is None
        return embedded

    monkeypatch.setattr(generate, "load_pipeline", load)


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    """A toy-world image (64x64) in its own folder: (path, caption)."""
    from PIL import Image

    from guidekit.toy import world

    sample = world.generate(3)
    path = tmp_path_factory.mktemp("uam-images") / "scene.png"
    Image.fromarray(sample.image).save(path)
    return path, sample.caption


def run(*args):
    from click.testing import CliRunner

    from guidekit.apps.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


def rgb(path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.float64) / 255.0


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR (dB) of [0, 1] images, from its definition: 10 log10(1 / MSE)."""
    return float(10 * np.log10(1.0 / np.mean((a - b) ** 2)))


def test_defaults_match_the_pipeline():
    import inspect

    from guidekit.apps import uam_image
    from guidekit.pipelines import UAMStableDiffusionPipeline

    edit = inspect.signature(UAMStableDiffusionPipeline.edit).parameters
    assert uam_image.DEFAULT_QUANTILE == edit["quantile"].default
    assert uam_image.DEFAULT_RECON_T == edit["recon_t"].default
    assert uam_image.DEFAULT_DILATE_RADIUS == edit["dilate_radius"].default
    assert uam_image.DEFAULT_STEPS == edit["num_inference_steps"].default


def test_reconstruct_writes_files_and_prints_numbers(image, tmp_path):
    from PIL import Image

    path, caption = image
    out = tmp_path / "new" / "rec"  # created, parents too
    result = run("reconstruct", path, "--out", out, "--steps", STEPS, "--prompt", caption)
    assert result.exit_code == 0, result.output
    rec = out / "scene-reconstruction.png"
    strip = out / "scene-reconstruction-strip.png"
    assert rec.is_file() and strip.is_file()
    with Image.open(rec) as im:
        assert im.size == (64, 64)
    with Image.open(strip) as im:  # input | UAM | DDIM inversion, each at least 128 px wide, a label band above
        assert im.width == 3 * 128 and im.height > 128
    uam = re.search(r"UAM .*: PSNR ([\d.]+) dB, SSIM ([\d.]+)", result.output)
    base = re.search(r"baseline \(DDIM inversion, caption, w=7.5\): PSNR ([\d.]+) dB, SSIM ([\d.]+)", result.output)
    assert uam and base, result.output
    # the printed PSNR is the reconstruction's against the input (float decode vs the 8-bit file: within 0.1 dB)
    assert float(uam.group(1)) == pytest.approx(psnr(rgb(rec), rgb(path)), abs=0.1)
    assert 0 < float(uam.group(2)) <= 1 and 0 < float(base.group(2)) <= 1


def test_reconstruct_never_overwrites(image, tmp_path):
    path, _ = image
    out = tmp_path / "rec"
    assert run("reconstruct", path, "--out", out, "--steps", STEPS, "--no-baseline").exit_code == 0
    first = (out / "scene-reconstruction.png").read_bytes()
    (out / "scene-reconstruction.png").write_bytes(b"mine")  # the user's own file under that name
    result = run("reconstruct", path, "--out", out, "--steps", STEPS, "--no-baseline")
    assert result.exit_code == 0, result.output
    assert (out / "scene-reconstruction.png").read_bytes() == b"mine"
    assert (out / "scene-reconstruction-2.png").read_bytes() == first  # DDIM is deterministic
    assert (out / "scene-reconstruction-strip-2.png").is_file()
    assert "scene-reconstruction.png" in result.output and "suffix -2" in result.output
    assert "baseline" not in result.output


def test_edit_writes_edit_mask_strip_and_coverage(image, tmp_path):
    path, caption = image
    target = caption.replace("blue", "green") if "blue" in caption else "a green square on a red background"
    out = tmp_path / "edit"
    result = run("edit", path, "--source", caption, "--target", target, "--out", out, "--steps", STEPS,
                 "--recon-t", 1000)
    assert result.exit_code == 0, result.output
    for name in ("scene-edit.png", "scene-mask.png", "scene-edit-strip.png"):
        assert (out / name).is_file(), name
    coverage = float(re.search(r"mask coverage: ([\d.]+)% of the image", result.output).group(1))
    mask = rgb(out / "scene-mask.png")[..., 0]
    assert coverage == pytest.approx(100 * mask.mean(), abs=0.2)  # 8-bit file vs the float mask
    assert "mask source: UAM's adaptive mask" in result.output and f"step {STEPS}/{STEPS}" in result.output


def test_edit_without_mask_says_so(image, tmp_path):
    path, caption = image
    out = tmp_path / "edit"
    result = run("edit", path, "--source", caption, "--target", "a green circle", "--out", out, "--steps", STEPS,
                 "--mode", "masactrl")
    assert result.exit_code == 0, result.output
    assert "mask coverage: none" in result.output and "mode 'masactrl'" in result.output
    assert (out / "scene-edit.png").is_file() and not (out / "scene-mask.png").exists()


@pytest.fixture
def bad_inputs(image, tmp_path):
    from PIL import Image

    unreadable = tmp_path / "notes.png"
    unreadable.write_text("not an image")
    odd = tmp_path / "odd.png"
    Image.new("RGB", (60, 64)).save(odd)
    a_file = tmp_path / "taken"
    a_file.write_text("")
    return {"image": image[0], "unreadable": unreadable, "odd": odd, "file": a_file, "dir": tmp_path / "o"}


@pytest.mark.parametrize("command", ["reconstruct", "edit"])
@pytest.mark.parametrize("case, message", [
    ("missing", r"'IMAGE'.*does not exist"),
    ("unreadable", r"'IMAGE'.*cannot be read as an image.*accepted: PNG, JPEG"),
    ("odd", r"'IMAGE'.*IMAGE width: 60 is not accepted; accepted: a multiple of 8.*--size"),
    ("size", r"'--size'.*--size: 60 is not accepted; accepted: a multiple of 8"),
    ("out_is_file", r"'--out'.*is a file; accepted: a folder"),
])
def test_refusals_are_usage_errors(bad_inputs, command, case, message):
    image, out, extra = bad_inputs["image"], bad_inputs["dir"], []
    if case == "missing":
        image = bad_inputs["dir"] / "nowhere.png"
    elif case in ("unreadable", "odd"):
        image = bad_inputs[case]
    elif case == "size":
        extra = ["--size", "60"]
    elif case == "out_is_file":
        out = bad_inputs["file"]
    if command == "edit":
        extra += ["--source", "a", "--target", "b"]
    result = run(command, image, "--out", out, "--steps", 1, *extra)
    assert result.exit_code == 2, result.output
    assert re.search(message, " ".join(result.output.split())), result.output
    assert not bad_inputs["dir"].exists()  # nothing written


def test_unknown_mode_is_a_usage_error(image, tmp_path):
    result = run("edit", image[0], "--source", "a", "--target", "b", "--out", tmp_path / "o", "--mode", "blend")
    assert result.exit_code == 2
    assert "'--mode'" in result.output and "'blend' is not one of 'uam', 'masactrl'" in result.output


#----------------------------------------------------------------------------
# Batch jobs.

def write_jobs(folder, caption, lines=None):
    lines = lines or [
        {"kind": "reconstruct", "image": "scene.png", "prompt": caption, "steps": STEPS},
        {"kind": "edit", "image": "scene.png", "source": caption, "target": "a green circle on a red background",
         "steps": STEPS, "recon_t": 1000},
    ]
    path = folder / "jobs.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_job_kinds_parse_and_refuse(image):
    from guidekit.apps.jobs import JobError, parse_job

    folder = image[0].parent
    job = parse_job({"kind": "edit", "image": "scene.png", "source": "a", "target": "b"}, 3, base=folder)
    assert job.params["mode"] == "uam" and job.params["steps"] == 50 and job.seeds == [0]
    assert (job.params["width"], job.params["height"]) == (64, 64)
    for raw, message in [
        ({"kind": "blur", "image": "scene.png"},
         "line 3: kind: 'blur' is not accepted; accepted: 'reconstruct', 'edit'"),
        ({"kind": "edit", "image": "scene.png", "source": "a"}, "line 3: target: required"),
        ({"kind": "edit", "image": "scene.png", "source": "a", "target": "b", "mode": "blend"},
         "line 3: mode: expected one of 'uam', 'masactrl', got 'blend'"),
        ({"kind": "reconstruct", "image": "gone.png"}, "line 3: image: 'gone.png' not found"),
        ({"kind": "reconstruct", "image": "scene.png", "seeds": "0-3"}, "'seeds': not accepted in a 'reconstruct' job"),
    ]:
        with pytest.raises(JobError, match=re.escape(message)):
            parse_job(raw, 3, base=folder)


def test_batch_runs_records_and_resumes(image, embedded, tmp_path, capsys):
    import shutil

    from guidekit.apps import batch as batch_mod

    shutil.copy(image[0], tmp_path / "scene.png")
    jobs = write_jobs(tmp_path, image[1])
    out = tmp_path / "out"
    assert batch_mod.run_batch(jobs, out, pipe=embedded[0]) == 0
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert sorted(r["params"]["kind"] for r in rows) == ["edit", "reconstruct"]
    for row in rows:
        assert (out / row["file"]).is_file()
        if row["params"]["kind"] == "reconstruct":
            assert row["uam"]["psnr"] == pytest.approx(psnr(rgb(out / row["file"]), rgb(image[0])), abs=0.1)
            assert row["uam"]["baseline"]["setting"] == "DDIM inversion, caption, w=7.5"
        else:
            (mask_name,) = row["files"]
            assert mask_name == row["file"][:-4] + "-mask.png"
            assert row["uam"]["mask_coverage"] == pytest.approx(rgb(out / mask_name)[..., 0].mean(), abs=2e-3)
    assert "done: 2 generated, 0 already finished" in capsys.readouterr().err

    stamps = {r["file"]: (out / r["file"]).stat().st_mtime_ns for r in rows}
    assert batch_mod.run_batch(jobs, out, pipe=embedded[0]) == 0
    assert "done: 0 generated, 2 already finished" in capsys.readouterr().err
    assert {f: (out / f).stat().st_mtime_ns for f in stamps} == stamps
    assert len((out / "manifest.jsonl").read_text().splitlines()) == 2


def test_batch_refuses_an_image_off_the_size_rule(tmp_path, embedded, capsys):
    from PIL import Image

    from guidekit.apps import batch as batch_mod

    Image.new("RGB", (60, 64)).save(tmp_path / "odd.png")
    jobs = write_jobs(tmp_path, "", [{"kind": "reconstruct", "image": "odd.png", "steps": 1}])
    assert batch_mod.run_batch(jobs, tmp_path / "out", pipe=embedded[0]) == 1
    assert "line 1: image: 'odd.png' is 60x64; image width: 60 is not accepted; accepted: a multiple of 8" in \
        capsys.readouterr().err
