"""`guidekit eval-apg`: choose the embedded model's APG setting (r, β, η) on selection prompts and check the
choice on held-out prompts (`guidekit.toy.RECOMMENDED_APG` was chosen this way).

    guidekit eval-apg --out runs/eval-apg

Measured rows go to OUT/rows.jsonl as they come, and a rerun with the same OUT reads them back instead of
measuring them again, so an interrupted run resumes where it stopped (`--fresh` starts over).
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from guidekit.apps.cli import FiniteFloatRange


def _scales(ctx, param, value):
    try:
        scales = tuple(float(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(f"got {value!r}; expected comma-separated numbers such as 3,10,15,20")
    if any(not (1 <= s < float("inf")) for s in scales):
        raise click.BadParameter(f"got {value!r}; every guidance scale must be a finite number >= 1")
    return scales


@click.command("eval-apg", context_settings={"show_default": True})
@click.option("--out", type=click.Path(file_okay=False), required=True,
              help="Folder for apg_grid.json, apg_grid.md and the rows checkpoint rows.jsonl.")
@click.option("--model", default=None, help="Pipeline folder (default: the embedded toy model).")
@click.option("--num-prompts", type=click.IntRange(1, 270), default=48, help="Selection prompts.")
@click.option("--check-prompts", type=click.IntRange(1, 269), default=96,
              help="Held-out check prompts (captions and seeds the selection does not use; at most 270 minus "
                   "--num-prompts).")
@click.option("--steps", type=click.IntRange(1, 1000), default=25, help="DDIM steps.")
@click.option("--scales", default="10,15,20", callback=_scales,
              help="Scales of the rule's saturation condition; the selection is measured at these and at 3.")
@click.option("--check-scales", default="3,5,7.5,10,15,20", callback=_scales,
              help="Check scales (the rule's are added if missing).")
@click.option("--check-top", type=click.IntRange(1), default=3, help="Best-ranked settings measured on the check.")
@click.option("--saturation-tolerance", type=FiniteFloatRange(0, 1), default=0.03,
              help="Largest |saturation - world's| the rule allows at every selection scale.")
@click.option("--texture-margin", type=FiniteFloatRange(0, 1), default=0.05,
              help="Most the texture accuracy may fall below CFG's at w = 3.")
@click.option("--fresh", is_flag=True, help="Ignore OUT/rows.jsonl and measure every row again.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu")
@click.option("--threads", type=click.IntRange(1), default=1, help="torch CPU threads.")
def eval_apg(out, model, num_prompts, check_prompts, steps, scales, check_scales, check_top, saturation_tolerance,
             texture_margin, fresh, device, threads):
    """APG settings vs CFG on the embedded model: select on one prompt set, check on another; prints both tables
    and the recommended setting."""
    import torch

    from guidekit.toy import apg_grid
    from guidekit.toy.evaluate import load_pipeline

    torch.set_num_threads(threads)
    if device == "cuda" and not torch.cuda.is_available():
        raise click.BadParameter("cuda was asked for but torch sees no CUDA device", param_hint="--device")
    rule = apg_grid.Rule(saturation_tolerance=saturation_tolerance, saturation_scales=scales,
                         texture_margin=texture_margin)
    click.echo("Rule: " + rule.text())
    checkpoint = Path(out) / "rows.jsonl"
    if fresh and checkpoint.exists():
        checkpoint.unlink()
    pipe = load_pipeline(model, device)
    selection = apg_grid.selection_set(num_prompts)
    try:
        check = apg_grid.check_set(check_prompts, exclude=selection.prompts)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--check-prompts")
    result = apg_grid.select_and_check(pipe, selection, check, check_scales=check_scales,
                                       check_top=check_top, rule=rule, steps=steps, model=str(model or "embedded"),
                                       checkpoint=checkpoint, log=click.echo)
    apg_grid.save(result, out, rule)
    click.echo(apg_grid.report(result, rule))
    click.echo("recommended: " + json.dumps(result["recommended"]))


if __name__ == "__main__":
    eval_apg()
