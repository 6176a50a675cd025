"""`guidekit eval-style`: StyleID against StyleID + StyleSSP (and StyleSSP's two parts alone, and the plain
reconstruction) on the embedded model's style task (`guidekit.toy.style_task`: the content gives the layout, the
style the background's colour and texture), judged by `guidekit.toy.judge`, with 95% bootstrap intervals
(`guidekit.toy.eval_style`).

    guidekit eval-style --out runs/eval-style
    guidekit eval-style --out runs/order --methods "StyleID,StyleID + StyleSSP, AdaIN then frequency"
"""

from __future__ import annotations

import click


def _methods(value: str):
    from guidekit.toy.eval_style import METHODS, TABLE_METHODS

    if value is None:
        return TABLE_METHODS
    if value.strip() == "all":
        return tuple(METHODS)
    # names contain ", ": split on the names themselves, longest first, so "A, B" is not cut at its comma
    names, rest = [], value.strip()
    while rest:
        match = next((n for n in sorted(METHODS, key=len, reverse=True) if rest.startswith(n)), None)
        if match is None:
            raise click.BadParameter(f"{rest!r} does not start with a method name; accepted: 'all' or a comma-"
                                     f"separated list of: {'; '.join(METHODS)}", param_hint="--methods")
        names.append(match)
        rest = rest[len(match):].lstrip()
        if rest.startswith(","):
            rest = rest[1:].lstrip()
        elif rest:
            raise click.BadParameter(f"expected a comma after {match!r}", param_hint="--methods")
    return tuple(dict.fromkeys(names))


@click.command("eval-style", context_settings={"show_default": True})
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Folder for eval_style.json and eval_style.md.")
@click.option("--model", default=None, help="Pipeline folder (default: the embedded toy model).")
@click.option("--pairs", type=click.IntRange(1, 1000), default=48, help="Content/style pairs of the task.")
@click.option("--steps", type=click.IntRange(1, 1000), default=25, help="DDIM steps (each inversion and the sampling).")
@click.option("--methods", default=None, metavar="NAMES",
              help="Comma-separated rows (see guidekit.toy.eval_style.METHODS), or 'all'. Default: reconstruction, "
                   "StyleID, StyleID + StyleSSP and StyleSSP's two parts alone.")
@click.option("--style-shape", type=click.Choice(["content colour", "own colour", "none"]), default="content colour",
              help="The style images: the task's (its shape in the content's colour), or an alternative it is "
                   "compared with (the style scene as drawn; its background alone).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu")
@click.option("--threads", type=click.IntRange(1), default=1, help="torch CPU threads.")
def eval_style(out, model, pairs, steps, methods, style_shape, device, threads):
    """StyleID vs StyleID + StyleSSP on the embedded model's style task; prints the table with 95% intervals."""
    methods = _methods(methods)

    import torch

    from guidekit.pipelines import StyleIDStableDiffusionPipeline
    from guidekit.toy import eval_style as ev
    from guidekit.toy.evaluate import load_pipeline

    torch.set_num_threads(threads)
    if device == "cuda" and not torch.cuda.is_available():
        raise click.BadParameter("cuda was asked for but torch sees no CUDA device", param_hint="--device")
    pipe = StyleIDStableDiffusionPipeline.from_pipe(load_pipeline(model, device))
    pipe.set_progress_bar_config(disable=True)
    result = ev.run(pipe, pairs=pairs, steps=steps, methods=methods, log=click.echo, style_shape=style_shape)
    ev.save(result, out)
    click.echo(ev.markdown(result))


if __name__ == "__main__":
    eval_style()
