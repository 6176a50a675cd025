"""`guidekit eval-style`: StyleID against StyleID + StyleSSP (and StyleSSP's two parts alone) on content/style
pairs of the toy world, with the embedded model, judged by `guidekit.toy.judge` (see `guidekit.toy.eval_style`).

    guidekit eval-style --out runs/eval-style
"""

from __future__ import annotations

import click


@click.command("eval-style", context_settings={"show_default": True})
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Folder for eval_style.json and eval_style.md.")
@click.option("--model", default=None, help="Pipeline folder (default: the embedded toy model).")
@click.option("--pairs", type=click.IntRange(1, 1000), default=24, help="Content/style pairs (half with different shapes).")
@click.option("--steps", type=click.IntRange(1, 1000), default=25, help="DDIM steps (each inversion and the sampling).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu")
@click.option("--threads", type=click.IntRange(1), default=1, help="torch CPU threads.")
def eval_style(out, model, pairs, steps, device, threads):
    """StyleID vs StyleID + StyleSSP (and its ablations) on the embedded model; prints the table."""
    import torch

    from guidekit.pipelines import StyleIDStableDiffusionPipeline
    from guidekit.toy import eval_style as ev
    from guidekit.toy.evaluate import load_pipeline

    torch.set_num_threads(threads)
    if device == "cuda" and not torch.cuda.is_available():
        raise click.BadParameter("cuda was asked for but torch sees no CUDA device", param_hint="--device")
    pipe = StyleIDStableDiffusionPipeline.from_pipe(load_pipeline(model, device))
    pipe.set_progress_bar_config(disable=True)
    result = ev.run(pipe, pairs=pairs, steps=steps, log=click.echo)
    ev.save(result, out)
    click.echo(ev.markdown(result))


if __name__ == "__main__":
    eval_style()
