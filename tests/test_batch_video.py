"""`guidekit batch` video jobs (frames, prompts, freenoise, fps, format) on a tiny AnimateDiff model: one animated
file per seed, resume without redoing or overwriting, and errors that name the field."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"

import torch  # noqa: E402
from click.testing import CliRunner  # noqa: E402
from PIL import Image  # noqa: E402

from guidekit.apps import batch as batch_mod  # noqa: E402
from guidekit.apps.jobs import JobError, fields_doc, parse_job, read_jobs  # noqa: E402

torch.set_num_threads(1)

MAX_LENGTH = 8  # the tiny adapter's motion_max_seq_length
FAST = {"steps": 1, "freenoise": {"context_length": MAX_LENGTH, "context_stride": 4}}


@pytest.fixture(scope="module")
def tiny_video_dir(tmp_path_factory):
    from guidekit.testing.animatediff import make_tiny_animatediff

    return make_tiny_animatediff(tmp_path_factory.mktemp("tiny-animatediff"), max_length=MAX_LENGTH)


@pytest.fixture()
def no_image_model(monkeypatch):
    """Video-only runs must not load the image model."""
    def refuse(*args, **kwargs):
        raise AssertionError("the image model was loaded for video jobs only")

    monkeypatch.setattr(batch_mod, "load_model", refuse)


def write_jobs(path: Path, *lines) -> Path:
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return path


def manifest(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def read_video(path: Path):
    with Image.open(path) as im:
        return im.format, im.size, getattr(im, "n_frames", 1)


#----------------------------------------------------------------------------
# Parsing.

def test_video_job_fields():
    job = parse_job({"prompt": "a red circle", "frames": 20, "prompts": {"12": "a blue circle"}, "format": "webp",
                     "freenoise": {"context_length": 8, "motion_injection": True}, "seeds": "0-1"}, line=2)
    p = job.params
    assert job.seeds == [0, 1] and p["frames"] == 20 and p["format"] == "webp" and p["fps"] == 8.0
    assert p["prompts"] == {0: "a red circle", 12: "a blue circle"}  # prompt is frame 0's
    assert p["freenoise"] == {"context_length": 8, "context_stride": 4, "weighting": "pyramid", "noise": "shuffle",
                              "fusion": "attention", "motion_injection": [0.1, 0.3]}
    defaults = parse_job({"prompt": "x", "frames": 4}).params
    assert defaults["format"] == "gif" and defaults["freenoise"]["context_length"] == 16
    assert defaults["prompts"] is None and "guidance_rescale" not in defaults
    assert parse_job({"prompt": "x", "frames": 4, "freenoise": False}).params["freenoise"] is None
    assert "`freenoise`" in fields_doc() and "`prompts`" in fields_doc()


@pytest.mark.parametrize("job, message", [
    ({"prompt": "x", "fps": 4}, r"frames: required with fps \(a video job\); accepted: an integer in \[1, 1024\], "
                                r"or remove fps"),
    ({"prompt": "x", "format": "webp"}, "frames: required with format"),
    ({"prompt": "x", "frames": 0}, r"frames: expected an integer in \[1, 1024\], got 0"),
    ({"prompt": "x", "frames": 4.5}, "frames: expected an integer"),
    ({"frames": 4}, r"prompt: required, a non-empty string \(or prompts"),
    ({"prompt": "x", "frames": 4, "prompts": {"0": "y"}}, "prompt and prompts: both give frame 0's prompt"),
    ({"prompt": "x", "frames": 4, "prompts": {"4": "y"}}, "prompts: frame '4' is not accepted; expected an object "
                                                          r"\{frame: prompt\} with frames from 0 to 3"),
    ({"prompt": "x", "frames": 4, "prompts": {"two": "y"}}, "prompts: frame 'two' is not accepted"),
    ({"prompt": "x", "frames": 4, "prompts": {"2": ""}}, "prompts: the prompt of frame '2' is ''"),
    ({"prompt": "x", "frames": 4, "prompts": ["a", "b"]}, r"prompts: expected an object \{frame: prompt\}"),
    ({"prompt": "x", "frames": 4, "freenoise": "yes"}, "freenoise: expected true, false, or an object of "
                                                       "guidekit.FreeNoise keyword arguments"),
    ({"prompt": "x", "frames": 4, "freenoise": {"window": 8}}, "freenoise: unknown key.*'window'; accepted: "
                                                               "context_length, context_stride"),
    ({"prompt": "x", "frames": 4, "freenoise": {"context_stride": 20}}, "freenoise: context_stride: 20 is not "
                                                                       "accepted; accepted: an integer from 1 to 16"),
    ({"prompt": "x", "frames": 4, "freenoise": {"noise": "pink"}}, "freenoise: noise: 'pink' is not accepted"),
    ({"prompt": "x", "frames": 4, "freenoise": {"motion_injection": True}}, "freenoise: motion_injection needs "
                                                                           "prompt travel"),
    ({"prompt": "x", "frames": 4, "prompts": {"2": "y"}, "guidance_scale": 1.0, "freenoise": {"motion_injection": True}},
     r"freenoise: motion_injection needs guidance_scale > 1, got 1.0"),
    ({"prompt": "x", "frames": 4, "prompts": {"2": "y"}, "freenoise": {"motion_injection": True,
                                                                       "injection_blocks": ["side"]}},
     r"freenoise: injection_blocks: \['side'\] is not accepted; accepted: a non-empty sequence of 'down', 'mid'"),
    ({"prompt": "x", "frames": 4, "fps": 0}, r"fps: expected a number in \(0.0, 100.0\], got 0"),
    ({"prompt": "x", "frames": 4, "format": "avi"}, "format: expected one of 'gif', 'webp', 'mp4', got 'avi'"),
    ({"prompt": "x", "frames": 4, "classifier": "c", "label": 1}, "classifier, label: not accepted in a video job"),
    ({"prompt": "x", "frames": 4, "guidance_rescale": 0.7}, "guidance_rescale: not accepted in a video job"),
])
def test_bad_video_fields_name_the_field(job, message):
    with pytest.raises(JobError, match="line 5: " + message):
        parse_job(job, line=5)


def test_csv_video_jobs_take_json_cells(tmp_path):
    f = tmp_path / "jobs.csv"
    f.write_text('prompt,frames,prompts,freenoise\n'
                 'a red circle,12,"{""6"": ""a blue circle""}","{""context_length"": 8}"\n'
                 'a red circle,4,,false\n')
    jobs, errors = read_jobs(f)
    assert errors == []
    assert jobs[0].params["prompts"] == {0: "a red circle", 6: "a blue circle"}
    assert jobs[0].params["freenoise"]["context_length"] == 8 and jobs[1].params["freenoise"] is None


#----------------------------------------------------------------------------
# Runs.

def test_one_animated_file_per_seed_then_resume(tmp_path, tiny_video_dir, no_image_model):
    jobs = write_jobs(tmp_path / "jobs.jsonl",
                      {"prompt": "a red circle", "frames": 12, "seeds": "0-1", **FAST},
                      {"prompts": {"0": "a red circle", "6": "a blue circle"}, "frames": 10, "format": "webp",
                       "fps": 4, "name": "travel", **FAST})
    out = tmp_path / "out"
    assert batch_mod.run_batch(jobs, out, video_model=str(tiny_video_dir)) == 0
    files = sorted(f.name for f in out.iterdir() if not f.name.startswith("."))
    gifs = [f for f in files if f.endswith(".gif")]
    webps = [f for f in files if f.endswith(".webp")]
    assert len(gifs) == 2 and gifs[0].startswith("a-red-circle-") and gifs[0].endswith("-s0.gif")
    assert len(webps) == 1 and webps[0].startswith("travel-") and webps[0].endswith("-s0.webp")
    assert read_video(out / gifs[1]) == ("GIF", (32, 32), 12)
    assert read_video(out / webps[0]) == ("WEBP", (32, 32), 10)
    with Image.open(out / webps[0]) as im:
        im.load()
        assert im.info["duration"] == 250  # fps 4
    rows = {row["file"]: row for row in manifest(out)}
    assert set(rows) == set(gifs + webps)
    row = rows[webps[0]]
    assert row["params"]["prompts"] == {"0": "a red circle", "6": "a blue circle"}
    assert row["model"]["class"] == "GuidedAnimateDiffPipeline" and row["model"]["sha256"]
    # A second run redoes nothing and overwrites nothing, even a file changed since.
    (out / gifs[0]).write_bytes(b"changed by the user")
    assert batch_mod.run_batch(jobs, out, video_model=str(tiny_video_dir)) == 0
    assert (out / gifs[0]).read_bytes() == b"changed by the user"
    assert len(manifest(out)) == 3


def test_prompt_travel_and_freenoise_reach_the_pipeline(tmp_path, tiny_video_dir, no_image_model, monkeypatch):
    from guidekit.pipelines import GuidedAnimateDiffPipeline

    calls = []
    original = GuidedAnimateDiffPipeline.__call__

    def spy(self, prompt=None, **kwargs):
        calls.append((prompt, kwargs))
        return original(self, prompt, **kwargs)

    monkeypatch.setattr(GuidedAnimateDiffPipeline, "__call__", spy)
    jobs = write_jobs(tmp_path / "jobs.jsonl",
                      {"prompt": "a cat", "prompts": {"5": "a dog"}, "frames": 10, "steps": 1, "guidance": "apg",
                       "freenoise": {"context_length": 4, "context_stride": 2, "fusion": "block",
                                     "motion_injection": [0.0, 0.5], "injection_blocks": ["up", "down"]}},
                      {"prompt": "a cat", "frames": 6, "steps": 1, "freenoise": False})
    assert batch_mod.run_batch(jobs, tmp_path / "out", video_model=str(tiny_video_dir)) == 0
    (prompt, kwargs), (plain_prompt, plain) = calls
    assert prompt == {0: "a cat", 5: "a dog"} and kwargs["num_frames"] == 10
    apg, freenoise = kwargs["hooks"]
    assert type(apg).__name__ == "APG"
    assert (freenoise.context_length, freenoise.context_stride, freenoise.fusion, freenoise.motion_injection,
            freenoise.injection_blocks) == (4, 2, "block", (0.0, 0.5), ("down", "up"))
    assert plain_prompt == "a cat" and plain["hooks"] == []


def test_jobs_the_video_model_cannot_run_are_bad_lines(tmp_path, tiny_video_dir, no_image_model, capsys):
    jobs = write_jobs(tmp_path / "jobs.jsonl",
                      {"prompt": "x", "frames": 4, "steps": 1, "freenoise": {"context_length": 9}},
                      {"prompt": "x", "frames": 9, "steps": 1, "freenoise": False},
                      {"prompt": "x", "frames": 4, "steps": 1, "width": 36},
                      {"prompt": "x", "frames": 4, "steps": 1, "freenoise": False})
    out = tmp_path / "out"
    assert batch_mod.run_batch(jobs, out, video_model=str(tiny_video_dir)) == 0
    err = capsys.readouterr().err
    assert "line 1: freenoise: context_length: 9 is above the video model's motion_max_seq_length 8" in err
    assert "line 2: frames: 9 is above the video model's motion_max_seq_length 8" in err
    assert "line 3: width: expected" in err and "multiple of 8, got 36" in err
    assert len(manifest(out)) == 1
    assert batch_mod.run_batch(jobs, tmp_path / "strict", strict=True, video_model=str(tiny_video_dir)) == 2


def test_without_a_video_model_image_jobs_still_run(tmp_path, tiny_sd_dir, monkeypatch, capsys):
    import guidekit.apps.jobs as jobs_mod

    monkeypatch.setattr(jobs_mod, "embedded_video_model_path", lambda: None)
    jobs = write_jobs(tmp_path / "jobs.jsonl", {"prompt": "x", "frames": 4, "steps": 1},
                      {"prompt": "x", "steps": 1, "width": 32, "height": 32})
    out = tmp_path / "out"
    assert batch_mod.run_batch(jobs, out, model=str(tiny_sd_dir)) == 0
    err = capsys.readouterr().err
    assert "line 1: frames: a video job needs a video model, and the embedded one is not installed; pass " \
           "--video-model" in err
    assert [row["file"][-4:] for row in manifest(out)] == [".png"]


def test_image_and_adapter_video_jobs_in_one_file(tmp_path, tiny_sd_dir):
    from guidekit.testing.animatediff import tiny_motion_adapter

    tiny_motion_adapter(max_length=MAX_LENGTH).save_pretrained(str(tmp_path / "adapter"))
    jobs = write_jobs(tmp_path / "jobs.jsonl", {"prompt": "x", "frames": 6, "steps": 1, "freenoise": False},
                      {"prompt": "x", "steps": 1, "width": 32, "height": 32})
    out = tmp_path / "out"
    assert batch_mod.run_batch(jobs, out, model=str(tiny_sd_dir), video_model=str(tmp_path / "adapter")) == 0
    rows = {row["file"][-4:]: row for row in manifest(out)}
    assert set(rows) == {".gif", ".png"}
    assert rows[".gif"]["model"]["image_model"]["id"] == str(tiny_sd_dir)
    assert read_video(out / rows[".gif"]["file"])[2] == 6


def test_cli_names_a_bad_video_model(tmp_path):
    from guidekit.apps.cli import main

    jobs = write_jobs(tmp_path / "jobs.jsonl", {"prompt": "x", "frames": 4})
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(main, ["batch", str(jobs), "--out", str(tmp_path / "out"), "--video-model",
                                       str(tmp_path / "empty")])
    assert result.exit_code == 2, result.output
    assert "--video-model:" in result.output and "has neither model_index.json nor config.json" in result.output


def test_mp4_jobs_with_pyav(tmp_path, tiny_video_dir, no_image_model):
    from guidekit.video.export import mp4_available

    if not mp4_available():
        pytest.skip('PyAV not installed (pip install "guidekit[mp4]")')
    import av

    jobs = write_jobs(tmp_path / "jobs.jsonl", {"prompt": "x", "frames": 10, "format": "mp4", **FAST})
    out = tmp_path / "out"
    assert batch_mod.run_batch(jobs, out, video_model=str(tiny_video_dir)) == 0
    (row,) = manifest(out)
    assert row["file"].endswith("-s0.mp4")
    with av.open(str(out / row["file"])) as container:
        assert sum(1 for _ in container.decode(video=0)) == 10


def test_any_freenoise_argument_is_accepted_and_only_given_ones_are_recorded():
    import inspect

    import guidekit

    arguments = inspect.signature(guidekit.FreeNoise.__init__).parameters
    names = [n for n in arguments if n != "self"]
    plain = parse_job({"prompt": "x", "frames": 4}).params["freenoise"]
    assert set(plain) == {"context_length", "context_stride", "weighting", "noise", "fusion", "motion_injection"}
    for name in (n for n in names if n not in plain):  # arguments beyond those go through as given
        given = {name: arguments[name].default}
        recorded = parse_job({"prompt": "x", "frames": 4, "freenoise": given}).params["freenoise"]
        assert recorded == json.loads(json.dumps({**plain, **given}))  # as a job file states it (tuples as lists)
    with pytest.raises(JobError, match="freenoise: unknown key.*accepted: " + ", ".join(names)):
        parse_job({"prompt": "x", "frames": 4, "freenoise": {"window": 8}})


def test_the_embedded_video_model_is_the_default(tmp_path, tiny_sd_dir, no_image_model, monkeypatch):
    """Laid out as guidekit.toy lays it: links to the image model's folders and to a motion adapter."""
    import guidekit.apps.jobs as jobs_mod
    from guidekit.testing.animatediff import tiny_motion_adapter

    tiny_motion_adapter(max_length=MAX_LENGTH).save_pretrained(str(tmp_path / "adapter"))
    linked = tmp_path / "toy-video"
    linked.mkdir()
    for name in ("scheduler", "text_encoder", "tokenizer", "unet", "vae"):
        (linked / name).symlink_to(Path(tiny_sd_dir).resolve() / name, target_is_directory=True)
    (linked / "motion_adapter").symlink_to(tmp_path / "adapter", target_is_directory=True)
    index = json.loads((Path(tiny_sd_dir) / "model_index.json").read_text())
    index = {**{k: index[k] for k in ("scheduler", "text_encoder", "tokenizer", "unet", "vae")},
             "_class_name": "AnimateDiffPipeline", "motion_adapter": ["diffusers", "MotionAdapter"],
             "feature_extractor": [None, None], "image_encoder": [None, None]}
    (linked / "model_index.json").write_text(json.dumps(index))
    monkeypatch.setattr(jobs_mod, "embedded_video_model_path", lambda: linked)

    jobs = write_jobs(tmp_path / "jobs.jsonl", {"prompt": "x", "frames": 4, **FAST})
    out = tmp_path / "out"
    assert batch_mod.run_batch(jobs, out) == 0
    (row,) = manifest(out)
    assert row["model"]["id"] == batch_mod.EMBEDDED_VIDEO_ID
    # the content hash reads the linked folders' weights, not only model_index.json
    (tmp_path / "alone").mkdir()
    (tmp_path / "alone" / "model_index.json").write_bytes((linked / "model_index.json").read_bytes())
    assert row["model"]["sha256"] != batch_mod._folder_hash(tmp_path / "alone")
