"""`guidekit train-toy-motion`: train the embedded motion model (a MotionAdapter for the toy image model).

    python -m guidekit.apps.train_toy_motion --out assets/toy-motion     # installed package
    PYTHONPATH=. python apps/train_toy_motion.py --out assets/toy-motion  # from a source checkout

Seeded and resumable: the checkpoint in --ckpt-dir is written every --checkpoint-every steps and picked up by
the next run with the same options (see assets/toy-motion/README.md for the shipped recipe).
"""

from __future__ import annotations

import json
import os
import time

import click

from guidekit.apps.cli import FiniteFloatRange


@click.command("train-toy-motion", context_settings={"show_default": True})
@click.option("--out", type=click.Path(file_okay=False), default="runs/toy-motion", help="MotionAdapter folder to write.")
@click.option("--ckpt-dir", type=click.Path(file_okay=False), default="runs/train-toy-motion",
              help="Checkpoint and loss-log folder; an existing checkpoint there is resumed.")
@click.option("--model", type=click.Path(file_okay=False, exists=True), default=None,
              help="The frozen image model (a StableDiffusionPipeline folder); default: the embedded toy model.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu")
@click.option("--seed", type=int, default=0)
@click.option("--steps", type=click.IntRange(1), default=3000)
@click.option("--batch", type=click.IntRange(1), default=2, help="16-frame clips per step.")
@click.option("--frames", type=click.IntRange(2, 32), default=16, help="Frames per training clip.")
@click.option("--lr", type=FiniteFloatRange(min=0, min_open=True), default=5e-4)
@click.option("--heads", type=click.IntRange(1), default=4, help="Temporal attention heads per motion module.")
@click.option("--checkpoint-every", type=click.IntRange(1), default=100)
@click.option("--init-from", type=click.Path(file_okay=False, exists=True), default=None,
              help="Continue training from this exported adapter folder (e.g. assets/toy-motion) instead of zeroed "
                   "proj_out.")
@click.option("--step-offset", type=click.IntRange(0), default=0,
              help="Draw the clips and noise of step k as those of step k + OFFSET (a continuation sets it to the "
                   "first run's steps, so that it sees new clips).")
@click.option("--threads", type=click.IntRange(1), default=1, help="torch CPU threads.")
@click.option("--stop-after", type=FiniteFloatRange(min=0), default=None,
              help="Checkpoint and stop after this many seconds (resume later).")
@click.option("--export-partial", is_flag=True, help="A run stopped by --stop-after still writes its EMA adapter.")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
def train_toy_motion(out, ckpt_dir, model, device, seed, steps, batch, frames, lr, heads, checkpoint_every, init_from,
                     step_offset, threads, stop_after, export_partial, no_progress):
    """Train the embedded motion model on 16-frame clips of the toy video world (image model frozen)."""
    import torch

    from guidekit.toy.train_motion import MotionConfig, train_motion

    torch.set_num_threads(threads)
    if device == "cuda" and not torch.cuda.is_available():
        raise click.BadParameter("cuda was asked for but torch sees no CUDA device", param_hint="--device")
    config = MotionConfig(seed=seed, steps=steps, batch=batch, frames=frames, lr=lr, heads=heads,
                          checkpoint_every=checkpoint_every,
                          init_from=os.path.abspath(init_from) if init_from is not None else None,
                          step_offset=step_offset)
    t0 = time.perf_counter()
    try:
        summary = train_motion(out, ckpt_dir, config, model_path=model, device=device, progress=not no_progress,
                               stop_after=stop_after, export_partial=export_partial)
    except ValueError as error:
        raise click.UsageError(str(error)) from None
    summary["wall_s_this_run"] = round(time.perf_counter() - t0, 1)
    click.echo(json.dumps(summary, indent=2, default=str))
    click.echo(f"wrote {os.path.abspath(out)}" if summary.get("finished") else "stopped early; run the same command to resume")


if __name__ == "__main__":
    train_toy_motion()
