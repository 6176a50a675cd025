"""`guidekit train-toy-classifier`: train the embedded image classifier (see assets/toy-classifier/README.md).

    guidekit train-toy-classifier --out assets/toy-classifier
    PYTHONPATH=. python apps/train_toy_classifier.py --out assets/toy-classifier   # from a source checkout

A tiny transformers ResNetForImageClassification, trained on clean toy-world images only, that reads an image
as "{colour} {shape}" (18 classes). Seeded and resumable (--ckpt-dir).
"""

from __future__ import annotations

import json
import os

import click

from guidekit.apps.cli import FiniteFloatRange


@click.command("train-toy-classifier", context_settings={"show_default": True})
@click.option("--out", type=click.Path(file_okay=False), default="runs/toy-classifier", help="Model folder to write.")
@click.option("--ckpt-dir", type=click.Path(file_okay=False), default=None,
              help="Checkpoint folder; an existing checkpoint there is resumed.")
@click.option("--seed", type=int, default=0)
@click.option("--steps", type=click.IntRange(1), default=1500)
@click.option("--batch", type=click.IntRange(1), default=64)
@click.option("--lr", type=FiniteFloatRange(min=0, min_open=True), default=3e-3)
@click.option("--eval-images", type=click.IntRange(0, 400_000), default=1800,
              help="Held-out clean world images for the accuracy (0 skips it).")
@click.option("--threads", type=click.IntRange(1), default=1, help="torch CPU threads (keep 1 on a shared CPU).")
def train_toy_classifier(out, ckpt_dir, seed, steps, batch, lr, eval_images, threads):
    """Train the embedded toy classifier on clean world images and write a transformers model folder."""
    import torch

    from guidekit.toy.classifier import ClassifierConfig, train_classifier

    torch.set_num_threads(threads)
    config = ClassifierConfig(seed=seed, steps=steps, batch=batch, lr=lr, eval_images=eval_images)
    summary = train_classifier(out, config, ckpt_dir=ckpt_dir, log=click.echo)
    click.echo(json.dumps(summary, indent=2))
    click.echo(f"wrote {os.path.abspath(out)}")


if __name__ == "__main__":
    train_toy_classifier()
