"""`guidekit eval-toy`: evaluate the embedded toy model (accuracy, CFG/APG scale table, inversion PSNR).

The table reports, per guidance method and scale, the judge's accuracies, mean saturation, clipped fraction,
mean shape fidelity (IoU of each judged shape with its ideal outline) and mean |x0|, under a "world" row: the
world's own images for the same prompts, measured the same way.

    guidekit eval-toy --out runs/eval-toy
    PYTHONPATH=. python apps/eval_toy.py --out runs/eval-toy      # from a source checkout
"""

from __future__ import annotations

import math

import click

from guidekit.apps.cli import FiniteFloatRange


def _scales(ctx, param, value):
    try:
        scales = tuple(float(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(f"got {value!r}; expected comma-separated numbers such as 1,3,5,7.5")
    if not all(math.isfinite(s) and s >= 1 for s in scales):
        raise click.BadParameter(f"got {value!r}; every guidance scale must be a finite number >= 1")
    return scales


@click.command("eval-toy", context_settings={"show_default": True})
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Folder for eval.json, table.md, grid.png.")
@click.option("--model", default=None, help="Pipeline folder (default: the embedded toy model).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu")
@click.option("--num-prompts", type=click.IntRange(1), default=192)
@click.option("--steps", type=click.IntRange(1), default=25, help="DDIM steps.")
@click.option("--scales", default="1,3,5,7.5,10,15", callback=_scales, help="Guidance scales of the table.")
@click.option("--methods", type=click.Choice(["cfg", "apg", "both"]), default="both")
@click.option("--default-scale", type=FiniteFloatRange(min=1), default=None,
              help="Scale reported as the default (default: guidekit.toy.DEFAULT_GUIDANCE_SCALE).")
@click.option("--inversion-n", type=click.IntRange(0), default=32, help="Images for the inversion PSNR (0: skip).")
@click.option("--batch", type=click.IntRange(1), default=64)
@click.option("--threads", type=click.IntRange(1), default=1, help="torch CPU threads.")
def eval_toy(out, model, device, num_prompts, steps, scales, methods, default_scale, inversion_n, batch, threads):
    """Evaluate the toy model with the procedural judge; writes eval.json, table.md and grid.png under OUT.

    The table's first row is the world's own images for the same prompts (accuracy, saturation, clipped
    fraction, shape fidelity), so each CFG/APG row reads against what the model was trained to draw.
    """
    import torch

    from guidekit.toy.evaluate import markdown_table, run_evaluation

    torch.set_num_threads(threads)
    methods = ("cfg", "apg") if methods == "both" else (methods,)
    result = run_evaluation(out, model=model, device=device, num_prompts=num_prompts, steps=steps, scales=scales,
                            methods=methods, default_scale=default_scale, inversion_n=inversion_n, batch=batch,
                            log=click.echo)
    click.echo(markdown_table(result))


if __name__ == "__main__":
    eval_toy()
