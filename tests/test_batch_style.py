"""`guidekit batch` style-transfer jobs (StyleID, StyleID + StyleSSP): fields, errors, manifest, resume, processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

os.environ["HF_HUB_OFFLINE"] = "1"

import torch  # noqa: E402

from guidekit.apps import batch as batch_mod  # noqa: E402
from guidekit.apps.jobs import JobError, fields_doc, parse_job, read_jobs  # noqa: E402
from test_batch import _start_hanging_run, manifest, pixels, subprocess_env, write_jobs  # noqa: E402

torch.set_num_threads(1)

SIZE = 32  # the tiny model's native size, a multiple of its VAE factor


@pytest.fixture(scope="module")
def tiny_pipe(tiny_sd_dir):
    from guidekit.apps.jobs import load_pipeline

    return load_pipeline(str(tiny_sd_dir))[0]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A job folder with images in img/: content.png, style.png (world images at SIZE), odd.png (not a multiple
    of 8), not-an-image.png."""
    from PIL import Image

    from guidekit.toy import world

    root = tmp_path_factory.mktemp("style-jobs")
    (root / "img").mkdir()
    for name, seed in (("content", 1), ("style", 2)):
        im = world.generate(seed).image
        im = (im if isinstance(im, Image.Image) else Image.fromarray(im)).convert("RGB").resize((SIZE, SIZE))
        im.save(root / "img" / f"{name}.png")
    Image.new("RGB", (SIZE + 4, SIZE), (10, 20, 30)).save(root / "img" / "odd.png")
    (root / "img" / "not-an-image.png").write_text("not an image")
    return root


IMAGES = {"content_image": "img/content.png", "style_image": "img/style.png"}


#----------------------------------------------------------------------------
# Parsing.

def test_style_fields_parse_and_default(folder):
    job = parse_job({**IMAGES, "style_prompt": " a red circle ", "seeds": "0-1"}, line=2, base=folder)
    p = job.params
    assert (p["start_point"], p["steps"], p["gamma"], p["temperature"], p["alpha"], p["inversion_guidance_scale"]) \
        == ("stylessp", 50, 0.75, 1.5, 0.7, 1.5)  # `guidekit style`'s defaults (w_inv 1.5: its scale 0.5)
    assert p["style_prompt"] == "a red circle" and p["content_prompt"] is None
    assert (p["width"], p["height"]) == (SIZE, SIZE) and job.seeds == [0, 1]
    assert p["content_image"] == "img/content.png"  # as written: the same key on any machine
    assert job.files["content_image"] == str(folder / "img" / "content.png") and len(p["style_image_sha256"]) == 64
    assert not {"prompt", "guidance", "guidance_scale"} & set(p)
    # no style prompt: frequency start point only; plain StyleID has no StyleSSP fields
    assert parse_job(IMAGES, base=folder).params["inversion_guidance_scale"] == 1.0
    plain = parse_job({**IMAGES, "start_point": "styleid", "gamma": 0.3, "steps": 4}, base=folder).params
    assert "alpha" not in plain and "inversion_guidance_scale" not in plain and plain["gamma"] == 0.3
    # text-to-image jobs keep their parameters (and keys) as before
    assert "content_image" not in parse_job({"prompt": "x"}).params
    doc = fields_doc()
    for name in ("content_image", "style_image", "start_point", "content_prompt", "style_prompt", "alpha"):
        assert f"`{name}`" in doc


def test_paths_are_relative_to_the_job_file(folder, tmp_path, monkeypatch):
    jobs = write_jobs(folder / "jobs.jsonl", {**IMAGES, "seed": 3, "start_point": "styleid"})
    monkeypatch.chdir(tmp_path)  # not the job file's folder
    (job,), errors = read_jobs(jobs)
    assert errors == [] and job.files["style_image"] == str(folder / "img" / "style.png")
    csv = folder / "jobs.csv"
    csv.write_text("content_image,style_image,start_point,style_prompt,alpha,seed\n"
                   "img/content.png,img/style.png,stylessp,a red circle,0.5,1\n"
                   "img/content.png,img/style.png,ssp,,,1\n")
    jobs, errors = read_jobs(csv)
    assert [j.params["alpha"] for j in jobs] == [0.5]
    assert errors == [(3, "line 3: start_point: expected one of 'styleid', 'stylessp', got 'ssp'")]


@pytest.mark.parametrize("raw, message", [
    ({"content_image": "img/missing.png", "style_image": "img/style.png"},
     "line 3: content_image: 'img/missing.png' not found (looked for {folder}/img/missing.png); accepted: an image "
     "file (PNG, JPEG, ...), its path relative to the job file's folder or absolute"),
    ({"content_image": "img", "style_image": "img/style.png"}, "line 3: content_image: 'img' is not a file"),
    ({**IMAGES, "style_image": "img/not-an-image.png"},
     "line 3: style_image: 'img/not-an-image.png' cannot be read as an image"),
    ({**IMAGES, "content_image": "img/odd.png"}, "line 3: content_image: 'img/odd.png' is 36x32; content_image width"),
    ({**IMAGES, "start_point": "ssp"}, "line 3: start_point: expected one of 'styleid', 'stylessp', got 'ssp'"),
    ({**IMAGES, "prompt": "a red circle"}, "line 3: prompt: not accepted in a style-transfer job"),
    ({**IMAGES, "guidance": "apg", "guidance_scale": 9},
     "line 3: guidance, guidance_scale: not accepted in a style-transfer job"),
    ({**IMAGES, "width": 32}, "line 3: width: not accepted in a style-transfer job (one with content_image and "
                              "style_image: the output has the content image's size"),
    ({**IMAGES, "classifier": "c", "label": "red"}, "line 3: classifier, label: not accepted in a style-transfer job"),
    ({"prompt": "x", "style_prompt": "a red circle"},
     'line 3: style_prompt: only applies to style-transfer jobs; accepted: together with "content_image" and '
     '"style_image"'),
    ({"content_image": "img/content.png"}, "line 3: style_image: required with content_image"),
    ({**IMAGES, "start_point": "styleid", "alpha": 0.5},
     "line 3: alpha: only applies to start_point 'stylessp', but this job has start_point 'styleid'"),
    ({**IMAGES, "inversion_guidance_scale": 1.5}, "line 3: inversion_guidance_scale: 1.5 needs style_prompt"),
    ({**IMAGES, "style_prompt": "x", "inversion_guidance_scale": 0.5},
     r"line 3: inversion_guidance_scale: expected a number in [1.0, 11.0], got 0.5"),
    ({**IMAGES, "gamma": 2}, r"line 3: gamma: expected a number in [0.0, 1.0], got 2"),
    ({**IMAGES, "temperature": 0}, "line 3: temperature: expected a number in (0.0, 100.0], got 0"),
    ({**IMAGES, "seed": 1, "seeds": "0-1"}, "line 3: seed and seeds: give one of them, not both"),
])
def test_style_field_errors_name_the_line_and_what_is_accepted(folder, raw, message):
    with pytest.raises(JobError) as e:
        parse_job(raw, line=3, base=folder)
    assert message.format(folder=folder) in str(e.value)


#----------------------------------------------------------------------------
# Runs.

def test_style_jobs_generate_record_and_resume(folder, tmp_path, tiny_pipe, tiny_sd_dir, capsys, monkeypatch):
    from PIL import Image

    import guidekit
    from guidekit.apps.style import style_pipeline

    monkeypatch.chdir(tmp_path)
    ssp = {**IMAGES, "seeds": "0-1", "steps": 2, "style_prompt": "a red circle", "content_prompt": "a blue square"}
    jobs = write_jobs(folder / "run.jsonl",
                      ssp,
                      {**IMAGES, "seed": 0, "steps": 2, "start_point": "styleid", "name": "plain"},
                      {"content_image": "img/missing.png", "style_image": "img/style.png"},
                      {"prompt": "a red circle", "seed": 0, "steps": 2})
    out = tmp_path / "out"
    assert batch_mod.run_batch(jobs, out, model=str(tiny_sd_dir), pipe=tiny_pipe) == 0
    err = capsys.readouterr().err
    assert "skipped line 3: content_image: 'img/missing.png' not found" in err
    assert "4 generated" in err and "1 bad line(s) skipped" in err

    rows = {(r["line"], r["seed"]): r for r in manifest(out)}
    assert sorted(rows) == [(1, 0), (1, 1), (2, 0), (4, 0)]
    first = rows[1, 0]
    assert first["file"].startswith("content-in-the-style-of-style-") and rows[2, 0]["file"].startswith("plain-")
    assert first["params"]["start_point"] == "stylessp" and first["params"]["inversion_guidance_scale"] == 1.5
    assert first["job"]["content_image"] == "img/content.png"
    for r in rows.values():
        assert batch_mod._sha256((out / r["file"]).read_bytes()) == r["sha256"]
    png = Image.open(out / first["file"])
    assert png.size == (SIZE, SIZE)
    assert json.loads(png.text["guidekit"])["params"] == first["params"]
    assert "content in the style of style" in png.text["parameters"] and "start_point: stylessp" in png.text["parameters"]
    assert str(folder) not in png.text["guidekit"]  # no local path in the image

    # The images are the library's: StyleID + StyleSSP (alpha 0.7, w_inv 1.5) with the seed's generator.
    content, style = (Image.open(folder / IMAGES[k]).convert("RGB") for k in ("content_image", "style_image"))
    spipe = style_pipeline(tiny_pipe)
    expected = spipe.transfer(content, style, num_inference_steps=2, hooks=[guidekit.StyleSSP(alpha=0.7)],
                              content_prompt="a blue square", style_prompt="a red circle",
                              generator=torch.Generator().manual_seed(1), output_type="pil").images[0]
    assert np.abs(pixels(out / rows[1, 1]["file"]) - np.asarray(expected, dtype=np.int16)).max() <= 1
    plain = spipe.transfer(content, style, num_inference_steps=2, output_type="pil").images[0]
    assert np.abs(pixels(out / rows[2, 0]["file"]) - np.asarray(plain, dtype=np.int16)).max() <= 1
    assert np.abs(pixels(out / rows[1, 0]["file"]) - pixels(out / rows[2, 0]["file"])).max() > 1

    # A rerun finds every image finished; a changed setting is a new image, the finished ones stay.
    stamps = {r["file"]: (out / r["file"]).stat().st_mtime_ns for r in rows.values()}
    assert batch_mod.run_batch(jobs, out, model=str(tiny_sd_dir), pipe=tiny_pipe) == 0
    assert "0 generated, 4 already finished" in capsys.readouterr().err
    more = write_jobs(folder / "more.jsonl", {**ssp, "seeds": "0", "alpha": 1.0})
    assert batch_mod.run_batch(more, out, model=str(tiny_sd_dir), pipe=tiny_pipe) == 0
    assert "1 generated, 0 already finished" in capsys.readouterr().err
    assert {f: (out / f).stat().st_mtime_ns for f in stamps} == stamps and len(manifest(out)) == 5


def test_style_job_on_a_model_without_styleid_is_a_bad_line(folder, tmp_path, tiny_pipe, monkeypatch, capsys):
    import guidekit.apps.jobs as jobs_mod

    monkeypatch.setattr(jobs_mod, "styleid_supported", lambda pipe: False)
    jobs = write_jobs(folder / "sdxl.jsonl", {**IMAGES, "seed": 0, "steps": 2})
    assert batch_mod.run_batch(jobs, tmp_path / "out", pipe=tiny_pipe) == 1
    assert "skipped line 1: content_image: style transfer (StyleID) needs a Stable Diffusion 1.x/2.x model" in \
        capsys.readouterr().err


def test_style_resume_after_kill(folder, tmp_path, tiny_pipe, tiny_sd_dir):
    jobs = write_jobs(folder / "kill.jsonl", {**IMAGES, "seeds": "0-2", "steps": 2, "style_prompt": "a red circle"},
                      {**IMAGES, "seed": 5, "steps": 2, "start_point": "styleid"})
    out = tmp_path / "out"
    first = write_jobs(folder / "first.jsonl", {**IMAGES, "seed": 5, "steps": 2, "start_point": "styleid"})
    assert batch_mod.run_batch(first, out, model=str(tiny_sd_dir), pipe=tiny_pipe) == 0
    (done,) = out.glob("*.png")
    stamp = done.stat().st_mtime_ns

    proc = _start_hanging_run(jobs, out, tiny_sd_dir)  # blocks before renaming its first new image, then killed
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    proc.stderr.close()
    assert len(list(out.glob("*.png"))) == 1 and len(list(out.glob(".*.tmp"))) == 1

    assert batch_mod.run_batch(jobs, out, model=str(tiny_sd_dir), pipe=tiny_pipe) == 0
    rows = manifest(out)
    assert sorted(r["seed"] for r in rows) == [0, 1, 2, 5]
    assert next(r for r in rows if r["seed"] == 5)["file"] == done.name  # its row is the first run's
    assert len(list(out.glob("*.png"))) == 4 and not list(out.glob(".*.tmp"))
    assert done.stat().st_mtime_ns == stamp  # the finished image was not redone
    for r in rows:
        assert batch_mod._sha256((out / r["file"]).read_bytes()) == r["sha256"]


def test_style_two_processes_match_one(folder, tmp_path, tiny_pipe, tiny_sd_dir):
    jobs = write_jobs(folder / "two.jsonl", {**IMAGES, "seeds": "0-2", "steps": 2, "style_prompt": "a red circle"},
                      {**IMAGES, "seed": 0, "steps": 2, "start_point": "styleid"})
    one, two = tmp_path / "one", tmp_path / "two"
    assert batch_mod.run_batch(jobs, one, model=str(tiny_sd_dir), pipe=tiny_pipe) == 0
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           "-m", "guidekit.apps.batch", str(jobs), "--out", str(two), "--model", str(tiny_sd_dir)]
    res = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "4 generated" in res.stderr and "2 process(es)" in res.stderr
    rows1, rows2 = manifest(one), manifest(two)
    assert {r["process"] for r in rows2} == {0, 1}
    assert sorted((r["file"], r["sha256"]) for r in rows1) == sorted((r["file"], r["sha256"]) for r in rows2)
