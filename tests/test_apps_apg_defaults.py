"""APG's eta / norm_threshold / momentum defaults in `guidekit generate`, `guidekit batch` and the demo.

The rule: a value the user gives always wins; otherwise the embedded model gets its recommended setting
(`guidekit.toy.RECOMMENDED_APG`) and any other model the paper's SDXL values (`guidekit.APG`'s defaults).
The recommendation is replaced here by a distinctive value, so that the tests never depend on the real one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

import torch  # noqa: E402
from click.testing import CliRunner  # noqa: E402

torch.set_num_threads(1)

DISTINCT = {"eta": 0.25, "norm_threshold": 3.5, "momentum": -0.1}
PAPER = {"eta": 0.0, "norm_threshold": 15.0, "momentum": -0.5}


@pytest.fixture
def recommended(monkeypatch):
    import guidekit.toy

    monkeypatch.setattr(guidekit.toy, "RECOMMENDED_APG", dict(DISTINCT))
    return DISTINCT


@pytest.fixture
def tiny_is_embedded(tiny_sd_dir, monkeypatch):
    """Make the tiny test checkpoint stand for the embedded model (everything else about it is the same)."""
    import guidekit.toy

    monkeypatch.setattr(guidekit.toy, "default_model_path", lambda: Path(tiny_sd_dir))
    return tiny_sd_dir


@pytest.fixture
def apg_built(monkeypatch):
    """The arguments of every `guidekit.APG` hook built while the test runs."""
    import guidekit

    built = []

    class RecordingAPG(guidekit.APG):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append({"eta": self.eta, "norm_threshold": self.norm_threshold, "momentum": self.momentum})

    monkeypatch.setattr(guidekit, "APG", RecordingAPG)
    return built


@pytest.fixture(scope="module")
def tiny_pipe(tiny_sd_dir):
    from guidekit.apps.jobs import load_pipeline

    return load_pipeline(str(tiny_sd_dir))[0]


#----------------------------------------------------------------------------
# guidekit generate

def _generate(tmp_path, *args):
    from guidekit.apps.cli import main

    out = tmp_path / f"x{len(list(tmp_path.glob('*.png')))}.png"
    result = CliRunner().invoke(main, ["generate", "a red circle on a blue background", "--steps", "1",
                                       "--scale", "9", "--out", str(out), *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert out.exists()
    return result


def test_generate_embedded_model_gets_the_recommended_setting(tiny_is_embedded, recommended, apg_built, tmp_path):
    _generate(tmp_path)  # no --model: the embedded model
    _generate(tmp_path, "--model", str(tiny_is_embedded))  # the same folder, named
    assert apg_built == [DISTINCT, DISTINCT]


def test_generate_user_values_win(tiny_is_embedded, recommended, apg_built, tmp_path):
    _generate(tmp_path, "--norm-threshold", "15")
    _generate(tmp_path, "--eta", "0", "--momentum", "0.3")
    _generate(tmp_path, "--no-rescale", "--norm-threshold", "7")
    assert apg_built == [dict(DISTINCT, norm_threshold=15.0), dict(DISTINCT, eta=0.0, momentum=0.3),
                         dict(DISTINCT, norm_threshold=None)]


def test_generate_other_models_get_the_paper_values(tiny_sd_dir, recommended, apg_built, tmp_path):
    _generate(tmp_path, "--model", str(tiny_sd_dir))
    _generate(tmp_path, "--model", str(tiny_sd_dir), "--momentum", "0")
    assert apg_built == [PAPER, dict(PAPER, momentum=0.0)]


def test_generate_with_the_real_embedded_model(recommended, apg_built, tmp_path):
    from guidekit.apps.generate import default_model

    try:
        default_model()
    except Exception as e:  # noqa: BLE001 - a build without the embedded model
        pytest.skip(f"no embedded model: {e}")
    _generate(tmp_path)
    assert apg_built == [DISTINCT]


#----------------------------------------------------------------------------
# guidekit batch

def _jobs(path: Path, *jobs) -> Path:
    path.write_text("".join(json.dumps(j) + "\n" for j in jobs))
    return path


def _rows(out: Path) -> dict:
    return {r["line"]: r for r in (json.loads(l) for l in (out / "manifest.jsonl").read_text().splitlines())}


BATCH_JOBS = (
    {"prompt": "a red circle", "seed": 1, "steps": 2, "guidance": "apg", "guidance_scale": 9},
    {"prompt": "a red circle", "seed": 1, "steps": 2, "guidance": "apg", "guidance_scale": 9, "norm_threshold": 15},
    {"prompt": "a red circle", "seed": 1, "steps": 2, "guidance": "apg", "guidance_scale": 9, "norm_threshold": 0,
     "eta": 1.0},
    {"prompt": "a red circle", "seed": 1, "steps": 2, "guidance": "cfg", "guidance_scale": 9},
)


def test_batch_embedded_model_records_the_recommended_setting(tiny_is_embedded, tiny_pipe, recommended, apg_built,
                                                              tmp_path, capsys):
    from PIL import Image

    from guidekit.apps import batch as batch_mod

    jobs = _jobs(tmp_path / "jobs.jsonl", *BATCH_JOBS)
    out = tmp_path / "out"
    assert batch_mod.run_batch(jobs, out, model=str(tiny_is_embedded), pipe=tiny_pipe) == 0
    rows = _rows(out)
    expected = {1: DISTINCT, 2: dict(DISTINCT, norm_threshold=15.0), 3: dict(DISTINCT, norm_threshold=0.0, eta=1.0)}
    for line, values in expected.items():
        params = rows[line]["params"]
        assert {k: params[k] for k in values} == values, line
        text = Image.open(out / rows[line]["file"]).text  # the PNG says the same as the manifest
        assert json.loads(text["guidekit"])["params"] == params
        assert f"norm_threshold: {values['norm_threshold']}" in text["parameters"]
        assert rows[line]["job"] == BATCH_JOBS[line - 1]  # the job as written, beside the resolved values
    assert "eta" not in rows[4]["params"]  # CFG has no APG parameters
    # the hooks were built from the recorded values (norm_threshold 0 is "no rescaling" for the hook)
    assert sorted(map(str, apg_built)) == sorted(map(str, [DISTINCT, dict(DISTINCT, norm_threshold=15.0),
                                                           dict(DISTINCT, norm_threshold=None, eta=1.0)]))
    # a rerun finds every image finished
    capsys.readouterr()
    assert batch_mod.run_batch(jobs, out, model=str(tiny_is_embedded), pipe=tiny_pipe) == 0
    assert "0 generated, 4 already finished" in capsys.readouterr().err


def test_batch_other_models_record_the_paper_values(tiny_sd_dir, tiny_pipe, recommended, tmp_path, capsys):
    from guidekit.apps import batch as batch_mod

    jobs = _jobs(tmp_path / "jobs.jsonl", *BATCH_JOBS[:3])
    out = tmp_path / "out"
    assert batch_mod.run_batch(jobs, out, model=str(tiny_sd_dir), pipe=tiny_pipe) == 0
    rows = _rows(out)
    assert {k: rows[1]["params"][k] for k in PAPER} == PAPER
    assert {k: rows[3]["params"][k] for k in PAPER} == dict(PAPER, norm_threshold=0.0, eta=1.0)
    # line 2 gives norm_threshold 15, the paper's value: the same resolved job as line 1, generated once
    assert 2 not in rows and "line 2: seed 1 repeats an earlier job" in capsys.readouterr().err


def test_resolve_fills_apg_defaults_by_model(tiny_pipe, recommended, monkeypatch):
    import guidekit.toy
    from guidekit.apps.jobs import job_key, parse_job, resolve

    job = parse_job({"prompt": "x", "guidance": "apg", "momentum": 0.2})
    embedded = resolve(job.params, tiny_pipe, embedded=True)
    other = resolve(job.params, tiny_pipe, embedded=False)
    assert {k: embedded[k] for k in DISTINCT} == dict(DISTINCT, momentum=0.2)
    assert {k: other[k] for k in PAPER} == dict(PAPER, momentum=0.2)
    assert {k: resolve(job.params, tiny_pipe)[k] for k in PAPER} == dict(PAPER, momentum=0.2)  # read from the pipe
    # a new recommendation gives new resolved values, hence new file names: a rerun never reuses old images
    monkeypatch.setattr(guidekit.toy, "RECOMMENDED_APG", dict(DISTINCT, norm_threshold=2.0))
    again = resolve(job.params, tiny_pipe, embedded=True)
    assert again["norm_threshold"] == 2.0 and job_key(again, "m") != job_key(embedded, "m")


#----------------------------------------------------------------------------
# The demo

def _component(app, elem_id):
    found = [b for b in app.blocks.values() if getattr(b, "elem_id", None) == elem_id]
    assert len(found) == 1, elem_id
    return found[0]


@pytest.mark.parametrize("embedded", [True, False])
def test_demo_sliders_start_at_the_model_defaults(tiny_pipe, tiny_sd_dir, recommended, embedded, request):
    from guidekit.apps.demo import Limits, build_demo

    if embedded:
        request.getfixturevalue("tiny_is_embedded")
    app = build_demo(tiny_pipe, str(tiny_sd_dir), Limits(max_steps=8, max_size=64))
    expected = DISTINCT if embedded else PAPER
    for tab in ("gen", "sweep"):
        for key, field in (("eta", "eta"), ("norm", "norm_threshold"), ("momentum", "momentum")):
            slider = _component(app, f"{tab}-{key}")
            assert slider.value == expected[field], (tab, field)
            assert f"default {expected[field]:g}" in slider.label
            assert ("RECOMMENDED_APG" if embedded else "paper's SDXL value") in slider.info
    app.close()


def test_demo_sweep_default_reaches_high_scales(tiny_pipe):
    from guidekit.apps.demo import Limits, build_demo, default_sweep_scales, parse_scales

    for limits in (Limits(), Limits(max_steps=8, max_size=64)):
        assert max(parse_scales(default_sweep_scales(limits), limits)) >= 15
    app = build_demo(tiny_pipe, "tiny", Limits(max_steps=8, max_size=64))
    values = parse_scales(_component(app, "sweep-scales").value, Limits())
    assert max(values) >= 15 and min(values) <= 1
    table = _component(app, "sweep-table")
    assert "CFG clipped" in table.headers and "APG clipped" in table.headers
    app.close()


def test_demo_outputs_include_the_clipped_fraction(tiny_pipe, tiny_is_embedded, recommended, apg_built):
    from guidekit.apps.demo import SWEEP_HEADERS, DemoBackend, Limits

    backend = DemoBackend(tiny_pipe, str(tiny_is_embedded), Limits(max_steps=8, max_size=64))
    assert backend.embedded
    grid, table = backend.sweep("a red circle", "", 0, 1, 32, 32, "1, 15", *DISTINCT.values())
    assert [row[0] for row in table] == [1.0, 15.0]
    for row in table:
        cells = dict(zip(SWEEP_HEADERS, row))
        assert set(cells) == set(SWEEP_HEADERS)
        assert all(0.0 <= cells[h] <= 1.0 for h in SWEEP_HEADERS[1:])
    assert grid.size[0] > 2 * 32
    _, _, summary = backend.compare("a red circle", "", 0, 1, 32, 32, 15.0, *DISTINCT.values())
    assert "| saturation | clipped" in summary
    # values left out (say by an API caller) take the model's defaults, as in a job file
    apg_built.clear()
    backend.compare("a red circle", "", 0, 1, 32, 32, 15.0, None, None, None)
    assert apg_built == [DISTINCT]
