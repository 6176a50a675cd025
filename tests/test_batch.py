"""`guidekit batch`: job parsing, bad lines, resume after a kill, batch-size and process-count independence."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

os.environ["HF_HUB_OFFLINE"] = "1"

import torch  # noqa: E402

from guidekit.apps import batch as batch_mod  # noqa: E402
from guidekit.apps.jobs import JobError, fields_doc, parse_job, parse_seeds, read_jobs  # noqa: E402

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_model(tiny_sd_dir):
    return tiny_sd_dir  # conftest.py: a tiny random SD 1.x checkpoint saved once per session


@pytest.fixture(scope="module")
def tiny_pipe(tiny_model):
    from guidekit.apps.jobs import load_pipeline

    return load_pipeline(str(tiny_model))[0]


def write_jobs(path: Path, *lines) -> Path:
    path.write_text("\n".join(l if isinstance(l, str) else json.dumps(l) for l in lines) + "\n")
    return path


def manifest(out: Path) -> list[dict]:
    return [json.loads(l) for l in (out / "manifest.jsonl").read_text().splitlines()]


def pixels(path: Path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def subprocess_env():
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env.pop("GUIDEKIT_BATCH_HANG_BEFORE_RENAME", None)
    return env


#----------------------------------------------------------------------------
# Parsing.

def test_seed_ranges():
    assert parse_seeds("0-7") == list(range(8))
    assert parse_seeds("1,3,8-9") == [1, 3, 8, 9]
    assert parse_seeds(5) == [5]
    assert parse_seeds([2, 4]) == [2, 4]
    for bad in ("7-0", "a-b", "", "1,,2", -1, 1.5, True, [], "1,1"):
        with pytest.raises(JobError, match="seeds"):
            parse_seeds(bad)


def test_job_defaults_and_errors():
    job = parse_job({"prompt": "a red circle", "seeds": "0-2", "guidance": "apg"}, line=3)
    assert job.seeds == [0, 1, 2]
    # APG's eta / norm_threshold / momentum depend on the model: `resolve` fills them once it is known
    assert job.params["eta"] is job.params["momentum"] is job.params["norm_threshold"] is None
    # so do the scale and the steps; the method does not: APG for an image job, CFG for a video job
    assert job.params["guidance_scale"] is job.params["steps"] is None
    assert parse_job({"prompt": "x"}).params["guidance"] == "apg"
    assert parse_job({"prompt": "x", "frames": 8}).params["guidance"] == "cfg"
    bad = [
        ({"seeds": "0-1"}, "line 4: prompt: required"),
        ({"prompt": "x", "steps": 0}, r"line 4: steps: expected an integer in \[1, 1000\], got 0"),
        ({"prompt": "x", "width": 100}, "width: .*multiple of 8, got 100"),
        ({"prompt": "x", "guidance": "pag"}, "guidance: expected one of 'cfg', 'apg', got 'pag'"),
        ({"prompt": "x", "guidance_scale": float("nan")}, "guidance_scale"),
        ({"prompt": "x", "guidance": "cfg", "eta": 0.5}, "eta: only applies to guidance 'apg'"),
        ({"prompt": "", "guidance": "cfg"}, "prompt: required, a non-empty string"),
        ({"prompt": "x", "guidance": "apg", "momentum": 1.5}, "momentum"),
        ({"prompt": "x", "guidance-scale": 3}, "unknown field.*'guidance-scale'.*accepted: prompt"),
        ({"prompt": "x", "seed": 1, "seeds": "0-1"}, "seed and seeds"),
        ({"prompt": "x", "seed": "0-3"}, "seed: expected an integer"),
        ({"prompt": "x", "name": "../etc"}, "name: expected"),
    ]
    for raw, message in bad:
        with pytest.raises(JobError, match=message):
            parse_job(raw, line=4)
    assert "`norm_threshold` (apg)" in fields_doc()


def test_csv_jobs(tmp_path):
    f = tmp_path / "jobs.csv"
    f.write_text("prompt,seeds,steps,guidance,guidance_scale,eta\n"
                 "a red circle,0-1,4,apg,9,0.1\n"
                 "a blue square,2,,cfg,5,\n"
                 "bad,0,many,cfg,5,\n")
    jobs, errors = read_jobs(f)
    assert [j.seeds for j in jobs] == [[0, 1], [2]]
    assert jobs[0].params["eta"] == 0.1 and jobs[1].params["steps"] is None  # None: the model's
    assert errors == [(4, "line 4: steps: expected an integer in [1, 1000], got 'many'")]


def test_example_jobs_files_are_valid():
    jobs, errors = read_jobs(REPO / "assets" / "examples" / "jobs.jsonl")
    assert errors == [] and len(jobs) >= 3
    jobs, errors = read_jobs(REPO / "assets" / "examples" / "jobs.csv")
    assert errors == [] and [j.params["guidance"] for j in jobs] == ["cfg", "apg"]


#----------------------------------------------------------------------------
# Runs in this process.

def test_bad_lines_skipped_and_strict(tmp_path, tiny_pipe, tiny_model, capsys):
    jobs = write_jobs(tmp_path / "jobs.jsonl",
                      {"prompt": "a red circle", "seeds": "0-1", "steps": 2},
                      '{"prompt": "broken", ',
                      {"prompt": "a red circle", "steps": 2, "width": 36},  # not a multiple of 8
                      {"prompt": "a blue square", "seed": 3, "steps": 2, "guidance": "apg", "guidance_scale": 9})
    out = tmp_path / "strict"
    assert batch_mod.run_batch(jobs, out, model=str(tiny_model), strict=True, pipe=tiny_pipe) == 2
    assert not out.exists() or not list(out.glob("*.png"))
    err = capsys.readouterr().err
    assert "line 2: not valid JSON" in err and "line 3: width: expected" in err

    out = tmp_path / "lenient"
    assert batch_mod.run_batch(jobs, out, model=str(tiny_model), pipe=tiny_pipe) == 0
    err = capsys.readouterr().err
    assert "skipped line 2: not valid JSON" in err and "skipped line 3: width" in err
    assert "3 generated" in err and "2 bad line(s) skipped" in err
    rows = manifest(out)
    assert sorted((r["line"], r["seed"]) for r in rows) == [(1, 0), (1, 1), (4, 3)]
    for r in rows:
        data = (out / r["file"]).read_bytes()
        assert r["sha256"] == batch_mod._sha256(data)
        assert r["model"]["sha256"] and r["guidekit_version"] and r["timings"]["seconds_per_image"] >= 0
        assert r["params"]["width"] == r["params"]["height"] == 32  # resolved from the model
    apg_row = next(r for r in rows if r["line"] == 4)
    assert apg_row["params"]["guidance"] == "apg" and apg_row["params"]["momentum"] == -0.5
    from PIL import Image

    text = Image.open(out / apg_row["file"]).text
    assert json.loads(text["guidekit"])["params"] == apg_row["params"]
    assert "Seed: 3" in text["parameters"] and "a blue square" in text["parameters"]


def test_file_names_say_the_method_and_scale(tmp_path, tiny_pipe, tiny_model, capsys):
    """CFG and APG jobs of one prompt differ by more than their hash; names stay unique and are never reused."""
    jobs = write_jobs(tmp_path / "jobs.jsonl",
                      {"prompt": "a red circle on a blue background", "steps": 1, "guidance": "cfg"},
                      {"prompt": "a red circle on a blue background", "steps": 1, "guidance": "apg"},
                      {"prompt": "a red circle on a blue background", "steps": 1, "guidance": "apg", "eta": 0.5},
                      {"name": "mine", "prompt": "x", "steps": 1, "guidance": "cfg", "guidance_scale": 12})
    out = tmp_path / "out"
    assert batch_mod.run_batch(jobs, out, model=str(tiny_model), pipe=tiny_pipe) == 0
    names = {r["line"]: r["file"] for r in manifest(out)}
    slug = "a-red-circle-on-a-blue-backgroun"  # the prompt's first 32 characters
    for line, tag in ((1, "cfg-w7.5"), (2, "apg-w7.5"), (3, "apg-w7.5")):
        assert re.fullmatch(rf"{slug}-{tag}-[0-9a-f]{{12}}-s0\.png", names[line]), names[line]
    assert names[2] != names[3]  # the same method and scale, other settings: the hash tells them apart
    assert re.fullmatch(r"mine-cfg-w12-[0-9a-f]{12}-s0\.png", names[4]), names[4]
    stamps = {name: (out / name).stat().st_mtime_ns for name in names.values()}
    capsys.readouterr()
    assert batch_mod.run_batch(jobs, out, model=str(tiny_model), pipe=tiny_pipe) == 0
    assert "0 generated, 4 already finished" in capsys.readouterr().err
    assert {name: (out / name).stat().st_mtime_ns for name in names.values()} == stamps


def test_method_tags_of_every_kind():
    from guidekit.apps.batch import method_tag

    assert method_tag({"guidance": "apg", "guidance_scale": 3.0}) == "apg-w3"
    assert method_tag({"guidance": "cfg", "guidance_scale": 1.0, "classifier": "c", "calibration": "elucd",
                       "classifier_scale": 2.0}) == "cfg-w1-elucd2"
    assert method_tag({"guidance": "cfg", "guidance_scale": 3.0, "frames": 8, "freenoise": {}}) == "cfg-w3-freenoise"
    assert method_tag({"guidance": "apg", "guidance_scale": 3.0, "frames": 8, "freenoise": None}) == "apg-w3-plain"
    assert method_tag({"content_image": "a.png", "start_point": "stylessp"}) == "stylessp"
    assert method_tag({"kind": "edit", "mode": "masactrl"}) == "masactrl"
    assert method_tag({"kind": "reconstruct"}) == ""


def test_same_seed_same_image_across_batch_sizes(tmp_path, tiny_pipe, tiny_model):
    line = {"prompt": "a red circle", "seeds": "0-3", "steps": 3, "guidance": "apg", "guidance_scale": 9}
    jobs = write_jobs(tmp_path / "jobs.jsonl", line)
    one = tmp_path / "bs1"
    four = tmp_path / "bs3"
    single = tmp_path / "single"
    batch_mod.run_batch(jobs, one, model=str(tiny_model), batch_size=1, pipe=tiny_pipe)
    batch_mod.run_batch(jobs, four, model=str(tiny_model), batch_size=3, pipe=tiny_pipe)
    # seed 2 alone, in a job of its own
    batch_mod.run_batch(write_jobs(tmp_path / "one.jsonl", dict(line, seeds="2")), single,
                        model=str(tiny_model), pipe=tiny_pipe)
    files = sorted(p.name for p in one.glob("*.png"))
    assert len(files) == 4 and files == sorted(p.name for p in four.glob("*.png"))
    for name in files:
        assert np.abs(pixels(one / name) - pixels(four / name)).max() <= 1, name
    (only,) = single.glob("*.png")
    assert np.abs(pixels(one / only.name) - pixels(only)).max() <= 1
    # different seeds give different images
    assert np.abs(pixels(one / files[0]) - pixels(one / files[1])).max() > 1


#----------------------------------------------------------------------------
# Runs in subprocesses: a killed run, and accelerate with two processes.

def test_resume_after_kill(tmp_path, tiny_pipe, tiny_model):
    jobs = write_jobs(tmp_path / "jobs.jsonl",
                      {"prompt": "a red circle", "seeds": "0-2", "steps": 2},
                      {"prompt": "a green triangle", "seeds": "5-6", "steps": 2, "guidance": "apg"})
    out = tmp_path / "out"
    env = subprocess_env()
    env["GUIDEKIT_BATCH_HANG_BEFORE_RENAME"] = "2"  # block (forever) while the third image is unrenamed
    proc = subprocess.Popen([sys.executable, "-m", "guidekit.apps.batch", str(jobs), "--out", str(out),
                             "--model", str(tiny_model)], env=env, stderr=subprocess.PIPE, text=True)
    guard = threading.Timer(300, proc.kill)  # never wait forever if the run goes wrong
    guard.start()
    try:
        for line in proc.stderr:  # wait for the run to reach the hang point (no timing involved)
            if "[test] hanging before rename" in line:
                break
        else:
            pytest.fail(f"batch run ended before the hang point: rc={proc.wait()}")
    finally:
        guard.cancel()
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        proc.stderr.close()

    done_before = sorted(p.name for p in out.glob("*.png"))
    assert len(done_before) == 2
    assert len(list(out.glob(".*.tmp"))) == 1  # the killed image exists only as a hidden temporary file
    stamps = {n: (out / n).stat().st_mtime_ns for n in done_before}

    assert batch_mod.run_batch(jobs, out, model=str(tiny_model), pipe=tiny_pipe) == 0
    rows = manifest(out)
    assert sorted((r["line"], r["seed"]) for r in rows) == [(1, 0), (1, 1), (1, 2), (2, 5), (2, 6)]
    assert len({r["file"] for r in rows}) == 5 == len(list(out.glob("*.png")))
    assert not list(out.glob(".*.tmp")) and not list((out / ".parts").glob("*"))
    assert {n: (out / n).stat().st_mtime_ns for n in done_before} == stamps  # finished images untouched
    for r in rows:
        assert batch_mod._sha256((out / r["file"]).read_bytes()) == r["sha256"]

    # A third run does nothing.
    assert batch_mod.run_batch(jobs, out, model=str(tiny_model), pipe=tiny_pipe) == 0
    assert manifest(out) == rows


def test_two_processes_match_one(tmp_path, tiny_pipe, tiny_model):
    jobs = write_jobs(tmp_path / "jobs.jsonl",
                      {"prompt": "a red circle", "seeds": "0-2", "steps": 2},
                      {"prompt": "a red circle", "seeds": "0-1", "steps": 2, "guidance": "apg", "guidance_scale": 12})
    one, two = tmp_path / "one", tmp_path / "two"
    assert batch_mod.run_batch(jobs, one, model=str(tiny_model), pipe=tiny_pipe) == 0
    # `accelerate launch` of this interpreter's accelerate (the same as the `accelerate` command)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           "-m", "guidekit.apps.batch", str(jobs), "--out", str(two), "--model", str(tiny_model)]
    res = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "5 generated" in res.stderr and "2 process(es)" in res.stderr
    rows1, rows2 = manifest(one), manifest(two)
    assert {r["process"] for r in rows2} == {0, 1}
    assert sorted((r["file"], r["sha256"]) for r in rows1) == sorted((r["file"], r["sha256"]) for r in rows2)
    assert not list((two / ".parts").glob("*"))


#----------------------------------------------------------------------------
# Sizes that cannot fit, and two runs on one output folder.

def test_sizes_over_the_available_memory_are_bad_lines(tmp_path, tiny_pipe, tiny_model, monkeypatch, capsys):
    import guidekit.checks as checks

    monkeypatch.setattr(checks, "available_memory", lambda device: 2**10, raising=False)  # 1 KiB free
    jobs = write_jobs(tmp_path / "jobs.jsonl", {"prompt": "a red circle", "seeds": "0-1", "steps": 2, "width": 64})
    out = tmp_path / "out"
    assert batch_mod.run_batch(jobs, out, model=str(tiny_model), pipe=tiny_pipe, batch_size=2) == 1
    err = capsys.readouterr().err
    assert "skipped line 1: width/height: 64x32 with 2 images per call needs at least" in err
    assert not list(out.glob("*.png"))


def _start_hanging_run(jobs, out, model):
    """A batch run in a subprocess that holds `out` and blocks before renaming its first image."""
    env = subprocess_env()
    env["GUIDEKIT_BATCH_HANG_BEFORE_RENAME"] = "0"
    proc = subprocess.Popen([sys.executable, "-m", "guidekit.apps.batch", str(jobs), "--out", str(out),
                             "--model", str(model)], env=env, stderr=subprocess.PIPE, text=True)
    guard = threading.Timer(300, proc.kill)  # never wait forever if the run goes wrong
    guard.start()
    try:
        for line in proc.stderr:
            if "[test] hanging before rename" in line:
                return proc
        pytest.fail(f"batch run ended before the hang point: rc={proc.wait()}")
    finally:
        guard.cancel()


def test_second_run_on_the_same_out_is_refused(tmp_path, tiny_pipe, tiny_model):
    from click.testing import CliRunner

    jobs = write_jobs(tmp_path / "jobs.jsonl", {"prompt": "a red circle", "seeds": "0-2", "steps": 2})
    out = tmp_path / "out"
    proc = _start_hanging_run(jobs, out, tiny_model)
    try:
        with pytest.raises(batch_mod.OutputLocked) as info:
            batch_mod.run_batch(jobs, out, model=str(tiny_model), pipe=tiny_pipe)
        message = str(info.value)
        assert f"--out: {out} is in use by another guidekit batch run (pid {proc.pid} on " in message
        assert f"lock file {out / '.lock'}" in message
        assert not list(out.glob("*.png"))  # the second run generated nothing
        result = CliRunner().invoke(batch_mod.batch, [str(jobs), "--out", str(out), "--model", str(tiny_model)])
        assert result.exit_code == 1 and "is in use by another guidekit batch run" in result.output
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        proc.stderr.close()
    # The killed run's lock died with it: the next run goes ahead and finishes everything.
    assert batch_mod.run_batch(jobs, out, model=str(tiny_model), pipe=tiny_pipe) == 0
    assert len(manifest(out)) == 3 == len(list(out.glob("*.png")))


def test_launch_refused_while_another_run_holds_the_out(tmp_path, tiny_model):
    jobs = write_jobs(tmp_path / "jobs.jsonl", {"prompt": "a red circle", "seeds": "0-1", "steps": 2})
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           "-m", "guidekit.apps.batch", str(jobs), "--out", str(out), "--model", str(tiny_model)]
    with batch_mod.output_lock(out):  # as another run would hold it
        res = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode != 0
    assert res.stderr.count("is in use by another guidekit batch run") == 1, res.stderr[-3000:]  # said once
    assert not list(out.glob("*.png"))
