"""`guidekit eval-apg`: measure a grid of APG settings (r, β, η) against CFG at high guidance scales on the
embedded model, and pick the recommended setting (`guidekit.toy.RECOMMENDED_APG` was chosen this way).

    guidekit eval-apg --out runs/eval-apg
"""

from __future__ import annotations

import json

import click


def _scales(ctx, param, value):
    try:
        scales = tuple(float(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(f"got {value!r}; expected comma-separated numbers such as 10,15,20")
    if any(not (1 <= s < float("inf")) for s in scales):
        raise click.BadParameter(f"got {value!r}; every guidance scale must be a finite number >= 1")
    return scales


@click.command("eval-apg", context_settings={"show_default": True})
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Folder for apg_grid.json and apg_grid.md.")
@click.option("--model", default=None, help="Pipeline folder (default: the embedded toy model).")
@click.option("--num-prompts", type=click.IntRange(1, 270), default=48, help="Held-out prompts per setting and scale.")
@click.option("--steps", type=click.IntRange(1, 1000), default=25, help="DDIM steps.")
@click.option("--scales", default="10,15,20", callback=_scales, help="Guidance scales.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu")
@click.option("--threads", type=click.IntRange(1), default=1, help="torch CPU threads.")
def eval_apg(out, model, num_prompts, steps, scales, device, threads):
    """Grid of APG settings vs CFG on the embedded model; prints the table and the recommended setting."""
    import torch

    from guidekit.toy import apg_grid
    from guidekit.toy.evaluate import load_pipeline

    torch.set_num_threads(threads)
    if device == "cuda" and not torch.cuda.is_available():
        raise click.BadParameter("cuda was asked for but torch sees no CUDA device", param_hint="--device")
    pipe = load_pipeline(model, device)
    prompts = apg_grid.heldout_prompts(num_prompts)
    result = apg_grid.run_grid(pipe, prompts, scales=scales, steps=steps, log=click.echo)
    result["recommended"] = apg_grid.pick_recommended(result)
    apg_grid.save(result, out)
    click.echo(apg_grid.markdown(result))
    click.echo("recommended: " + json.dumps(result["recommended"]))


if __name__ == "__main__":
    eval_apg()
