"""`guidekit batch` jobs with a classifier (EluCD or plain classifier guidance): fields, manifest, resume, errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"

import torch  # noqa: E402

from guidekit.apps import batch as batch_mod  # noqa: E402
from guidekit.apps.jobs import ClassifierCache, JobError, fields_doc, parse_job, read_jobs  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory):
    """A tiny random transformers ResNet with three named labels and its preprocessor config, saved to a folder."""
    from guidekit.testing import PLAIN_PROCESSOR, make_tiny_classifier

    return make_tiny_classifier(tmp_path_factory.mktemp("tiny-resnet-batch"), processor=PLAIN_PROCESSOR)


@pytest.fixture(scope="module")
def tiny_pipe(tiny_sd_dir):
    from guidekit.apps.jobs import load_pipeline

    return load_pipeline(str(tiny_sd_dir))[0]


def write_jobs(path: Path, *lines) -> Path:
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return path


def manifest(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def test_classifier_fields_parse_and_default():
    job = parse_job({"prompt": "x", "classifier": "some/folder", "label": "green"})
    # classifier_scale and steps: None until `resolve` knows the model and the classifier (`classifier_defaults`)
    assert {k: job.params[k] for k in ("classifier", "label", "classifier_scale", "calibration", "steps")} == \
        {"classifier": "some/folder", "label": "green", "classifier_scale": None, "calibration": "elucd", "steps": None}
    given = parse_job({"prompt": "x", "classifier": "c", "label": 1, "classifier_scale": 2, "steps": 3}).params
    assert (given["classifier_scale"], given["steps"]) == (2.0, 3)
    assert parse_job({"prompt": "x", "classifier": "c", "label": 2}).params["label"] == 2
    plain = parse_job({"prompt": "x"}).params
    assert not {"classifier", "label", "classifier_scale", "calibration"} & set(plain)  # keys of old jobs unchanged
    doc = fields_doc()
    for name in ("`classifier`", "`label`", "`classifier_scale`", "`calibration`"):
        assert name in doc


def test_an_empty_prompt_is_accepted_with_a_classifier(tiny_pipe, classifier_dir):
    """Unconditional classifier guidance, as `guidekit generate "" --classifier` runs it: scale 1 by default."""
    from guidekit.apps.jobs import resolve

    job = parse_job({"prompt": "", "classifier": str(classifier_dir), "label": "red"})
    params = resolve(job.params, tiny_pipe)
    assert (params["prompt"], params["guidance_scale"], params["label"]) == ("", 1.0, 0)
    with pytest.raises(JobError, match="line 2: prompt: required, a non-empty string"):
        parse_job({"prompt": ""}, line=2)


@pytest.mark.parametrize("raw, message", [
    ({"label": "red"}, "line 3: label: given without classifier"),
    ({"classifier_scale": 2}, "line 3: classifier_scale: given without classifier"),
    ({"classifier": "c"}, "line 3: label: required with classifier"),
    ({"classifier": "c", "label": True}, "line 3: label: expected a class id"),
    ({"classifier": "c", "label": "red", "calibration": "other"}, "line 3: calibration: expected one of 'elucd'"),
    ({"classifier": "c", "label": "red", "classifier_scale": -1}, "line 3: classifier_scale: expected a number"),
])
def test_classifier_field_errors_name_the_line(raw, message):
    with pytest.raises(JobError) as e:
        parse_job({"prompt": "x", **raw}, line=3)
    assert message in str(e.value)


def test_job_with_classifier_generates_records_and_resumes(tmp_path, tiny_pipe, tiny_sd_dir, classifier_dir, capsys,
                                                           monkeypatch):
    loads = []
    real_load = ClassifierCache._load
    monkeypatch.setattr(ClassifierCache, "_load", staticmethod(lambda path: loads.append(path) or real_load(path)))
    clf = str(classifier_dir)
    jobs = write_jobs(
        tmp_path / "jobs.jsonl",
        {"prompt": "a red circle", "seeds": "0-1", "steps": 2, "classifier": clf, "label": "Green",
         "classifier_scale": 50},
        {"prompt": "a red circle", "seed": 0, "steps": 2},  # the same image without a classifier
        {"prompt": "a red circle", "seed": 0, "steps": 2, "classifier": clf, "label": "1", "classifier_scale": 50,
         "calibration": "plain"},
        {"prompt": "a red circle", "seed": 0, "steps": 2, "classifier": clf, "label": "purple"},
        {"prompt": "a red circle", "seed": 0, "steps": 2, "classifier": str(tmp_path / "missing"), "label": "red"},
        {"prompt": "a red circle", "seed": 0, "steps": 2, "classifier": "nobody/no-such-classifier", "label": "red"},
    )
    out = tmp_path / "out"
    assert batch_mod.run_batch(jobs, out, model=str(tiny_sd_dir), pipe=tiny_pipe) == 0
    err = capsys.readouterr().err
    assert "skipped line 4: label: 'purple' is not a label of this classifier" in err and "'green'" in err
    assert "skipped line 5: classifier:" in err and "is not a folder" in err
    assert "skipped line 6: classifier: cannot load 'nobody/no-such-classifier' (a hub id needs network access" in err
    assert "4 generated" in err and "3 bad line(s) skipped" in err
    assert loads.count(clf) == 1  # one load for the three lines that name it

    rows = {(r["line"], r["seed"]): r for r in manifest(out)}
    assert sorted(rows) == [(1, 0), (1, 1), (2, 0), (3, 0)]
    elucd = rows[1, 0]
    assert {k: elucd["params"][k] for k in ("classifier", "label", "classifier_scale", "calibration")} == \
        {"classifier": clf, "label": 1, "classifier_scale": 50.0, "calibration": "elucd"}
    assert elucd["job"]["label"] == "Green"  # as written; params hold the resolved class id
    assert elucd["classifier"]["id"] == clf and len(elucd["classifier"]["sha256"]) == 64
    assert "classifier" not in rows[2, 0] and "classifier" not in rows[2, 0]["params"]
    assert rows[3, 0]["params"]["calibration"] == "plain"
    files = {k: r["file"] for k, r in rows.items()}
    assert len(set(files.values())) == 4  # classifier fields are part of the key
    from PIL import Image

    png = Image.open(out / files[1, 0])
    assert "calibration: elucd" in png.text["parameters"] and "label: 1" in png.text["parameters"]
    assert json.loads(png.text["guidekit"])["params"]["classifier_scale"] == 50.0
    pixels = {k: Image.open(out / f).tobytes() for k, f in files.items()}
    assert pixels[1, 0] != pixels[2, 0] and pixels[1, 0] != pixels[3, 0]  # the correction acts

    # A rerun (the label now given by id) finds every image finished and regenerates nothing.
    stamps = {f: (out / f).stat().st_mtime_ns for f in files.values()}
    jobs2 = write_jobs(
        tmp_path / "jobs2.jsonl",
        {"prompt": "a red circle", "seeds": "0-1", "steps": 2, "classifier": clf, "label": 1, "classifier_scale": 50},
        {"prompt": "a red circle", "seed": 0, "steps": 2},
        {"prompt": "a red circle", "seed": 0, "steps": 2, "classifier": clf, "label": "green", "classifier_scale": 50,
         "calibration": "plain"},
    )
    assert batch_mod.run_batch(jobs2, out, model=str(tiny_sd_dir), pipe=tiny_pipe) == 0
    err = capsys.readouterr().err
    assert "0 generated, 4 already finished" in err
    assert {f: (out / f).stat().st_mtime_ns for f in files.values()} == stamps


def test_read_jobs_reports_classifier_errors_per_line(tmp_path):
    jobs = write_jobs(tmp_path / "jobs.jsonl", {"prompt": "ok"}, {"prompt": "x", "label": "red"},
                      {"prompt": "y", "classifier": "c"})
    parsed, errors = read_jobs(jobs)
    assert [j.line for j in parsed] == [1]
    assert [line for line, _ in errors] == [2, 3]
    assert "label: given without classifier" in errors[0][1] and "label: required with classifier" in errors[1][1]


# ------------------------------------------------------------- the embedded model's recommended EluCD settings

# Stand-ins for guidekit.toy.RECOMMENDED_ELUCD / RECOMMENDED_ELUCD_SAMPLER, distinct from every default.
DISTINCT_ELUCD = {"scale": 7.0, "softplus_beta": 2.0, "joint_temperature": 0.9, "marginal_temperature": 0.4,
                  "schedule": "ddpm", "gamma": 0.2, "start": 0.25, "stop": 0.75}
DISTINCT_SAMPLER = {"scheduler": "ddpm", "steps": 2}


@pytest.fixture
def embedded_pair(tiny_sd_dir, classifier_dir, monkeypatch):
    """The tiny checkpoint and the tiny classifier stand for the embedded model and classifier."""
    import guidekit.toy

    monkeypatch.setattr(guidekit.toy, "RECOMMENDED_ELUCD", dict(DISTINCT_ELUCD))
    monkeypatch.setattr(guidekit.toy, "RECOMMENDED_ELUCD_SAMPLER", dict(DISTINCT_SAMPLER))
    monkeypatch.setattr(guidekit.toy, "default_model_path", lambda: Path(tiny_sd_dir))
    monkeypatch.setattr(guidekit.toy, "default_classifier_path", lambda: Path(classifier_dir))


class _StandIn:
    """Just enough of a pipeline for `resolve`: native size 32, VAE factor 8."""

    vae_scale_factor = 8

    class unet:
        class config:
            sample_size = 4


def test_jobs_without_a_classifier_keep_their_keys(monkeypatch):
    """The keys such jobs had before the classifier defaults existed, when they spell out the values that were
    the defaults then (CFG, 7.5, 25 steps): their resolved params have the same fields."""
    from guidekit.apps import jobs as jobs_mod

    monkeypatch.setattr(jobs_mod, "check_image_memory", lambda *a, **k: None)
    old = {"guidance": "cfg", "guidance_scale": 7.5, "steps": 25}
    for raw, key in (({"prompt": "a red circle", "seed": 0, **old}, "693120d86b8e"),
                     ({"prompt": "a red circle", "seed": 0, "steps": 2, "guidance": "apg", "guidance_scale": 7.5},
                      "c394f5619baa")):
        params = jobs_mod.resolve(parse_job(raw).params, _StandIn(), embedded=False)
        assert jobs_mod.job_key(params, "guidekit-toy-sd") == key
        assert "scheduler" not in params and "classifier_settings" not in params
    # on the embedded model too (APG aside, the same params)
    params = jobs_mod.resolve(parse_job({"prompt": "a red circle", "seed": 0, **old}).params, _StandIn(),
                              embedded=True)
    assert jobs_mod.job_key(params, "guidekit-toy-sd") == "693120d86b8e"


def test_resolve_fills_the_recommendation_for_the_embedded_pair(embedded_pair, tiny_pipe, classifier_dir, monkeypatch):
    from guidekit.apps.jobs import job_key, resolve

    clf = str(classifier_dir)
    params = resolve(parse_job({"prompt": "x", "classifier": clf, "label": "green"}).params, tiny_pipe, embedded=True)
    assert params["classifier_scale"] == 7.0 and params["steps"] == 2 and params["scheduler"] == "ddpm"
    assert params["classifier_settings"] == {k: v for k, v in DISTINCT_ELUCD.items() if k != "scale"}
    hook = ClassifierCache().hook(params)
    assert {k: getattr(hook, k) for k in DISTINCT_ELUCD} == DISTINCT_ELUCD

    # the job's own scale and steps win; the rest of the recommendation stays
    given = resolve(parse_job({"prompt": "x", "classifier": clf, "label": "green", "classifier_scale": 4,
                               "steps": 3}).params, tiny_pipe, embedded=True)
    assert (given["classifier_scale"], given["steps"], given["scheduler"]) == (4.0, 3, "ddpm")
    assert given["classifier_settings"] == params["classifier_settings"]

    # plain classifier guidance: the same schedule and window, uncalibrated
    plain = resolve(parse_job({"prompt": "x", "classifier": clf, "label": "green", "calibration": "plain"}).params,
                    tiny_pipe, embedded=True)
    assert plain["classifier_settings"] == {"schedule": "ddpm", "start": 0.25, "stop": 0.75}
    hook = ClassifierCache().hook(plain)
    assert (type(hook).__name__, hook.scale, hook.start, hook.stop, hook.gamma) == ("ClassifierGuidance", 7.0, 0.25,
                                                                                     0.75, 0.0)

    # another model (embedded=False), or another classifier: the paper's defaults, and the params (so the keys)
    # such a job had before
    # such a job had before (with the method and scale that were the defaults then spelled out)
    then = {"guidance": "cfg", "guidance_scale": 7.5}
    old = {**parse_job({"prompt": "x", "classifier": clf, "label": 1, **then}).params, "classifier_scale": 1.0,
           "steps": 25, "width": 32, "height": 32}
    other = resolve(parse_job({"prompt": "x", "classifier": clf, "label": "green", **then}).params, tiny_pipe,
                    embedded=False)
    assert other == old and job_key(other, "m") == job_key(old, "m")
    import guidekit.toy

    monkeypatch.setattr(guidekit.toy, "default_classifier_path", lambda: Path("/nowhere/else"))
    assert resolve(parse_job({"prompt": "x", "classifier": clf, "label": 1, **then}).params, tiny_pipe,
                   embedded=True) == old


def test_batch_runs_the_embedded_pair_with_the_recommended_sampler(embedded_pair, tmp_path, tiny_pipe, tiny_sd_dir,
                                                                    classifier_dir, capsys, monkeypatch):
    from guidekit.pipelines import GuidedStableDiffusionPipeline

    seen = []
    real = GuidedStableDiffusionPipeline.__call__

    def spy(self, *args, **kwargs):
        seen.append((type(self.scheduler).__name__, kwargs["num_inference_steps"],
                     [type(h).__name__ for h in kwargs.get("hooks") or []]))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(GuidedStableDiffusionPipeline, "__call__", spy)
    own = tiny_pipe.scheduler
    jobs = write_jobs(tmp_path / "jobs.jsonl",
                      {"prompt": "a red circle", "seed": 0, "classifier": str(classifier_dir), "label": "green"},
                      {"prompt": "a red circle", "seed": 0, "steps": 2})
    out = tmp_path / "out"
    assert batch_mod.run_batch(jobs, out, model=str(tiny_sd_dir), pipe=tiny_pipe) == 0
    assert "2 generated" in capsys.readouterr().err
    # APG: the default method of image jobs, with or without a classifier
    assert sorted(seen) == [("DDIMScheduler", 2, ["APG"]), ("DDPMScheduler", 2, ["APG", "EluCD"])]
    assert tiny_pipe.scheduler is own  # the pipeline's own scheduler is back
    rows = {r["line"]: r for r in manifest(out)}
    params = rows[1]["params"]
    assert (params["scheduler"], params["steps"], params["classifier_scale"]) == ("ddpm", 2, 7.0)
    assert params["classifier_settings"]["start"] == 0.25
    assert "scheduler" not in rows[2]["params"]
    from PIL import Image

    assert "Sampler: DDPMScheduler" in Image.open(out / rows[1]["file"]).text["parameters"]
    assert "Sampler: DDIMScheduler" in Image.open(out / rows[2]["file"]).text["parameters"]
