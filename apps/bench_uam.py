"""UAM rows of `guidekit bench`: what uniform maps and the adaptive mask cost, on this machine.

Two comparisons, each on one UNet in one process, timed alternately (A, B, A, B, ...) after a warm-up call
of each, reported as medians:

* UAM inversion (uniform cross-attention maps, null prompt) vs standard-attention DDIM inversion (null
  prompt, w = 1) — the uniform layer skips Q, QKᵀ, softmax and the per-position output projection, so the
  ratio should be below 1 (target ≤ 0.95; how far below depends on the share of cross-attention in the UNet);
* UAM editing (auxiliary uniform-map branch + adaptive mask, inversion of two branches) vs plain DDIM
  inversion + MasaCtrl editing — the paper expects ≈ +25% (5 instead of 4 UNet rows per step).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable, List

__all__ = ["uam_rows"]


def _pipeline(model: str, folder: Path):
    from guidekit.pipelines import UAMStableDiffusionPipeline
    from guidekit.testing import make_mid_unet, make_tiny_sd

    make_tiny_sd(folder)
    pipe = UAMStableDiffusionPipeline.from_pretrained(str(folder))
    if model == "mid":  # ~110M-parameter UNet, cross-attention dim 32 like the tiny text encoder
        pipe.unet = make_mid_unet()
        pipe.register_modules(unet=pipe.unet)
    elif model != "tiny":
        raise ValueError(f"model: {model!r} is not accepted; accepted: 'tiny', 'mid'")
    pipe.unet.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _alternate(a: Callable[[], object], b: Callable[[], object], repeats: int) -> dict:
    """Median wall and process-CPU seconds of `a` and of `b`, run alternately after one warm-up each.

    CPU time is reported next to wall time because on a shared machine wall time mostly measures the
    neighbours; on an idle machine with one thread the two agree.
    """
    a()
    b()
    times = {"a_wall": [], "a_cpu": [], "b_wall": [], "b_cpu": []}
    for _ in range(repeats):
        for key, fn in (("a", a), ("b", b)):
            w0, c0 = time.perf_counter(), time.process_time()
            fn()
            times[f"{key}_wall"].append(time.perf_counter() - w0)
            times[f"{key}_cpu"].append(time.process_time() - c0)
    return {k: statistics.median(v) for k, v in times.items()}


def _row(case: str, t: dict, common: dict) -> dict:
    return {
        "case": case,
        "wall_ratio": t["a_wall"] / t["b_wall"],
        "cpu_ratio": round(t["a_cpu"] / t["b_cpu"], 4),
        "uam_s": round(t["a_wall"], 4),
        "baseline_s": round(t["b_wall"], 4),
        **common,
    }


def uam_rows(model: str = "mid", steps: int = 10, repeats: int = 3, size: int = 64, seed: int = 0) -> List[dict]:
    """Benchmark rows for `guidekit bench` (plain dicts with at least "case" and "wall_ratio").

    Args:
        model (`str`, defaults to ``"mid"``): ``"mid"`` (~110M-parameter UNet on tiny VAE/text encoder) or
            ``"tiny"`` (the tiny random test pipeline).
        steps (`int`, defaults to `10`): DDIM steps per call.
        repeats (`int`, defaults to `3`): timed calls per case (median reported).
        size (`int`, defaults to `64`): image side in pixels (latents are size/2 with the tiny VAE).
        seed (`int`, defaults to `0`): seed of the random input image.
    """
    import torch

    with tempfile.TemporaryDirectory(prefix="guidekit-bench-uam-") as tmp:
        pipe = _pipeline(model, Path(tmp) / "sd")
        image = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(seed))

        inversion = _alternate(
            lambda: pipe.invert(image, "", 1.0, uniform=True, num_inference_steps=steps),
            lambda: pipe.invert(image, "", 1.0, uniform=False, num_inference_steps=steps),
            repeats,
        )
        edit = dict(num_inference_steps=steps, start_step=min(4, steps), recon_t=500, output_type="pt")
        editing = _alternate(
            lambda: pipe.edit(image, "a red circle", "a blue circle", adaptive_mask=True, **edit),
            lambda: pipe.edit(image, "a red circle", "a blue circle", adaptive_mask=False, **edit),
            repeats,
        )
    common = {"model": model, "steps": steps, "size": size, "repeats": repeats, "threads": torch.get_num_threads()}
    return [
        _row("UAM inversion vs standard-attention inversion", inversion, common),
        _row("UAM editing vs plain MasaCtrl editing", editing, common),
    ]
