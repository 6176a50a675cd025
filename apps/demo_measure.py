"""Measured tables behind the demo's default examples, and the rules that pick a default from them.

A demo tab's default must show its method working on the embedded models. Which classifier class and seed, and
which video seed and length, do so is measured here, by running the tab's own backend on a grid of candidates and
reading every output with the toy world's judge (strict by default), not by looking at pictures:

    python -m guidekit.apps.demo_measure classifier --labels "red circle,yellow square" --seeds 0,1,2,3 --out DIR
    python -m guidekit.apps.demo_measure video --seeds 0,1,2,3 --frames 48 --context 16 --out DIR

Each command writes `DIR/<tab>.json` (every row, the rule and its pick) and `DIR/<tab>.md` (the same as a table).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Iterable, Optional, Sequence

import click

#: The three images of the Classifier guidance tab, in its order.
CLASSIFIER_RUNS = ("unguided", "naive", "elucd")

#: The Classifier guidance tab's default with the embedded classifier: the pick of pick_classifier_default on the
#: table in docs/demo-defaults/classifier.json (EluCD reads right on seeds 1-3 of 0-3 by the strict judge; the
#: unguided image reads no shape on every seed, naive guidance never the class). The package ships no docs/, so
#: the pick is copied here; a test checks it still equals the table's.
CLASSIFIER_DEFAULT = {"label": "red circle", "seed": 1}

#: The Long video tab's default on the embedded video model: the pick of pick_video_default on the table in
#: docs/demo-defaults/video.json (context 16 and stride 4 are FREENOISE_DEFAULTS'); copied here as above.
VIDEO_DEFAULT = {"frames": 64, "steps": 15, "seed": 1}


#----------------------------------------------------------------------------
# Classifier guidance.

def judged_class(image) -> str:
    """The judge's reading of one image as a class name ("red circle"), or "none" when it reads no shape or no
    kind (the strict judge refuses a blob)."""
    from guidekit.toy.judge import judge

    j = judge(image)
    return "none" if j.colour is None or j.shape is None else f"{j.colour} {j.shape}"


def classifier_row(backend, label: str, seed: int, scale: float, steps: int) -> dict:
    """One run of the Classifier guidance tab (`DemoBackend.classifier_guidance` with the embedded classifier):
    the judge's reading of each of its three images, whether it reads `label`, and the run's seconds."""
    t0, c0 = time.perf_counter(), time.process_time()
    *images, _ = backend.classifier_guidance("", label, scale, seed, steps)
    row = {"label": label, "seed": seed, "seconds": round(time.perf_counter() - t0, 1),
           "cpu_seconds": round(time.process_time() - c0, 1)}
    for name, image in zip(CLASSIFIER_RUNS, images):
        read = judged_class(image)
        row[name] = read
        row[f"{name}_right"] = read == label
    return row


def classifier_score(row: dict) -> int:
    """How well one run shows EluCD's effect: 0 unless the judge reads EluCD's image as the class and the unguided
    one not; then 2 when naive guidance misses too (the calibration is what made it work), else 1."""
    if not row["elucd_right"] or row["unguided_right"]:
        return 0
    return 2 if not row["naive_right"] else 1


def pick_classifier_default(rows: Sequence[dict]) -> dict:
    """The tab's default (label, seed) from measured rows: the label whose runs show the effect on the most seeds
    (ties: the higher summed score, then the label first measured), and its lowest seed of the best score.

    Raises ValueError when no row shows the effect."""
    if not rows:
        raise ValueError("rows: got none; accepted: the rows of at least one measured run")
    labels = list(dict.fromkeys(r["label"] for r in rows))

    def key(label):
        mine = [r for r in rows if r["label"] == label]
        return (sum(classifier_score(r) > 0 for r in mine), sum(classifier_score(r) for r in mine),
                -labels.index(label))

    label = max(labels, key=key)
    mine = [r for r in rows if r["label"] == label]
    best = max(classifier_score(r) for r in mine)
    if best == 0:
        raise ValueError("rows: no run shows EluCD reading right where the unguided image does not; measure more "
                         "labels or seeds")
    seed = min(r["seed"] for r in mine if classifier_score(r) == best)
    works = sum(classifier_score(r) > 0 for r in mine)
    return {"label": label, "seed": seed, "seeds_that_work": works, "seeds": len(mine)}


def classifier_table(backend, labels: Iterable[str], seeds: Iterable[int], scale: float, steps: int,
                     log=print) -> list[dict]:
    """Every (label, seed) run of the Classifier guidance tab; `log` gets each row as it is measured."""
    rows = []
    for label in labels:
        for seed in seeds:
            rows.append(classifier_row(backend, label, seed, scale, steps))
            log(rows[-1])
    return rows


def classifier_markdown(rows: Sequence[dict], pick: Optional[dict], settings: str) -> str:
    lines = [settings, "", "| class | seed | unguided | naive | EluCD | shows the effect | CPU s | wall s |",
             "|---|---|---|---|---|---|---|---|"]
    mark = {0: "no", 1: "yes (naive too)", 2: "yes"}
    for r in rows:
        cells = [f"**{r[n]}**" if r[f"{n}_right"] else r[n] for n in CLASSIFIER_RUNS]
        lines.append(f"| {r['label']} | {r['seed']} | {' | '.join(cells)} | {mark[classifier_score(r)]} | "
                     f"{r['cpu_seconds']:.1f} | {r['seconds']:.1f} |")
    if pick:
        lines += ["", f"Pick: **{pick['label']}**, seed **{pick['seed']}** (the effect shows on "
                      f"{pick['seeds_that_work']} of its {pick['seeds']} seeds)."]
    return "\n".join(lines) + "\n"


#----------------------------------------------------------------------------
# Long video.

def read_webp(path):
    """The frames of an animated WebP as floats in [0, 1] (F, H, W, 3): exactly the 8-bit frames written."""
    import numpy as np
    from PIL import Image, ImageSequence

    with Image.open(path) as im:
        frames = [np.asarray(f.convert("RGB"), dtype=np.float32) / 255.0 for f in ImageSequence.Iterator(im)]
    return np.stack(frames)


def video_row(video, prompt: str, seed: int, frames: int, context: int, stride: int, steps: int, size: int,
              scale: float) -> dict:
    """One run of the Long video tab (`VideoBackend.long_video`): for each of its two videos, as the page shows
    them (read back from the files), the judge's frames read as their prompt, its teleports and the largest
    frame-to-frame change; and the seconds both videos took."""
    from guidekit.toy.video_measures import frames_correct, frames_to_uint8, read_video, teleports
    from guidekit.video import interpolate_prompt_schedule

    from .demo import parse_prompt_text
    from .jobs import frame_change

    t0, c0 = time.perf_counter(), time.process_time()
    plain, freenoise, _ = video.long_video(prompt, frames, context, stride, seed, scale, steps, size)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    text = parse_prompt_text(prompt, frames)
    schedule = interpolate_prompt_schedule(text if isinstance(text, dict) else {0: text}, frames)
    held = [(i, b.key_a) for i, b in enumerate(schedule) if b.t == 0.0 or b.key_a == b.key_b]
    row = {"seed": seed, "frames": frames, "context": context, "stride": stride, "steps": steps, "size": size,
           "seconds": round(seconds, 1), "cpu_seconds": round(cpu, 1), "held": len(held)}
    for name, path in (("windows", plain), ("freenoise", freenoise)):
        clip = read_webp(path)
        reading = read_video(frames_to_uint8(clip))
        correct = frames_correct([reading.judgements[i] for i, _ in held], [c for _, c in held])
        row[f"{name}_correct"] = int(correct.sum())
        row[f"{name}_teleports"] = teleports(reading.centroids)
        mean, largest = frame_change(clip)
        row[f"{name}_mean"], row[f"{name}_largest"] = round(mean, 2), round(largest, 2)
    return row


def freenoise_steadier(row: dict) -> bool:
    """Whether one run shows FreeNoise's effect: fewer teleports than the windows' video, and at least as many
    frames read as their prompt."""
    return (row["freenoise_teleports"] < row["windows_teleports"]
            and row["freenoise_correct"] >= row["windows_correct"])


def pick_video_default(rows: Sequence[dict], max_seconds: float) -> dict:
    """The tab's default (frames, context, seed) from measured rows: among the settings whose runs take at most
    `max_seconds` of CPU time on average (one torch thread: the wall time of an idle machine, whatever else
    shared it while measuring), the one that shows the effect on the most seeds (ties: the larger summed teleport
    gap, then the fewer frames); its seed is the one with the largest teleport gap (ties: the lowest seed).

    Raises ValueError when no row fits the time or shows the effect."""
    settings: dict = {}
    for r in rows:
        settings.setdefault((r["frames"], r["context"], r["stride"], r["steps"], r["size"]), []).append(r)

    def gap(r):
        return r["windows_teleports"] - r["freenoise_teleports"]

    timely = {k: v for k, v in settings.items() if sum(r["cpu_seconds"] for r in v) / len(v) <= max_seconds}
    if not timely:
        raise ValueError(f"rows: no setting renders within {max_seconds:g} CPU seconds on average")
    key = max(timely, key=lambda k: (sum(map(freenoise_steadier, timely[k])), sum(map(gap, timely[k])), -k[0]))
    mine = timely[key]
    shows = [r for r in mine if freenoise_steadier(r)]
    if not shows:
        raise ValueError("rows: no run shows FreeNoise steadier than the sliding windows; measure more seeds")
    best = max(shows, key=lambda r: (gap(r), -r["seed"]))
    frames, context, stride, steps, size = key
    return {"frames": frames, "context": context, "stride": stride, "steps": steps, "size": size,
            "seed": best["seed"], "seeds_that_work": len(shows), "seeds": len(mine)}


def video_markdown(rows: Sequence[dict], pick: Optional[dict], settings: str) -> str:
    lines = [settings, "",
             "| seed | frames | context | stride | steps | windows: read as prompt | windows: teleports | "
             "windows: change mean / largest | FreeNoise: read as prompt | FreeNoise: teleports | "
             "FreeNoise: change mean / largest | steadier | CPU s (both) | wall s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def change(r, name):
        mean = r.get(f"{name}_mean")  # rows measured before the mean was recorded have none
        return f"{'–' if mean is None else f'{mean:.2f}'} / {r[f'{name}_largest']:.2f}"

    for r in rows:
        lines.append(f"| {r['seed']} | {r['frames']} | {r['context']} | {r['stride']} | {r['steps']} | "
                     f"{r['windows_correct']}/{r['held']} | {r['windows_teleports']} | {change(r, 'windows')} | "
                     f"{r['freenoise_correct']}/{r['held']} | {r['freenoise_teleports']} | {change(r, 'freenoise')} | "
                     f"{'yes' if freenoise_steadier(r) else 'no'} | {r['cpu_seconds']:.1f} | {r['seconds']:.1f} |")
    if pick:
        lines += ["", f"Pick: {pick['frames']} frames, context {pick['context']}, stride {pick['stride']}, "
                      f"{pick['steps']} steps, seed **{pick['seed']}** (FreeNoise steadier on "
                      f"{pick['seeds_that_work']} of {pick['seeds']} seeds)."]
    return "\n".join(lines) + "\n"


#----------------------------------------------------------------------------
# Command line.

def _ints(text: str, name: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {text!r}", param_hint=name) from None
    if not values:
        raise click.BadParameter("expected at least one integer", param_hint=name)
    return values


def _merged(folders: Sequence[Path], name: str) -> list[dict]:
    """The rows of earlier runs' `<name>.json` in `folders` (the same command with other seeds or labels); the
    commands that measured them are kept in `MERGED`."""
    rows = []
    for folder in folders:
        path = Path(folder) / f"{name}.json"
        if not path.is_file():
            raise click.BadParameter(f"{path} does not exist; accepted: the --out folder of an earlier run",
                                     param_hint="--merge")
        earlier = json.loads(path.read_text())
        rows += earlier["rows"]
        MERGED.extend(earlier.get("merged_from", []) + ([earlier["command"]] if earlier.get("command") else []))
    return rows


#: The commands that measured the rows of --merge'd runs.
MERGED: list[str] = []


MERGE = click.option("--merge", multiple=True, type=click.Path(file_okay=False, path_type=Path),
                     help="The --out folder of an earlier run whose rows join this table (repeatable).")


def _progress(out: Path, name: str, rows) -> None:
    """Keep the rows measured so far in `out/<name>.json` (a stopped run can be --merge'd) and echo the last."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps({"rows": rows, "pick": None}, indent=1) + "\n")
    click.echo(json.dumps(rows[-1]), err=True)


def _write(out: Path, name: str, rows, pick, markdown: str, settings: str) -> None:
    import shlex
    import sys

    out.mkdir(parents=True, exist_ok=True)
    # the command that made the file, so that the table can be measured again
    command = shlex.join(["python", "-m", "guidekit.apps.demo_measure", *sys.argv[1:]])
    (out / f"{name}.json").write_text(json.dumps({"settings": settings, "command": command, "merged_from": MERGED,
                                                  "rows": rows, "pick": pick}, indent=1) + "\n")
    (out / f"{name}.md").write_text(markdown)
    click.echo(markdown)


@click.group()
def main():
    """Measure the demo's default examples on the embedded models."""
    import torch

    torch.set_num_threads(1)


@main.command()
@click.option("--labels", default="red circle,yellow square,green triangle,cyan circle,blue square,magenta triangle",
              show_default=True, help="Comma-separated class names of the embedded classifier.")
@click.option("--seeds", default="0,1,2,3", show_default=True, help="Comma-separated seeds.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Folder for the table.")
@MERGE
def classifier(labels, seeds, out, merge):
    """The Classifier guidance tab's default run (recommended EluCD settings and sampler) over labels x seeds."""
    from guidekit import toy

    from .demo import DemoBackend
    from .jobs import load_pipeline

    pipe, name = load_pipeline(None)
    backend = DemoBackend(pipe, name)
    scale, steps = float(toy.RECOMMENDED_ELUCD["scale"]), int(toy.RECOMMENDED_ELUCD_SAMPLER["steps"])
    rows = _merged(merge, "classifier")
    names = [s.strip() for s in labels.split(",") if s.strip()]
    done = list(rows)

    def log(row):
        done.append(row)
        _progress(out, "classifier", done)

    rows += classifier_table(backend, names, _ints(seeds, "--seeds") if names else [], scale, steps, log=log)
    try:
        pick = pick_classifier_default(rows)
    except ValueError as e:
        pick = None
        click.echo(str(e), err=True)
    settings = (f"Classifier guidance tab, embedded model and classifier, scale {scale:g}, {steps} steps "
                f"({toy.RECOMMENDED_ELUCD_SAMPLER['scheduler']}); cells: the strict toy judge's reading (bold: the "
                "requested class).")
    _write(out, "classifier", rows, pick, classifier_markdown(rows, pick, settings), settings)


@main.command()
@click.option("--prompt", default=None, help="Prompt or `FRAME: prompt` schedule; default: the tab's example.")
@click.option("--seeds", default="0,1,2,3", show_default=True, help="Comma-separated seeds.")
@click.option("--frames", default="48", show_default=True, help="Comma-separated frame counts.")
@click.option("--steps", default="25", show_default=True, help="Comma-separated denoising steps.")
@click.option("--context", default=16, show_default=True, help="Context length W.")
@click.option("--stride", default=4, show_default=True, help="Context stride S.")
@click.option("--max-seconds", default=70.0, show_default=True,
              help="CPU-time budget of one run (both videos, one torch thread): about a minute.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Folder for the table.")
@MERGE
def video(prompt, seeds, frames, context, stride, steps, max_seconds, out, merge):
    """The Long video tab (sliding windows vs FreeNoise) on the embedded video model over seeds x frame counts."""
    from .demo import EXAMPLE_SCHEDULE, Limits, video_backend
    from .jobs import load_pipeline

    pipe, _ = load_pipeline(None)
    backend, note = video_backend(pipe, None, Limits())
    if backend is None:
        raise click.ClickException(note)
    prompt = prompt or EXAMPLE_SCHEDULE
    rows = _merged(merge, "video")
    for seed in _ints(seeds, "--seeds") if seeds else []:  # seeds outer: a stopped run still covers every setting
        for n in _ints(frames, "--frames"):
            for k in _ints(steps, "--steps"):
                rows.append(video_row(backend, prompt, seed, n, context, stride, k, backend.default_size,
                                      backend.default_scale))
                _progress(out, "video", rows)
    try:
        pick = pick_video_default(rows, max_seconds)
    except ValueError as e:
        pick = None
        click.echo(str(e), err=True)
    settings = (f"Long video tab, embedded video model, prompt {prompt!r}, guidance scale {backend.default_scale:g}, "
                f"{backend.default_size}x{backend.default_size}; the strict toy judge reads every frame (frames held "
                "on one prompt) and tracks the shape for teleports. Budget per run: "
                f"{max_seconds:g} CPU seconds (one torch thread).")
    _write(out, "video", rows, pick, video_markdown(rows, pick, settings), settings)


if __name__ == "__main__":
    main()
