"""`guidekit eval-video`: long videos from the embedded motion model, with and without FreeNoise, read by the judge.

Rows (each video seeded by its index, the same noise seed in every row):

* ``world``: the world's own 64-frame clips for the same prompts (ground truth for every measure);
* ``direct-16`` and ``direct-32``: the plain pipeline at the training length and at the positional limit;
* ``chunks``: four independent 16-frame videos end to end;
* ``windows``: sliding windows with i.i.d. noise (``FreeNoise(noise="random")``: fusion, no rescheduling);
* ``freenoise``: ``FreeNoise()`` with attention fusion (the official code's);
* ``freenoise-block``: ``FreeNoise(fusion="block")`` (diffusers' and the AnimateDiff port's fusion point).

A multi-prompt table switches the background colour A -> B with the official 3/8 - 1/4 - 3/8 schedule, with and
without motion injection.  Measures are in :mod:`.video_measures`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from . import video_world
from .evaluate import eval_prompts
from .video_measures import (
    frames_correct,
    frames_to_uint8,
    max_jump,
    mean_speed,
    read_video,
    seam_score,
    smoothness,
    teleports,
)
from .world import COLOURS, parse_caption

__all__ = ["ROWS", "VIDEO_SEED", "load_video_pipeline", "row_video", "switch_prompts", "measure_video",
           "run_video_evaluation", "merge_results", "markdown_tables", "required_checks"]

VIDEO_SEED = 7000
ROWS = ("world", "direct-16", "direct-32", "chunks", "windows", "freenoise", "freenoise-block")
CHUNK = 16  # the motion model's training length


def load_video_pipeline(path=None, device: str = "cpu"):
    """`GuidedAnimateDiffPipeline` from ``path`` (default: the embedded video model)."""
    try:
        from guidekit.pipelines import GuidedAnimateDiffPipeline
    except ImportError:  # a source checkout without `pip install -e .`
        from pipelines import GuidedAnimateDiffPipeline
    from . import default_video_model_path

    pipe = GuidedAnimateDiffPipeline.from_pretrained(str(path or default_video_model_path()))
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def _call(pipe, prompt, frames: int, seed: int, steps: int, scale: float, hooks) -> np.ndarray:
    out = pipe(prompt, num_frames=frames, num_inference_steps=steps, guidance_scale=scale, height=64, width=64,
               generator=torch.Generator().manual_seed(seed), hooks=hooks, output_type="np")
    return frames_to_uint8(out.frames[0])


def row_video(pipe, row: str, prompt, index: int, frames: int = 64, steps: int = 25, scale: float = 3.0,
              context_stride: int = 4) -> np.ndarray:
    """Video ``index`` of one row, uint8 (F, 64, 64, 3); ``prompt`` a caption or a {frame: caption} schedule."""
    import guidekit

    seed = VIDEO_SEED + index
    if row == "world":
        return video_world.render_clip(video_world.clip_from_caption(prompt, seed), frames).frames
    if row in ("direct-16", "direct-32"):
        return _call(pipe, prompt, int(row.split("-")[1]), seed, steps, scale, None)
    if row == "chunks":
        parts = [_call(pipe, prompt, CHUNK, seed + 10**5 * k, steps, scale, None) for k in range(frames // CHUNK)]
        return np.concatenate(parts)
    free = {"windows": dict(noise="random", fusion="attention"), "freenoise": dict(fusion="attention"),
            "freenoise-block": dict(fusion="block")}
    if row not in free:
        raise ValueError(f"row: got {row!r}; accepted: {', '.join(ROWS)}")
    hook = guidekit.FreeNoise(context_length=CHUNK, context_stride=context_stride, **free[row])
    return _call(pipe, prompt, frames, seed, steps, scale, [hook])


def measure_video(frames: np.ndarray, captions) -> dict:
    """Per-video measures: frames correct, teleports, seams at the chunk boundaries, speed and smoothness."""
    reading = read_video(frames)
    correct = frames_correct(reading.judgements, captions)
    bounds = list(range(CHUNK, len(frames), CHUNK))
    return {
        "correct": float(correct.mean()),
        "teleports": teleports(reading.centroids),
        "seam": seam_score(frames, bounds) if bounds else float("nan"),
        "speed": mean_speed(reading.centroids),
        **smoothness(reading.centroids),
        "_track": reading.centroids,
        "_correct": correct,
    }


def _summarise(name: str, per_video: list[dict], seconds: float, peak_mib: Optional[float]) -> dict:
    def mean(key):
        vals = [v[key] for v in per_video if np.isfinite(v[key])]
        return float(np.mean(vals)) if vals else float("nan")

    return {
        "row": name,
        "videos": len(per_video),
        "frames_correct": mean("correct"),
        "videos_without_teleport": float(np.mean([v["teleports"] == 0 for v in per_video])),
        "teleports_per_video": mean("teleports"),
        "seam": mean("seam"),
        "speed": mean("speed"),
        "accel": mean("accel"),
        "jerk": mean("jerk"),
        "seconds_per_video": round(seconds / max(len(per_video), 1), 1),
        "peak_rss_mib": peak_mib,
    }


def switch_prompts(prompt: str, index: int) -> tuple[str, str]:
    """A -> B: the same caption with another background colour (B differs from the shape's colour and A)."""
    attrs = parse_caption(prompt)
    others = [c for c in COLOURS if c not in (attrs["colour"], attrs["background"])]
    target = others[index % len(others)]
    return prompt, prompt.replace(f"on a {attrs['background']} ", f"on a {target} ", 1)


def _switch_schedule(a: str, b: str, frames: int) -> dict:
    """The official two-prompt schedule as key frames: A on [0, L1], a linear blend, B on [F - L1 - 1, F)."""
    held = 3 * frames // 8
    return {0: a, held: a, frames - held - 1: b}


def _peak(fn):
    from guidekit.apps.bench import PeakRSS

    with PeakRSS() as rss:
        base = rss.peak
        t0 = time.perf_counter()
        out = fn()
        seconds = time.perf_counter() - t0
    return out, seconds, (rss.peak - base) / 2**20


def run_video_evaluation(out, model=None, device: str = "cpu", num_videos: int = 16, frames: int = 64,
                         steps: int = 25, scale: float = 3.0, rows: Sequence[str] = ROWS, switch: bool = True,
                         log: Callable[[str], None] = print, first_video: int = 0) -> dict:
    """Run every row on ``num_videos`` held-out prompts; write ``eval_video.json`` and ``table.md`` under ``out``.

    ``first_video`` skips that many prompts of the held-out list: videos are numbered by their place in the list
    (prompt, noise seed and switch colour alike), so a run from ``first_video=16`` adds new videos to one of sixteen,
    each the same as it would be in a single longer run.
    """
    from guidekit import FreeNoise

    for r in rows:
        if r not in ROWS:
            raise ValueError(f"rows: got {r!r}; accepted: {', '.join(ROWS)}")
    if not isinstance(first_video, int) or first_video < 0:
        raise ValueError(f"first_video: got {first_video!r}; accepted: an integer >= 0")
    if switch and scale <= 1:
        # the switch's motion-injection row acts in the conditional pass of classifier-free guidance only
        raise ValueError(f"scale: {scale!r} turns classifier-free guidance off, which the switch's motion-injection "
                         "row needs; accepted: scale > 1, or switch=False")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pipe = load_video_pipeline(model, device)
    indices = range(first_video, first_video + num_videos)
    prompts = eval_prompts(first_video + num_videos)[first_video:]
    result = {"settings": {"num_videos": num_videos, "first_video": first_video, "frames": frames, "steps": steps,
                           "guidance_scale": scale, "device": device, "torch_threads": torch.get_num_threads()},
              "rows": [], "switch": []}
    samples = {}
    for name in rows:
        per_video, seconds, peak = [], 0.0, 0.0
        for i, prompt in zip(indices, prompts):
            video, sec, mib = _peak(lambda: row_video(pipe, name, prompt, i, frames, steps, scale))
            seconds, peak = seconds + sec, max(peak, mib)
            per_video.append(measure_video(video, prompt))
            if name not in samples:
                samples[name] = video
        row = _summarise(name, per_video, seconds, None if name == "world" else round(peak, 1))
        log(json.dumps(row))
        # which video a summary comes from: each video's prompt, frames correct and teleports
        row["per_video"] = [{"prompt": prompt, "frames_correct": v["correct"], "teleports": v["teleports"]}
                            for prompt, v in zip(prompts, per_video)]
        result["rows"].append(row)
    if switch:
        for injection in (None, True):
            per_video, seconds = [], 0.0
            for i, prompt in zip(indices, prompts):
                a, b = switch_prompts(prompt, i)
                schedule = _switch_schedule(a, b, frames)
                hook = FreeNoise(context_length=CHUNK, fusion="attention", motion_injection=injection)
                video, sec, _ = _peak(lambda: _call(pipe, schedule, frames, VIDEO_SEED + i, steps, scale, [hook]))
                seconds += sec
                reading = read_video(video)
                held = 3 * frames // 8
                first = frames_correct(reading.judgements[:held], a)
                last = frames_correct(reading.judgements[frames - held:], b)
                per_video.append({"a": a, "b": b, "first": float(first.mean()), "last": float(last.mean()),
                                  "switch_jump": max_jump(reading.centroids, held - 2, frames - held + 2),
                                  "teleports": teleports(reading.centroids), "speed": mean_speed(reading.centroids)})
            row = {"row": "motion injection" if injection else "interpolation only", "videos": len(per_video),
                   "first_correct": float(np.mean([v["first"] for v in per_video])),
                   "last_correct": float(np.mean([v["last"] for v in per_video])),
                   "switch_jump": float(np.median([v["switch_jump"] for v in per_video])),
                   "videos_without_teleport": float(np.mean([v["teleports"] == 0 for v in per_video])),
                   "speed": float(np.nanmean([v["speed"] for v in per_video])),
                   "seconds_per_video": round(seconds / len(per_video), 1)}
            log(json.dumps(row))
            row["per_video"] = per_video
            result["switch"].append(row)
    result["checks"] = required_checks(result)
    (out / "eval_video.json").write_text(json.dumps(result, indent=2, default=float) + "\n")
    (out / "table.md").write_text(markdown_tables(result) + "\n")
    _save_samples(out, samples)
    return result


def _save_samples(out: Path, samples: dict) -> None:
    from guidekit.video import save_video

    for name, video in samples.items():
        save_video(video, out / f"sample-{name}.gif", fps=8)


#: Settings that runs must share to be merged into one table (the same videos, made the same way).
MERGE_SETTINGS = ("num_videos", "first_video", "frames", "steps", "guidance_scale")


def merge_results(results: Sequence[dict]) -> dict:
    """One evaluation from runs of the same videos with different rows (e.g. run in parallel processes, each with
    its own ``rows`` and only one with the switch table): their rows in :data:`ROWS` order, the switch table,
    and the required checks recomputed on the whole. Raises ValueError for runs of other videos or settings, or
    a row (or the switch table) in two runs."""
    if len(results) < 2:
        raise ValueError(f"results: got {len(results)} run(s); accepted: two or more to merge")

    def setting(result, key):
        return result["settings"].get(key, 0 if key == "first_video" else None)  # runs before first_video: 0

    for k, other in enumerate(results[1:], start=1):
        for key in MERGE_SETTINGS:
            if setting(other, key) != setting(results[0], key):
                raise ValueError(f"results: run {k} has {key} = {setting(other, key)!r}, run 0 has "
                                 f"{setting(results[0], key)!r}; accepted: runs of the same videos and settings "
                                 f"({', '.join(MERGE_SETTINGS)})")
    rows, switch = {}, []
    for k, result in enumerate(results):
        for row in result["rows"]:
            if row["row"] in rows:
                raise ValueError(f"results: the row {row['row']!r} is in two runs (run {k} and an earlier one); "
                                 "accepted: each row in one run")
            rows[row["row"]] = row
        if result.get("switch"):
            if switch:
                raise ValueError(f"results: the switch table is in two runs (run {k} and an earlier one); "
                                 "accepted: it in one run")
            switch = result["switch"]
    threads = sorted({r["settings"].get("torch_threads") for r in results}, key=str)
    merged = {"settings": {**results[0]["settings"], "torch_threads": threads[0] if len(threads) == 1 else threads,
                           "merged_runs": len(results)},
              "rows": [rows[name] for name in ROWS if name in rows], "switch": switch}
    merged["checks"] = required_checks(merged)
    return merged


def required_checks(result: dict) -> dict:
    """The required effects, each True/False (None when a row it needs was not run)."""
    rows = {r["row"]: r for r in result["rows"]}
    checks = {}
    if "freenoise" in rows:
        fn = rows["freenoise"]
        checks["freenoise keeps >= 95% of frames correct"] = fn["frames_correct"] >= 0.95
        checks["freenoise: no teleport in >= 90% of videos"] = fn["videos_without_teleport"] >= 0.90
        for other in ("chunks", "windows"):
            if other in rows:
                checks[f"freenoise has fewer teleports than {other}"] = (
                    fn["teleports_per_video"] < rows[other]["teleports_per_video"])
    sw = {r["row"]: r for r in result.get("switch", [])}
    if len(sw) == 2:
        checks["motion injection is at least as continuous through the switch"] = (
            sw["motion injection"]["switch_jump"] <= sw["interpolation only"]["switch_jump"])
    return checks


def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return "nan" if not np.isfinite(v) else f"{v:.3f}"
    return str(v)


def markdown_tables(result: dict) -> str:
    cols = ["row", "videos", "frames_correct", "videos_without_teleport", "teleports_per_video", "seam", "speed",
            "accel", "jerk", "seconds_per_video", "peak_rss_mib"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r[c]) for c in cols) + " |" for r in result["rows"]]
    if result.get("switch"):
        cols2 = ["row", "videos", "first_correct", "last_correct", "switch_jump", "videos_without_teleport", "speed",
                 "seconds_per_video"]
        lines += ["", "| " + " | ".join(cols2) + " |", "|" + "---|" * len(cols2)]
        lines += ["| " + " | ".join(_fmt(r[c]) for c in cols2) + " |" for r in result["switch"]]
    if result.get("checks"):
        lines += [""] + [f"- {'PASS' if ok else 'FAIL'}: {name}" for name, ok in result["checks"].items()]
    return "\n".join(lines)
