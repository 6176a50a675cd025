"""`guidekit bench`: what guidekit's hooks cost against the stock diffusers pipeline, on this machine.

Each round runs every case in a fresh process (so one case's memory cannot leak into another's) for
three timed calls, the cases are interleaved round by round with a rotating order, and the table reports medians and ratios against stock measured in the
same run. The EluCD case (CFG plus an EluCD correction with a tiny random ResNet classifier built in code)
is also reported against CFG alone. Wall time is the pipeline call alone (after a one-step warm-up call in the same process); CPU
time is the calling thread's (torch runs on one thread here), which other processes on a shared machine
disturb far less than wall time; peak memory is the process's peak resident set during the call,
sampled every millisecond.

    guidekit bench                     # tiny SD pipeline + a ~110M-parameter UNet, 4 rounds x 3 calls
    guidekit bench --models tiny --rounds 3 --json bench.json
    guidekit bench --models tiny --rounds 1 --no-elucd --no-styleid --no-uam --pixel   # + the pixel EluCD row
    guidekit bench --no-sd --no-elucd --no-styleid --no-stylessp --no-uam --dit --dit-size mid  # latent EluCD rows
    guidekit bench --models tiny --rounds 3 --no-elucd --no-styleid --no-uam           # + StyleSSP vs StyleID
    guidekit bench --no-sd --no-elucd --no-styleid --no-stylessp --no-uam --freenoise  # FreeNoise rows only

The StyleSSP rows time one StyleID transfer with and without `guidekit.StyleSSP()` (its negative-guided inversion
and frequency start point), each case in fresh processes like the stock comparison, so that the peak memory of
the two can be compared too.

The FreeNoise rows (`--freenoise`) run `guidekit.FreeNoise(fusion="block")` (diffusers' fusion point, so the
comparison with diffusers is like for like; `--freenoise-fusion attention` times FreeNoise's default fusion
instead) on a random AnimateDiff model (the tiny or mid image model plus a matching motion adapter, window 16,
stride 4): time per frame at a long and a short video (F=64 against F=16; F=16 is a single window, i.e. the
plain model) and guidekit against diffusers' own
`enable_free_noise` at F=64, alternated call by call in one process; and the peak memory of the call (the
rise of the resident set over what the process held before its first call) at F=16, 64 and 128 with and
without FreeNoise's exact splitting (`FREENOISE_SPLIT`), each in a fresh process, with a device-independent
count next to it: the bytes of the largest query, key, value or score tensor the windowed temporal attention
holds at once (`guidekit.attention.freenoise.record_window_tensors`: with `attention_budget`, as it would be had
all rows been attended in one batch, and a full-length query for comparison).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional

import click

from .cli import FiniteFloatRange

CASES = ("stock", "cfg", "apg")
ELUCD_CASE = "elucd"  # CFG() + EluCD(tiny random classifier): compared with "cfg" as well as with stock
TRANSFER_CASES = ("styleid-transfer", "stylessp-transfer")  # StyleID.transfer without / with StyleSSP()
MODELS = ("tiny", "mid")
FREENOISE_CASES = ("guidekit", "guidekit-split", "diffusers")
#: The splitting the memory rows measure: spatial layers in chunks of 16 of the batch×frames rows,
#: temporal blocks in chunks of 256 of the batch×pixel rows.
FREENOISE_SPLIT = {"spatial_chunk": 16, "temporal_chunk": 256}


# ----------------------------------------------------------------------------- worker (one measurement)


def _build_model(kind: str, folder: Path) -> None:
    """Write the benchmark checkpoint: the tiny SD pipeline, or the same with a ~110M-parameter UNet."""
    from diffusers import StableDiffusionPipeline

    from guidekit.testing import make_mid_unet, make_tiny_sd

    make_tiny_sd(folder)
    if kind == "mid":
        pipe = StableDiffusionPipeline.from_pretrained(str(folder))
        pipe.unet = make_mid_unet()
        pipe.register_modules(unet=pipe.unet)
        pipe.save_pretrained(str(folder))


def tiny_classifier(seed: int = 0):
    """A tiny random transformers ResNet (3 labels, ~10k parameters) as a `TransformersClassifier`: what EluCD
    costs on top of CFG is the VAE decode and the classifier's forward and backward passes per step."""
    from guidekit.guidance import TransformersClassifier
    from guidekit.testing.classifiers import tiny_resnet_classifier

    return TransformersClassifier(tiny_resnet_classifier(seed).eval(), image_mean=0.5, image_std=0.5)


def _hooks(case: str) -> list:
    import guidekit

    if case == "cfg":
        return [guidekit.CFG()]
    if case == "apg":
        return [guidekit.APG()]
    if case == ELUCD_CASE:
        return [guidekit.CFG(), guidekit.EluCD(tiny_classifier(), "red")]
    raise ValueError(f"case: {case!r} is not accepted; accepted: {', '.join(CASES + (ELUCD_CASE,))}")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Samples the resident set size in a thread while the block runs."""

    def __enter__(self):
        self.peak = _rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(0.001)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())


def measure(case: str, folder: str, steps: int, size: int, calls: int = 3, seed: int = 0) -> list[dict]:
    """`calls` timed calls of `case` on the checkpoint in `folder`: wall seconds and peak RSS (MiB) of each."""
    import torch
    from diffusers import StableDiffusionPipeline

    from guidekit.pipelines import GuidedStableDiffusionPipeline

    torch.set_num_threads(int(os.environ.get("GUIDEKIT_BENCH_THREADS", "1")))
    cls = StableDiffusionPipeline if case == "stock" else GuidedStableDiffusionPipeline
    pipe = cls.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(height=size, width=size, guidance_scale=7.5, output_type="np")
    if case != "stock":
        kwargs["hooks"] = _hooks(case)

    def call(n):
        return pipe("a red circle on a blue background", num_inference_steps=n,
                    generator=torch.Generator().manual_seed(seed), **kwargs)

    call(1)  # warm-up: lazy initialisations are not what we measure
    results = []
    for _ in range(calls):
        with PeakRSS() as mem:
            start, cpu_start = time.perf_counter(), time.thread_time()
            call(steps)
            wall, cpu = time.perf_counter() - start, time.thread_time() - cpu_start
        results.append({"case": case, "wall_s": wall, "cpu_s": cpu, "peak_mib": mem.peak / 2**20})
    return results


def measure_transfer(case: str, folder: str, steps: int, size: int, calls: int = 3, seed: int = 0) -> list[dict]:
    """`calls` timed StyleID transfers of `case` ("styleid-transfer" or "stylessp-transfer": with
    `guidekit.StyleSSP()` and a style prompt, so its negative-guided inversion runs) on the checkpoint in `folder`,
    without the style cache (every transfer inverts the style), then `calls` more with the style cached (a style
    reused for many contents). Wall seconds, thread CPU seconds and peak RSS (MiB) of each."""
    import torch

    import guidekit
    from guidekit.pipelines import StyleIDStableDiffusionPipeline

    if case not in TRANSFER_CASES:
        raise ValueError(f"case: {case!r} is not accepted; accepted: {', '.join(TRANSFER_CASES)}")
    torch.set_num_threads(int(os.environ.get("GUIDEKIT_BENCH_THREADS", "1")))
    pipe = StyleIDStableDiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    gen = torch.Generator().manual_seed(1234)  # the same images in every process
    content, style = torch.rand(1, 3, size, size, generator=gen), torch.rand(1, 3, size, size, generator=gen)

    def call(n, cache):
        hooks = [guidekit.StyleSSP()] if case == "stylessp-transfer" else []
        return pipe.transfer(content, style, num_inference_steps=n, hooks=hooks, content_prompt="a red circle",
                             style_prompt="a yellow square on a green background", cache_style=cache,
                             generator=torch.Generator().manual_seed(seed), output_type="pt")

    call(1, False)  # warm-up: lazy initialisations are not what we measure
    results = []
    for cache in (False, True):
        if cache:
            call(steps, True)  # fills the style cache
        for _ in range(calls):
            with PeakRSS() as mem:
                start, cpu_start = time.perf_counter(), time.thread_time()
                call(steps, cache)
                wall, cpu = time.perf_counter() - start, time.thread_time() - cpu_start
            results.append({"case": case, "style_cache": cache, "wall_s": wall, "cpu_s": cpu,
                            "peak_mib": mem.peak / 2**20})
    return results


def _build_animatediff(kind: str, folder: Path) -> None:
    """Write a random AnimateDiff checkpoint: the tiny or mid SD image model plus a matching motion adapter."""
    from diffusers import AnimateDiffPipeline, MotionAdapter

    from guidekit.testing.animatediff import make_tiny_animatediff

    if kind == "tiny":
        make_tiny_animatediff(folder, max_length=16)
        return
    image_dir = folder / "_image"
    _build_model(kind, image_dir)
    import torch

    torch.manual_seed(0)
    adapter = MotionAdapter(block_out_channels=(192, 384, 768), motion_layers_per_block=1,
                            motion_num_attention_heads=8, motion_norm_num_groups=32, motion_max_seq_length=16)
    AnimateDiffPipeline.from_pretrained(str(image_dir), motion_adapter=adapter).save_pretrained(str(folder))


def _freenoise_pipeline(case: str, folder: str, fusion: str = "block", budget_mib: Optional[float] = None):
    """The AnimateDiff pipeline of `case` and its call's extra arguments: "guidekit"
    (`guidekit.FreeNoise(fusion=fusion)`), "guidekit-split" (with `FREENOISE_SPLIT`) or "diffusers" (`enable_free_noise`); window 16, stride 4,
    pyramid weights, shuffled noise in all three. `budget_mib`: guidekit's `attention_budget` in MiB (None: its
    default)."""
    from diffusers import AnimateDiffPipeline

    import guidekit
    from guidekit.pipelines import GuidedAnimateDiffPipeline

    if case not in FREENOISE_CASES:
        raise ValueError(f"case: {case!r} is not accepted; accepted: {', '.join(FREENOISE_CASES)}")
    if case == "diffusers":
        pipe = AnimateDiffPipeline.from_pretrained(folder)
        pipe.enable_free_noise(context_length=16, context_stride=4, weighting_scheme="pyramid",
                               noise_type="shuffle_context")
        extra = {}
    else:
        pipe = GuidedAnimateDiffPipeline.from_pretrained(folder)
        options = dict(FREENOISE_SPLIT) if case == "guidekit-split" else {}
        if budget_mib is not None:
            options["attention_budget"] = int(budget_mib * 2**20)
        # block fusion (the default here): the same work as diffusers' enable_free_noise, like with like
        extra = {"hooks": [guidekit.FreeNoise(context_length=16, context_stride=4, fusion=fusion, **options)]}
    pipe.set_progress_bar_config(disable=True)
    return pipe, extra


def _freenoise_call(pipe, extra: dict, num_frames: int, steps: int, size: int, seed: int = 0):
    import torch

    with torch.no_grad():
        return pipe("a red circle on a blue background", num_frames=num_frames, height=size, width=size,
                    num_inference_steps=steps, guidance_scale=7.5, output_type="latent",
                    generator=torch.Generator().manual_seed(seed), **extra)


def measure_freenoise_memory(case: str, folder: str, num_frames: int, steps: int, size: int,
                             fusion: str = "block", budget_mib: Optional[float] = None) -> list[dict]:
    """Peak memory of the first call of `case` at `num_frames` frames in this process: `peak_delta_mib` is the
    peak resident set during the call minus the resident set before it (after a warm-up call the allocator
    would hand the same pages back and the rise would hide); wall and thread CPU seconds too; and the
    device-independent count of `record_window_tensors` (MiB): `window_tensor_mib` (the largest gathered query,
    key, value or score tensor), `unbounded_mib` (the same with all rows in one batch) and `full_query_mib`."""
    import torch

    from guidekit.attention.freenoise import record_window_tensors

    torch.set_num_threads(int(os.environ.get("GUIDEKIT_BENCH_THREADS", "1")))
    pipe, extra = _freenoise_pipeline(case, folder, fusion, budget_mib)
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            # weights may be memory-mapped from the checkpoint and paged in on first use: read them now, so
            # that the rise below is the call's own memory, not the model's
            for tensor in (*module.parameters(), *module.buffers()):
                tensor.sum()
    before = _rss_bytes()
    with PeakRSS() as mem, record_window_tensors() as record:
        start, cpu_start = time.perf_counter(), time.thread_time()
        _freenoise_call(pipe, extra, num_frames, steps, size)
        wall, cpu = time.perf_counter() - start, time.thread_time() - cpu_start
    return [{"case": case, "frames": num_frames, "wall_s": wall, "cpu_s": cpu,
             "peak_delta_mib": (mem.peak - before) / 2**20, "window_tensor_mib": record.largest / 2**20,
             "unbounded_mib": record.unbounded / 2**20, "full_query_mib": record.full_query / 2**20}]


def time_freenoise(folder: str, frames: tuple[int, int], steps: int, size: int, rounds: int,
                   fusion: str = "block", budget_mib: Optional[float] = None) -> list[dict]:
    """Time per call, in this process: guidekit's FreeNoise at the short and the long length of `frames` and
    diffusers' `enable_free_noise` at the long one, after one warm-up call each, then `rounds` rounds of one
    call each, alternated in a rotating order (so that a slow spell of a shared machine falls on all three).
    Wall and thread CPU seconds of each call."""
    import torch

    torch.set_num_threads(int(os.environ.get("GUIDEKIT_BENCH_THREADS", "1")))
    short, long = frames
    pipes = {case: _freenoise_pipeline(case, folder, fusion, budget_mib) for case in ("guidekit", "diffusers")}
    cases = [("guidekit", short), ("guidekit", long), ("diffusers", long)]
    for case, num_frames in cases:
        _freenoise_call(*pipes[case], num_frames, 1, size)  # warm-up: lazy initialisations are not measured
    results = []
    for r in range(rounds):
        for case, num_frames in cases[r % 3:] + cases[: r % 3]:
            start, cpu_start = time.perf_counter(), time.thread_time()
            _freenoise_call(*pipes[case], num_frames, steps, size)
            wall, cpu = time.perf_counter() - start, time.thread_time() - cpu_start
            results.append({"case": case, "frames": num_frames, "wall_s": wall, "cpu_s": cpu})
    return results


# ----------------------------------------------------------------------------- driver


def _run_freenoise_worker(kind: str, *args) -> list[dict]:
    """Run `time_freenoise(*args)` ("time") or `measure_freenoise_memory(*args)` ("memory") in a fresh process."""
    payload = json.dumps([kind, [str(a) if isinstance(a, Path) else a for a in args]])
    cmd = [sys.executable, "-m", "guidekit.apps.bench", "--freenoise-worker", payload]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if out.returncode != 0:
        raise click.ClickException(f"benchmark worker FreeNoise {kind} {args[1:]} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _median(results: list[dict], case: str, frames: int, key: str) -> float:
    return statistics.median(r[key] for r in results if r["case"] == case and r["frames"] == frames)


def freenoise_rows(model: str, rounds: int, steps: int, size: int, frames: tuple[int, int] = (16, 64),
                   memory_frames: tuple[int, ...] = (16, 64, 128),
                   fusion: str = "block", budget_mib: Optional[float] = None) -> tuple[list[dict], list[dict], list[dict]]:
    """The FreeNoise tables on the `model` AnimateDiff checkpoint: (time rows, memory rows, raw results), with
    guidekit's FreeNoise at `fusion` ("block" or "attention") and `attention_budget` `budget_mib` MiB (None:
    its default).

    Time: one fresh process runs `time_freenoise` (`rounds` alternated calls per case). Memory: one fresh
    process per length of `memory_frames`, with and without splitting, its first call measured.
    """
    short, long = frames
    with tempfile.TemporaryDirectory(prefix="guidekit-bench-freenoise-") as tmp:
        folder = Path(tmp) / model
        _build_animatediff(model, folder)
        with click.progressbar(length=1 + 2 * len(memory_frames), label=f"bench FreeNoise {model}") as bar:
            raw = _run_freenoise_worker("time", folder, list(frames), steps, size, rounds, fusion, budget_mib)
            bar.update(1)
            memory = []
            for f in memory_frames:
                for case in ("guidekit", "guidekit-split"):
                    memory.extend(_run_freenoise_worker("memory", case, folder, f, steps, size, fusion, budget_mib))
                    bar.update(1)
    for row in raw + memory:
        row.update(model=model, steps=steps, size=size, fusion=fusion)

    def per_frame(case, f, key):
        return _median(raw, case, f, key) / f

    common = {"model": model, "steps": steps, "size": size, "runs": rounds, "fusion": fusion}
    label = "" if fusion == "block" else f" ({fusion} fusion)"
    time_rows = [
        {"case": f"guidekit FreeNoise{label}, time per frame F={long} vs F={short}", "target": "<= 1.10",
         "wall_ratio": per_frame("guidekit", long, "wall_s") / per_frame("guidekit", short, "wall_s"),
         "cpu_ratio": per_frame("guidekit", long, "cpu_s") / per_frame("guidekit", short, "cpu_s"),
         "a_ms_per_frame": 1e3 * per_frame("guidekit", long, "cpu_s"),
         "b_ms_per_frame": 1e3 * per_frame("guidekit", short, "cpu_s"), **common},
        {"case": f"guidekit FreeNoise{label} vs diffusers enable_free_noise, F={long}", "target": "<= 1.00",
         "wall_ratio": _median(raw, "guidekit", long, "wall_s") / _median(raw, "diffusers", long, "wall_s"),
         "cpu_ratio": _median(raw, "guidekit", long, "cpu_s") / _median(raw, "diffusers", long, "cpu_s"),
         "a_ms_per_frame": 1e3 * per_frame("guidekit", long, "cpu_s"),
         "b_ms_per_frame": 1e3 * per_frame("diffusers", long, "cpu_s"), **common},
    ]
    memory_rows = []
    for f in memory_frames:
        plain = _median(memory, "guidekit", f, "peak_delta_mib")
        split = _median(memory, "guidekit-split", f, "peak_delta_mib")
        memory_rows.append({"frames": f, "unsplit_mib": plain, "split_mib": split,
                            "split_ratio": split / plain if plain > 0 else float("nan"), "model": model,
                            "steps": steps, "size": size, "fusion": fusion,
                            **{key: _median(memory, "guidekit", f, key)
                               for key in ("window_tensor_mib", "unbounded_mib", "full_query_mib")},
                            "split_window_tensor_mib": _median(memory, "guidekit-split", f, "window_tensor_mib")})
    return time_rows, memory_rows, raw + memory


def format_freenoise_tables(time_rows: list[dict], memory_rows: list[dict]) -> str:
    """The FreeNoise time and memory tables as markdown."""
    lines = ["| FreeNoise case | target | wall ratio | CPU ratio | CPU ms/frame (first) | CPU ms/frame (second) "
             "| model, size, steps | runs |", "|---|---|---|---|---|---|---|---|"]
    for row in time_rows:
        lines.append(f"| {row['case']} | {row['target']} | {row['wall_ratio']:.3f}x | {row['cpu_ratio']:.3f}x | "
                     f"{row['a_ms_per_frame']:.1f} | {row['b_ms_per_frame']:.1f} | "
                     f"{row['model']}, {row['size']} px, {row['steps']} | {row['runs']} |")
    split = ", ".join(f"{k}={v}" for k, v in FREENOISE_SPLIT.items())
    lines += ["", f"| frames | peak RSS rise, unsplit (MiB) | peak RSS rise, split ({split}) (MiB) | split / unsplit "
              "| largest gathered Q/K/V/score (MiB), unsplit | split | unbounded | full-length query (MiB) "
              "| model, size, steps, fusion |", "|---|---|---|---|---|---|---|---|---|"]
    for row in memory_rows:
        lines.append(f"| {row['frames']} | {row['unsplit_mib']:.0f} | {row['split_mib']:.0f} | "
                     f"{row['split_ratio']:.3f} | {row['window_tensor_mib']:.3f} | {row['split_window_tensor_mib']:.3f} | "
                     f"{row['unbounded_mib']:.3f} | {row['full_query_mib']:.3f} | "
                     f"{row['model']}, {row['size']} px, {row['steps']}, {row['fusion']} |")
    return "\n".join(lines)


def _run_worker(case, folder, steps, size):
    cmd = [sys.executable, "-m", "guidekit.apps.bench", "--worker", case, str(folder), str(steps), str(size)]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if out.returncode != 0:
        raise click.ClickException(f"benchmark worker {case} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def summarise(results: list[dict], cases=CASES) -> list[dict]:
    """Median wall time and peak memory per case, and their ratios to stock (the first case)."""
    rows = []
    for case in cases:
        runs = [r for r in results if r["case"] == case]
        rows.append({
            "case": case,
            "wall_s": statistics.median(r["wall_s"] for r in runs),
            "cpu_s": statistics.median(r["cpu_s"] for r in runs),
            "peak_mib": statistics.median(r["peak_mib"] for r in runs),
            "runs": len(runs),
        })
    base = rows[0]
    for row in rows:
        row["wall_ratio"] = row["wall_s"] / base["wall_s"]
        row["cpu_ratio"] = row["cpu_s"] / base["cpu_s"]
        row["mem_ratio"] = row["peak_mib"] / base["peak_mib"]
    return rows


def format_table(tables: dict[str, list[dict]]) -> str:
    lines = ["| model | pipeline | wall (s, median) | wall vs stock | CPU (s, median) | CPU vs stock "
             "| peak RSS (MiB) | memory vs stock | runs |",
             "|---|---|---|---|---|---|---|---|---|"]
    label = {"stock": "stock diffusers", "cfg": "guidekit CFG()", "apg": "guidekit APG()",
             ELUCD_CASE: "guidekit CFG() + EluCD()"}
    for model, rows in tables.items():
        for row in rows:
            lines.append(f"| {model} | {label.get(row['case'], row['case'])} | {row['wall_s']:.3f} | "
                         f"{row['wall_ratio']:.3f}x | {row['cpu_s']:.3f} | {row['cpu_ratio']:.3f}x | "
                         f"{row['peak_mib']:.0f} | {row['mem_ratio']:.3f}x | {row['runs']} |")
    return "\n".join(lines)


def elucd_rows(tables: dict[str, list[dict]]) -> list[dict]:
    """CFG + EluCD against CFG alone, per model, from the medians of the same run."""
    rows = []
    for model, table in tables.items():
        by_case = {row["case"]: row for row in table}
        if ELUCD_CASE not in by_case or "cfg" not in by_case:
            continue
        elucd, cfg = by_case[ELUCD_CASE], by_case["cfg"]
        rows.append({
            "model": model,
            "case": "CFG + EluCD vs CFG",
            "wall_ratio": elucd["wall_s"] / cfg["wall_s"],
            "cpu_ratio": elucd["cpu_s"] / cfg["cpu_s"],
            "mem_ratio": elucd["peak_mib"] / cfg["peak_mib"],
            "elucd_s": elucd["wall_s"],
            "cfg_s": cfg["wall_s"],
        })
    return rows


def format_elucd_table(rows: list[dict]) -> str:
    lines = ["| model | EluCD case | wall vs CFG | CPU vs CFG | peak memory vs CFG | EluCD wall (s) | CFG wall (s) |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['model']} | {row['case']} | {row['wall_ratio']:.3f}x | {row['cpu_ratio']:.3f}x | "
                     f"{row['mem_ratio']:.3f}x | {row['elucd_s']:.3f} | {row['cfg_s']:.3f} |")
    return "\n".join(lines)


def styleid_rows(model: str = "tiny", steps: int = 10, repeats: int = 3, size: int = 64, seed: int = 0) -> list[dict]:
    """StyleID transfer against plain DDIM inversion + reconstruction of the content image, in one process.

    Both run on the same UNet (the `model` checkpoint), alternately after one warm-up call each, and report
    medians (wall and process CPU time; no peak memory, as both share one process). The baseline is guidekit's
    UAM pipeline with uniform maps off (standard attention, null prompt, w = 1): one inversion and one DDIM
    sampling pass. StyleID without its style cache inverts the content and the style and samples once with the
    injection (about three passes); with the cache (its default, a style reused) the style's inversion is skipped.
    """
    import torch

    from guidekit.apps.bench_uam import _alternate
    from guidekit.pipelines import StyleIDStableDiffusionPipeline, UAMStableDiffusionPipeline

    with tempfile.TemporaryDirectory(prefix="guidekit-bench-styleid-") as tmp:
        folder = Path(tmp) / model
        _build_model(model, folder)
        styleid = StyleIDStableDiffusionPipeline.from_pretrained(str(folder))
        plain = UAMStableDiffusionPipeline.from_pretrained(str(folder))
        for pipe in (styleid, plain):
            pipe.unet.eval()
            pipe.set_progress_bar_config(disable=True)
        gen = torch.Generator().manual_seed(seed)
        content, style = torch.rand(1, 3, size, size, generator=gen), torch.rand(1, 3, size, size, generator=gen)

        def baseline():
            return plain.reconstruct(content, "", 1.0, uniform=False, num_inference_steps=steps, output_type="pt")

        def transfer(cache: bool):
            return styleid.transfer(content, style, num_inference_steps=steps, output_type="pt", cache_style=cache)

        fresh = _alternate(lambda: transfer(False), baseline, repeats)
        cached = _alternate(lambda: transfer(True), baseline, repeats)
    common = {"model": model, "steps": steps, "size": size, "repeats": repeats, "threads": torch.get_num_threads()}
    rows = []
    for case, t in (("StyleID transfer (no style cache) vs DDIM inversion + reconstruction", fresh),
                    ("StyleID transfer (style cached) vs DDIM inversion + reconstruction", cached)):
        rows.append({"case": case, "wall_ratio": t["a_wall"] / t["b_wall"], "cpu_ratio": round(t["a_cpu"] / t["b_cpu"], 4),
                     "styleid_s": round(t["a_wall"], 4), "baseline_s": round(t["b_wall"], 4), **common})
    return rows


PIXEL_CASE = "EluCD on a pixel UNet2DModel with a ResNet-50-size classifier (random weights)"
PIXEL_SIZE, PIXEL_STEPS, PIXEL_REPEATS = 64, 3, 3


def pixel_unet(size: int = PIXEL_SIZE):
    """A random pixel `UNet2DModel` with the architecture of google/ddpm-cifar10-32 (Ho et al.'s CIFAR-10 DDPM,
    35.7M parameters: channels 128-256-256-256, two ResNet layers per level, attention at the second level),
    here at `size`×`size` px."""
    import torch
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(sample_size=size, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256),
                       layers_per_block=2,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D")).eval()


#: The preprocessor config of microsoft/resnet-50 (ConvNextImageProcessor: short side to 224 / 0.875, centre crop
#: 224, bicubic, ImageNet statistics): what `TransformersClassifier.from_pretrained("microsoft/resnet-50")` feeds.
RESNET50_PROCESSOR = {
    "image_processor_type": "ConvNextImageProcessor", "do_resize": True, "size": {"shortest_edge": 224},
    "crop_pct": 0.875, "resample": 3, "do_rescale": True, "do_normalize": True,
    "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225],
}


def resnet50_classifier():
    """A transformers `ResNetForImageClassification` with ResNet-50's configuration (bottleneck blocks, depths
    3-4-6-3, 1000 labels, 25.6M parameters), random weights, built in code, with microsoft/resnet-50's
    preprocessing (`RESNET50_PROCESSOR`): it reads 224×224 crops, whatever the pipeline's size, as the adapter
    feeds the real checkpoint."""
    import torch
    from transformers import ResNetConfig, ResNetForImageClassification

    from guidekit.guidance import TransformersClassifier

    torch.manual_seed(1)
    model = ResNetForImageClassification(ResNetConfig(num_labels=1000)).eval()
    return TransformersClassifier(model, preprocessor_config=RESNET50_PROCESSOR)


def classifier_input_size(classifier, size: int) -> str:
    """"H×W" of what `classifier` reads from a size×size sample: its own preprocessing, run once."""
    import torch

    with torch.no_grad():
        h, w = classifier.preprocess(torch.zeros(1, 3, size, size)).shape[-2:]
    return f"{h}x{w}"


def pixel_rows(steps: int = PIXEL_STEPS, repeats: int = PIXEL_REPEATS, size: int = PIXEL_SIZE,
               seed: int = 0) -> list[dict]:
    """Cost per step of EluCD against unguided sampling on a pixel UNet2DModel (DDPMScheduler, EluCD's own setting).

    The stock `DDPMPipeline` and `GuidedDDPMPipeline` with `EluCD(ResNet-50-size classifier)` share one UNet and
    run alternately in this process after one warm-up call each (medians of wall and process CPU time: all the
    process's threads, ``time.process_time``). EluCD computes the classifier's forward and backward pass (to its
    input; the classifier is frozen) at every step, at the size its preprocessing feeds it (``classifier_input``).
    """
    import torch
    from diffusers import DDPMPipeline, DDPMScheduler

    import guidekit
    from guidekit.apps.bench_uam import _alternate
    from guidekit.pipelines import GuidedDDPMPipeline

    torch.set_num_threads(int(os.environ.get("GUIDEKIT_BENCH_THREADS", "1")))
    unet, classifier = pixel_unet(size), resnet50_classifier()
    stock = DDPMPipeline(unet=unet, scheduler=DDPMScheduler())
    guided = GuidedDDPMPipeline(unet=unet, scheduler=DDPMScheduler())
    for pipe in (stock, guided):
        pipe.set_progress_bar_config(disable=True)
    hook = guidekit.EluCD(classifier, 1)

    def call(pipe, **kw):
        return pipe(num_inference_steps=steps, generator=torch.Generator().manual_seed(seed), output_type="np", **kw)

    t = _alternate(lambda: call(guided, hooks=[hook]), lambda: call(stock), repeats)
    millions = lambda m: round(sum(p.numel() for p in m.parameters()) / 1e6, 1)  # noqa: E731
    return [{
        "case": PIXEL_CASE,
        "wall_ratio": t["a_wall"] / t["b_wall"],
        "process_cpu_ratio": round(t["a_cpu"] / t["b_cpu"], 4),
        "elucd_s_per_step": round(t["a_wall"] / steps, 4),
        "unguided_s_per_step": round(t["b_wall"] / steps, 4),
        "unet_M": millions(unet),
        "classifier_M": millions(classifier),
        "size": size, "classifier_input": classifier_input_size(classifier, unet.config.sample_size), "steps": steps, "repeats": repeats, "threads": torch.get_num_threads(),
    }]


#: The latent EluCD row's sizes: the DiT transformer (heads × head dim, layers; patch 2, learned sigma) and the
#: image side. The SD VAE, the AutoencoderTiny (TAESD's architecture) and the ResNet-50-size classifier are
#: full-size at every size; only the image side changes their cost.
DIT_SIZES = {
    "tiny": {"heads": 6, "head_dim": 64, "layers": 12, "px": 64},  # DiT-S/2 at 64 px: seconds
    "mid": {"heads": 16, "head_dim": 72, "layers": 28, "px": 128},  # DiT-XL/2 at 128 px: minutes on 2 cores
    "dit-xl": {"heads": 16, "head_dim": 72, "layers": 28, "px": 256},  # DiT-XL/2 at 256 px, the paper's
}
DIT_STEPS = 2


def dit_models(size: str):
    """Random-weight DiT transformer, SD VAE (128-256-512-512, 83.7M parameters) and diffusers' `AutoencoderTiny`
    with its default configuration (TAESD's architecture, 2.4M parameters; only its decoder runs) at `size`."""
    import torch
    from diffusers import AutoencoderKL, AutoencoderTiny, DiTTransformer2DModel

    spec = DIT_SIZES[size]
    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(
        num_attention_heads=spec["heads"], attention_head_dim=spec["head_dim"], num_layers=spec["layers"],
        in_channels=4, out_channels=8, patch_size=2, sample_size=spec["px"] // 8).eval()
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=spec["px"],
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        scaling_factor=0.18215).eval()
    tiny = AutoencoderTiny().eval()
    return transformer, vae, tiny


def step_timer():
    """A hook that records each denoising step's wall and thread-CPU seconds (step_begin → step_end)."""
    from guidekit.hooks import SamplerHook

    class StepTimer(SamplerHook):
        def __init__(self):
            self.wall, self.cpu = [], []

        def step_begin(self, state):
            self._start = (time.perf_counter(), time.thread_time())

        def step_end(self, state):
            self.wall.append(time.perf_counter() - self._start[0])
            self.cpu.append(time.thread_time() - self._start[1])

    return StepTimer()


def dit_rows(size: str = "tiny", repeats: int = 2, steps: int = DIT_STEPS, seed: int = 0) -> list[dict]:
    """Cost per step of EluCD on a latent DiT model against unguided sampling, with the pipeline's SD VAE and with
    a lightweight `AutoencoderTiny` decoding the classifier's input (`EluCD(..., decoder=...)`).

    `GuidedDiTPipeline` (DDPMScheduler, guidance scale 1: no null-class pass, so the comparison is against a
    single transformer forward) runs the three cases in turn, one warm-up call each, then `repeats` rounds. Each
    step is timed inside the loop (transformer, guidance, EluCD's decode + classifier forward and backward, the
    scheduler step; not the final VAE decode), so the ratios are per step. EluCD corrects every step (its
    default window, start 0, stop 1) with the ResNet-50-size random classifier.
    """
    import torch
    from diffusers import DDPMScheduler

    import guidekit
    from guidekit.pipelines import GuidedDiTPipeline

    torch.set_num_threads(int(os.environ.get("GUIDEKIT_BENCH_THREADS", "1")))
    transformer, vae, tiny = dit_models(size)
    classifier = resnet50_classifier()
    pipe = GuidedDiTPipeline(transformer=transformer, vae=vae, scheduler=DDPMScheduler())
    pipe.set_progress_bar_config(disable=True)
    cases = {
        "unguided": lambda: [],
        "EluCD, SD VAE decode": lambda: [guidekit.EluCD(classifier, 1)],
        "EluCD, AutoencoderTiny decode": lambda: [guidekit.EluCD(classifier, 1, decoder=tiny)],
    }
    timings = {name: {"wall": [], "cpu": []} for name in cases}
    names = list(cases)
    for r in range(repeats + 1):  # round 0 is the warm-up
        for name in names[r % len(names):] + names[: r % len(names)]:
            timer = step_timer()
            pipe([1], guidance_scale=1.0, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed),
                 output_type="pt", hooks=cases[name]() + [timer])
            if r:
                timings[name]["wall"].extend(timer.wall)
                timings[name]["cpu"].extend(timer.cpu)
    med = {name: {k: statistics.median(v) for k, v in t.items()} for name, t in timings.items()}
    base = med["unguided"]
    millions = lambda m: round(sum(p.numel() for p in m.parameters()) / 1e6, 1)  # noqa: E731
    common = {"size": size, "px": DIT_SIZES[size]["px"], "transformer_M": millions(transformer),
              "vae_decoder_M": millions(vae.decoder) + millions(vae.post_quant_conv),
              "tiny_decoder_M": millions(tiny.decoder), "classifier_M": millions(classifier), "steps": steps,
              "timed_steps": steps * repeats, "threads": torch.get_num_threads(),
              "unguided_s_per_step": round(base["wall"], 4)}
    return [{"case": f"DiT {name} vs unguided", "wall_ratio": med[name]["wall"] / base["wall"],
             "cpu_ratio": round(med[name]["cpu"] / base["cpu"], 4), "s_per_step": round(med[name]["wall"], 4),
             **common} for name in names[1:]]


def stylessp_rows(models, rounds: int, steps: int, sizes: dict) -> tuple[list[dict], list[dict]]:
    """StyleID + StyleSSP against StyleID, per transfer, on each of `models`: each case runs in its own process
    `rounds` times (interleaved, the first case alternating), three timed transfers each without the style cache
    and three with it. Rows: medians' ratios of wall time, thread CPU time and peak RSS, and the medians
    themselves. Returns (rows, raw results)."""
    rows, raw = [], []
    with tempfile.TemporaryDirectory(prefix="guidekit-bench-stylessp-") as tmp:
        for model in models:
            folder = Path(tmp) / model
            _build_model(model, folder)
            results = []
            with click.progressbar(length=rounds * len(TRANSFER_CASES), label=f"bench StyleSSP {model}") as bar:
                for r in range(rounds):
                    order = TRANSFER_CASES[r % 2:] + TRANSFER_CASES[: r % 2]
                    for case in order:
                        results.extend(_run_worker(case, folder, steps, sizes[model]))
                        bar.update(1)
            for row in results:
                row["model"] = model
            raw.extend(results)
            for cache in (False, True):
                med = {}
                for case in TRANSFER_CASES:
                    runs = [x for x in results if x["case"] == case and x["style_cache"] is cache]
                    med[case] = {k: statistics.median(x[k] for x in runs) for k in ("wall_s", "cpu_s", "peak_mib")}
                    med[case]["runs"] = len(runs)
                ssp, sid = med["stylessp-transfer"], med["styleid-transfer"]
                rows.append({
                    "case": f"StyleID + StyleSSP() vs StyleID, {model}, style {'cached' if cache else 'not cached'}",
                    "wall_ratio": ssp["wall_s"] / sid["wall_s"],
                    "mem_ratio": round(ssp["peak_mib"] / sid["peak_mib"], 4),
                    "cpu_ratio": round(ssp["cpu_s"] / sid["cpu_s"], 4),
                    "stylessp_s": round(ssp["wall_s"], 4), "styleid_s": round(sid["wall_s"], 4),
                    "stylessp_peak_mib": round(ssp["peak_mib"], 1), "styleid_peak_mib": round(sid["peak_mib"], 1),
                    "model": model, "steps": steps, "size": sizes[model], "runs": ssp["runs"],
                    "threads": int(os.environ.get("GUIDEKIT_BENCH_THREADS", "1")),
                })
    return rows, raw


def _echo_ratio_table(case_header: str, ratio_header: str, rows: list) -> None:
    """Print rows of {"case", "wall_ratio", ...details} as a markdown table."""
    click.echo("")
    click.echo(f"| {case_header} | {ratio_header} | detail |")
    click.echo("|---|---|---|")
    for row in rows:
        detail = ", ".join(f"{k}={v}" for k, v in row.items() if k not in ("case", "wall_ratio"))
        click.echo(f"| {row['case']} | {row['wall_ratio']:.3f}x | {detail} |")


def _frames(text: str, name: str, count: Optional[int] = None) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if not values or any(v < 1 for v in values) or (count is not None and len(values) != count):
        wanted = f"{count} " if count else ""
        raise click.BadParameter(f"{text!r}; accepted: {wanted}comma-separated frame counts >= 1", param_hint=name)
    return values


@click.command(context_settings={"show_default": True})
@click.option("--sd/--no-sd", default=True, help="The main table: stock SD against guidekit CFG, APG (and EluCD).")
@click.option("--models", default="tiny,mid", help="Comma-separated: tiny (tiny SD), mid (~110M-parameter UNet).")
@click.option("--rounds", type=click.IntRange(1, 50), default=4, help="Interleaved rounds (one process per case each).")
@click.option("--steps", type=click.IntRange(1, 200), default=20, help="Denoising steps per timed call.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the raw runs and the summary as JSON.")
@click.option("--uam/--no-uam", default=True, help="Add the UAM rows (inversion and editing) when UAM is installed.")
@click.option("--elucd/--no-elucd", default=True,
              help="Add the EluCD rows: CFG + EluCD (tiny random ResNet classifier) against stock and against CFG.")
@click.option("--pixel/--no-pixel", default=False,
              help="Add the pixel EluCD row: cost per step of EluCD with a ResNet-50-size random classifier against "
                   "unguided sampling on a 35.7M-parameter pixel UNet2DModel at 64x64 (3 steps, 3 alternated calls "
                   "each). Off by default: about a minute on a 2-core CPU.")
@click.option("--dit/--no-dit", default=False,
              help="Add the latent EluCD rows: cost per step of EluCD on a random DiT against unguided sampling, "
                   "decoding the classifier's input with the SD VAE and with AutoencoderTiny (--dit-size).")
@click.option("--dit-size", type=click.Choice(tuple(DIT_SIZES)), default="tiny",
              help="DiT rows: tiny = DiT-S/2 at 64 px (seconds); mid = DiT-XL/2 at 128 px (minutes on 2 cores); "
                   "dit-xl = DiT-XL/2 at 256 px, the paper's size (long on a CPU). SD VAE, AutoencoderTiny and "
                   "the ResNet-50-size classifier are full-size at every size.")
@click.option("--dit-repeats", type=click.IntRange(1, 20), default=2,
              help=f"DiT rows: timed calls per case ({DIT_STEPS} steps each) after one warm-up call.")
@click.option("--styleid/--no-styleid", default=True,
              help="Add the StyleID rows: transfer against DDIM inversion + reconstruction of the content image "
                   "(on mid when chosen, else tiny; --steps steps, 3 alternated calls each).")
@click.option("--stylessp/--no-stylessp", default=True,
              help="Add the StyleSSP rows: StyleID + StyleSSP() against StyleID per transfer (wall time, CPU time and "
                   "peak memory; each case in fresh processes, --rounds rounds, on every model of --models).")
@click.option("--freenoise/--no-freenoise", default=False,
              help="Add the FreeNoise rows: time per frame at F=64 vs F=16, guidekit vs diffusers' enable_free_noise "
                   "at F=64, and peak memory at F=16, 64, 128 with and without splitting (AnimateDiff; see the "
                   "--freenoise-* options).")
@click.option("--freenoise-model", type=click.Choice(MODELS), default="tiny",
              help="The image model under the random motion adapter of the FreeNoise rows.")
@click.option("--freenoise-size", type=click.IntRange(8, 512), default=64, help="FreeNoise rows: height and width (px).")
@click.option("--freenoise-steps", type=click.IntRange(1, 200), default=2, help="FreeNoise rows: denoising steps.")
@click.option("--freenoise-frames", default="16,64", help="FreeNoise time rows: the short and the long length.")
@click.option("--freenoise-memory-frames", default="16,64,128", help="FreeNoise memory rows: the lengths.")
@click.option("--flow/--no-flow", default=False,
              help="Flow-matching rows: hooked CFG and APG against the stock pipeline per family, on tiny components.")
@click.option("--flow-families", default="sd3,flux,qwenimage,wan", help="Flow rows: comma-separated families.")
@click.option("--flow-rounds", type=click.IntRange(1, 200), default=9, help="Flow rows: interleaved calls per case.")
@click.option("--flow-steps", type=click.IntRange(1, 200), default=4, help="Flow rows: denoising steps per call.")
@click.option("--freenoise-fusion", type=click.Choice(("block", "attention")), default="block",
              help="FreeNoise rows: guidekit's fusion. block (default): diffusers' fusion point, the same work as "
                   "enable_free_noise; attention: FreeNoise's default, with each frame's projections shared by its "
                   "windows.")
@click.option("--freenoise-attention-budget", type=FiniteFloatRange(min=0.0, min_open=True), default=None,
              help="FreeNoise rows: guidekit's attention_budget in MiB (default: FreeNoise's, 64 MiB); it bounds the "
                   "largest gathered Q/K/V/score tensor of attention fusion.")
def bench(sd, models, rounds, steps, json_out, uam, elucd, pixel, dit, dit_size, dit_repeats, styleid, stylessp, freenoise,
          freenoise_model, freenoise_size, freenoise_steps, freenoise_frames, freenoise_memory_frames, freenoise_fusion,
          freenoise_attention_budget, flow, flow_families, flow_rounds, flow_steps):
    """Time and memory of hooked pipelines (CFG, APG, CFG + EluCD) against stock diffusers, as a table; StyleID,
    StyleID + StyleSSP and UAM against their plain baselines; FreeNoise against itself and diffusers'."""
    chosen = [m.strip() for m in models.split(",") if m.strip()]
    for m in chosen:
        if m not in MODELS:
            raise click.BadParameter(f"{m!r}; accepted: {', '.join(MODELS)}", param_hint="--models")
    time_frames = _frames(freenoise_frames, "--freenoise-frames", 2)
    memory_frames = _frames(freenoise_memory_frames, "--freenoise-memory-frames")
    sizes = {"tiny": 32, "mid": 64}
    cases = CASES + ((ELUCD_CASE,) if elucd else ())
    tables, raw = {}, {}
    with tempfile.TemporaryDirectory(prefix="guidekit-bench-") as tmp:
        for model in chosen if sd else ():
            folder = Path(tmp) / model
            _build_model(model, folder)
            results = []
            with click.progressbar(length=rounds * len(cases), label=f"bench {model}") as bar:
                for r in range(rounds):
                    order = cases[r % len(cases):] + cases[: r % len(cases)]  # rotate who goes first
                    for case in order:
                        results.extend(_run_worker(case, folder, steps, sizes[model]))
                        bar.update(1)
            tables[model] = summarise(results, cases)
            raw[model] = results
    if tables:
        click.echo(format_table(tables))
    elucd_summary = elucd_rows(tables) if elucd else []
    if elucd_summary:
        click.echo("")
        click.echo(format_elucd_table(elucd_summary))
    pixel_summary = pixel_rows() if pixel else []
    if pixel_summary:
        _echo_ratio_table("pixel EluCD case", "wall per step vs unguided", pixel_summary)
    dit_summary = dit_rows(dit_size, dit_repeats) if dit else []
    if dit_summary:
        _echo_ratio_table("latent EluCD case", "wall per step vs unguided", dit_summary)
    styleid_summary = []
    if styleid:
        model = "mid" if "mid" in chosen else "tiny"
        styleid_summary = styleid_rows(model, steps=steps, size=sizes[model])
        _echo_ratio_table("StyleID case", "wall vs baseline", styleid_summary)
    stylessp_summary, stylessp_raw = stylessp_rows(chosen, rounds, steps, sizes) if stylessp else ([], [])
    if stylessp_summary:
        _echo_ratio_table("StyleSSP case", "wall vs StyleID", stylessp_summary)
    extra = []
    if uam:
        try:
            from guidekit.apps.bench_uam import uam_rows
        except ImportError:
            uam_rows = None
        if uam_rows is not None:
            extra = uam_rows()
            _echo_ratio_table("UAM case", "wall vs baseline", extra)
    freenoise_summary = {}
    if freenoise:
        time_rows, memory_rows, freenoise_raw = freenoise_rows(
            freenoise_model, rounds, freenoise_steps, freenoise_size, time_frames, memory_frames, freenoise_fusion,
            freenoise_attention_budget)
        click.echo("")
        click.echo(format_freenoise_tables(time_rows, memory_rows))
        freenoise_summary = {"time": time_rows, "memory": memory_rows, "runs": freenoise_raw}
    flow_summary = []
    if flow:
        from guidekit.apps.bench_flow import FLOW_FAMILIES, flow_rows, format_flow_table

        families = [f.strip() for f in flow_families.split(",") if f.strip()]
        for family in families:
            if family not in FLOW_FAMILIES:
                raise click.BadParameter(f"{family!r}; accepted: {', '.join(FLOW_FAMILIES)}", param_hint="--flow-families")
        flow_summary = flow_rows(families, rounds=flow_rounds, steps=flow_steps)
        click.echo("")
        click.echo(format_flow_table(flow_summary))
    if json_out:
        json_out.write_text(json.dumps({"summary": tables, "runs": raw, "elucd": elucd_summary, "pixel": pixel_summary,
                                         "dit": dit_summary,
                                         "styleid": styleid_summary,
                                         "stylessp": {"summary": stylessp_summary, "runs": stylessp_raw},
                                         "uam": extra, "freenoise": freenoise_summary, "flow": flow_summary}, indent=2))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--freenoise-worker":
        kind, args = json.loads(argv[1])
        run = time_freenoise if kind == "time" else measure_freenoise_memory
        print(json.dumps(run(*args)))
        return
    if argv and argv[0] == "--worker":
        case, folder, steps, size = argv[1], argv[2], int(argv[3]), int(argv[4])
        run = measure_transfer if case in TRANSFER_CASES else measure
        print(json.dumps(run(case, folder, steps, size)))
        return
    bench(argv)


if __name__ == "__main__":
    main()
