"""Bench rows for the flow-matching families: the hooked pipeline with CFG and with APG against the stock pipeline,
wall time per call, interleaved call by call in one process on the tiny random components (`guidekit bench --flow`).

Each family's tiny checkpoint is built offline and loaded with `from_pretrained` by the stock class, and the hooked
class shares its modules (`from_pipe`), so that only the denoising loop differs (two separately loaded copies of
the weights differed by a few percent in speed on their own); the three cases
run in a rotating order for `rounds` rounds after one warm-up call each, and the table reports the median wall time
of each case and its ratio against stock in the same run, in wall time and in the calling thread's CPU time.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

FLOW_CASES = ("stock", "cfg", "apg")


def _sd3(folder: Path):
    from diffusers import StableDiffusion3Pipeline

    from guidekit.pipelines import GuidedStableDiffusion3Pipeline
    from guidekit.testing.flow import make_tiny_sd3

    make_tiny_sd3(folder)
    return StableDiffusion3Pipeline, GuidedStableDiffusion3Pipeline, dict(height=32, width=32, guidance_scale=5.0)


def _flux(folder: Path):
    from diffusers import FluxPipeline

    from guidekit.pipelines import GuidedFluxPipeline
    from guidekit.testing.flux import make_tiny_flux

    make_tiny_flux(folder)
    return FluxPipeline, GuidedFluxPipeline, dict(height=16, width=16, true_cfg_scale=4.0, negative_prompt="blurry",
                                                  max_sequence_length=48)


def _qwenimage(folder: Path):
    from diffusers import QwenImagePipeline

    from guidekit.pipelines import GuidedQwenImagePipeline
    from guidekit.testing.qwenimage import make_tiny_qwenimage

    make_tiny_qwenimage(folder)
    return QwenImagePipeline, GuidedQwenImagePipeline, dict(height=32, width=32, true_cfg_scale=4.0,
                                                            negative_prompt="blurry", max_sequence_length=16)


def _wan(folder: Path):
    from diffusers import WanPipeline

    from guidekit.pipelines import GuidedWanPipeline
    from guidekit.testing.wan import make_tiny_wan

    make_tiny_wan(folder, scheduler="unipc")
    return WanPipeline, GuidedWanPipeline, dict(height=16, width=16, num_frames=9, guidance_scale=5.0,
                                                negative_prompt="blurry", max_sequence_length=16)


#: family -> builder(folder) -> (stock class, hooked class, call kwargs that turn guidance on)
FLOW_FAMILIES: dict[str, Callable] = {"sd3": _sd3, "flux": _flux, "qwenimage": _qwenimage, "wan": _wan}


def flow_rows(families, rounds: int = 5, steps: int = 4, seed: int = 0) -> list[dict]:
    """Median wall time per call of stock, hooked CFG and hooked APG per family, and the ratios against stock."""
    import torch

    import guidekit

    torch.set_num_threads(int(os.environ.get("GUIDEKIT_BENCH_THREADS", "1")))
    rows = []
    for family in families:
        if family not in FLOW_FAMILIES:
            raise ValueError(f"families: {family!r} is not accepted; accepted: {', '.join(FLOW_FAMILIES)}")
        with tempfile.TemporaryDirectory(prefix=f"guidekit-bench-{family}-") as tmp:
            stock_cls, hooked_cls, call_kwargs = FLOW_FAMILIES[family](Path(tmp))
            stock = stock_cls.from_pretrained(tmp)
            hooked = hooked_cls.from_pipe(stock)  # the same modules: only the denoising loop differs
            for pipe in (stock, hooked):
                pipe.set_progress_bar_config(disable=True)
            runs = {
                "stock": lambda n: stock("a red circle", num_inference_steps=n, output_type="latent",
                                         generator=torch.Generator().manual_seed(seed), **call_kwargs),
                "cfg": lambda n: hooked("a red circle", num_inference_steps=n, output_type="latent", hooks=[guidekit.CFG()],
                                        generator=torch.Generator().manual_seed(seed), **call_kwargs),
                "apg": lambda n: hooked("a red circle", num_inference_steps=n, output_type="latent", hooks=[guidekit.APG()],
                                        generator=torch.Generator().manual_seed(seed), **call_kwargs),
            }
            for run in runs.values():
                run(1)  # warm-up
            times = {case: [] for case in FLOW_CASES}
            cpu = {case: [] for case in FLOW_CASES}
            for r in range(rounds):
                order = FLOW_CASES[r % 3:] + FLOW_CASES[: r % 3]
                for case in order:
                    start, cpu_start = time.perf_counter(), time.thread_time()
                    runs[case](steps)
                    times[case].append(time.perf_counter() - start)
                    cpu[case].append(time.thread_time() - cpu_start)
        medians = {case: statistics.median(t) for case, t in times.items()}
        cpu_medians = {case: statistics.median(t) for case, t in cpu.items()}
        for case in FLOW_CASES:
            rows.append({"family": family, "case": case, "wall_s": medians[case],
                         "ratio": medians[case] / medians["stock"], "cpu_ratio": cpu_medians[case] / cpu_medians["stock"],
                         "calls": rounds, "steps": steps})
    return rows


def format_flow_table(rows: list[dict]) -> str:
    lines = ["| family | case | wall per call (s) | wall vs stock | CPU vs stock | calls x steps |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['family']} | {row['case']} | {row['wall_s']:.4f} | {row['ratio']:.3f}x | "
                     f"{row['cpu_ratio']:.3f}x | {row['calls']} x {row['steps']} |")
    return "\n".join(lines)
