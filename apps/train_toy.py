"""`guidekit train-toy`: train the embedded toy text-to-image model (see assets/toy-sd/README.md).

    python -m guidekit.apps.train_toy --out assets/toy-sd            # installed package
    PYTHONPATH=. python apps/train_toy.py --out assets/toy-sd        # from a source checkout

Seeded and resumable: the checkpoint in --ckpt-dir is written every --checkpoint-every steps and picked
up by the next run with the same options.
"""

from __future__ import annotations

import json
import os
import time

import click

from guidekit.apps.cli import FiniteFloatRange


@click.command("train-toy", context_settings={"show_default": True})
@click.option("--out", type=click.Path(file_okay=False), default="runs/toy-sd", help="Pipeline folder to write.")
@click.option("--ckpt-dir", type=click.Path(file_okay=False), default="runs/train-toy",
              help="Checkpoint and loss-log folder; an existing checkpoint there is resumed.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu")
@click.option("--seed", type=int, default=0)
@click.option("--vae-steps", type=click.IntRange(1), default=2500)
@click.option("--vae-batch", type=click.IntRange(1), default=8)
@click.option("--vae-lr", type=FiniteFloatRange(min=0, min_open=True), default=1e-3)
@click.option("--unet-arch", type=click.Choice(["v2", "v1"]), default="v2",
              help="v2: self- and cross-attention at 16x16 too (the shipped model); v1: the first model's UNet.")
@click.option("--unet-steps", type=click.IntRange(1), default=4500)
@click.option("--batch", type=click.IntRange(1), default=32)
@click.option("--lr", type=FiniteFloatRange(min=0, min_open=True), default=5e-4)
@click.option("--decoder-steps", type=click.IntRange(0), default=1500,
              help="Decoder fine-tuning steps after the UNet (encoder frozen); 0 skips them.")
@click.option("--decoder-lr", type=FiniteFloatRange(min=0, min_open=True), default=3e-4)
@click.option("--checkpoint-every", type=click.IntRange(1), default=250)
@click.option("--threads", type=click.IntRange(1), default=1,
              help="torch CPU threads (keep 1 on a shared CPU).")
@click.option("--workers", type=click.IntRange(0), default=0, help="Data-generation worker processes.")
@click.option("--stop-after", type=FiniteFloatRange(min=0), default=None,
              help="Checkpoint and stop after this many seconds (resume later).")
@click.option("--export-partial", is_flag=True,
              help="With --stop-after: a run stopped in the UNet or decoder phase still writes its (unfinished) "
                   "EMA weights to --out.")
@click.option("--stop-before", type=click.Choice(["unet", "decoder"]), default=None,
              help="Checkpoint and stop when the run reaches this phase (e.g. to start UNet variants from one VAE).")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
def train_toy(out, ckpt_dir, device, seed, vae_steps, vae_batch, vae_lr, unet_arch, unet_steps, batch, lr, decoder_steps, decoder_lr, checkpoint_every, threads,
              workers, stop_after, export_partial, stop_before, no_progress):
    """Train the embedded toy model (VAE, then UNet + text encoder) and write a diffusers pipeline folder."""
    import torch

    from guidekit.toy.train import TrainConfig, train

    torch.set_num_threads(threads)
    if device == "cuda" and not torch.cuda.is_available():
        raise click.BadParameter("cuda was asked for but torch sees no CUDA device", param_hint="--device")
    config = TrainConfig(seed=seed, vae_steps=vae_steps, vae_batch=vae_batch, vae_lr=vae_lr, unet_arch=unet_arch, unet_steps=unet_steps, batch=batch,
                         lr=lr, decoder_steps=decoder_steps, decoder_lr=decoder_lr, checkpoint_every=checkpoint_every)
    t0 = time.perf_counter()
    summary = train(out, ckpt_dir, config, device=device, workers=workers, progress=not no_progress,
                    stop_after=stop_after, export_partial=export_partial, stop_before=stop_before)
    summary["wall_s_this_run"] = round(time.perf_counter() - t0, 1)
    if not summary.get("finished"):
        click.echo(json.dumps(summary, indent=2, default=str))
        click.echo("stopped early; run the same command to resume")
    else:
        click.echo(json.dumps(summary, indent=2))
        click.echo(f"wrote {os.path.abspath(out)}")


if __name__ == "__main__":
    train_toy()
