"""`guidekit eval-video`: long videos from the embedded motion model with and without FreeNoise, read by the judge.

Rows: the world's own clips, the plain model at 16 and 32 frames, and 64-frame videos as independent 16-frame
chunks, sliding windows with i.i.d. noise, FreeNoise (attention fusion) and FreeNoise (block fusion); then a
background-colour switch A -> B with and without motion injection. See guidekit/toy/eval_video.py.

    guidekit eval-video --out runs/eval-video
"""

from __future__ import annotations

import click

from guidekit.apps.cli import FiniteFloatRange


def _rows(ctx, param, value):
    from guidekit.toy.eval_video import ROWS

    rows = tuple(v.strip() for v in value.split(",") if v.strip())
    bad = [r for r in rows if r not in ROWS]
    if bad or not rows:
        raise click.BadParameter(f"got {value!r}; accepted: a comma-separated subset of {', '.join(ROWS)}")
    return rows


@click.command("eval-video", context_settings={"show_default": True})
@click.option("--out", type=click.Path(file_okay=False), required=True,
              help="Folder for eval_video.json, table.md and one sample GIF per row.")
@click.option("--model", default=None, help="AnimateDiff pipeline folder (default: the embedded video model).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu")
@click.option("--num-videos", type=click.IntRange(1), default=8, help="Held-out prompts (one video each per row).")
@click.option("--first-video", type=click.IntRange(0), default=0,
              help="Start at this place in the held-out prompt list (each video keeps its prompt, seed and switch "
                   "colour), e.g. --first-video 8 for eight further videos.")
@click.option("--frames", type=click.IntRange(32), default=64, help="Length of the long videos (a multiple of 16).")
@click.option("--steps", type=click.IntRange(1), default=25, help="DDIM steps.")
@click.option("--guidance-scale", type=FiniteFloatRange(min=1), default=3.0)
@click.option("--rows", default="world,direct-16,direct-32,chunks,windows,freenoise,freenoise-block", callback=_rows,
              help="Rows to run.")
@click.option("--no-switch", is_flag=True, help="Skip the multi-prompt (background switch) table.")
@click.option("--threads", type=click.IntRange(1), default=1, help="torch CPU threads.")
def eval_video(out, model, device, num_videos, first_video, frames, steps, guidance_scale, rows, no_switch, threads):
    """Evaluate long-video sampling on the embedded motion model; prints the tables and the required checks."""
    import torch

    from guidekit.toy.eval_video import markdown_tables, run_video_evaluation

    if frames % 16:
        raise click.BadParameter(f"got {frames}; accepted: a multiple of 16 (the chunks row joins 16-frame videos)",
                                 param_hint="--frames")
    torch.set_num_threads(threads)
    result = run_video_evaluation(out, model=model, device=device, num_videos=num_videos, frames=frames, steps=steps,
                                  scale=guidance_scale, rows=rows, switch=not no_switch, log=click.echo,
                                  first_video=first_video)
    click.echo(markdown_tables(result))


if __name__ == "__main__":
    eval_video()
