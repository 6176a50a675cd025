"""`guidekit eval-video`: long videos from the embedded motion model with and without FreeNoise, read by the judge.

Rows: the world's own clips, the plain model at 16 and 32 frames, and 64-frame videos as independent 16-frame
chunks, sliding windows with i.i.d. noise, FreeNoise (attention fusion) and FreeNoise (block fusion); then a
background-colour switch A -> B with and without motion injection. See guidekit/toy/eval_video.py.

    guidekit eval-video --out runs/eval-video
    guidekit eval-video --out runs/all --merge runs/a --merge runs/b   # runs of other rows, one table
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
@click.option("--merge", "merge", multiple=True, type=click.Path(file_okay=False, exists=True),
              help="Instead of running: merge the eval_video.json of these output folders (runs of the same videos "
                   "with different --rows, e.g. in parallel processes) into one table in --out. Repeat it.")
@click.option("--model", default=None, help="AnimateDiff pipeline folder (default: the embedded video model).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu")
@click.option("--num-videos", type=click.IntRange(1), default=16, help="Held-out prompts (one video each per row).")
@click.option("--first-video", type=click.IntRange(0), default=0,
              help="Start at this place in the held-out prompt list (each video keeps its prompt, seed and switch "
                   "colour), e.g. --first-video 16 for sixteen further videos.")
@click.option("--frames", type=click.IntRange(32), default=64, help="Length of the long videos (a multiple of 16).")
@click.option("--steps", type=click.IntRange(1), default=25, help="DDIM steps.")
@click.option("--guidance-scale", type=FiniteFloatRange(min=1), default=3.0)
@click.option("--rows", default="world,direct-16,direct-32,chunks,windows,freenoise,freenoise-block", callback=_rows,
              help="Rows to run.")
@click.option("--no-switch", is_flag=True, help="Skip the multi-prompt (background switch) table.")
@click.option("--threads", type=click.IntRange(1), default=1, help="torch CPU threads.")
def eval_video(out, merge, model, device, num_videos, first_video, frames, steps, guidance_scale, rows, no_switch,
               threads):
    """Evaluate long-video sampling on the embedded motion model; prints the tables and the required checks."""
    from guidekit.toy.eval_video import markdown_tables

    if merge:
        click.echo(markdown_tables(_merge(out, merge)))
        return
    import torch

    from guidekit.toy.eval_video import run_video_evaluation

    if frames % 16:
        raise click.BadParameter(f"got {frames}; accepted: a multiple of 16 (the chunks row joins 16-frame videos)",
                                 param_hint="--frames")
    torch.set_num_threads(threads)
    result = run_video_evaluation(out, model=model, device=device, num_videos=num_videos, frames=frames, steps=steps,
                                  scale=guidance_scale, rows=rows, switch=not no_switch, log=click.echo,
                                  first_video=first_video)
    click.echo(markdown_tables(result))


def _merge(out, folders) -> dict:
    """--merge: the runs' eval_video.json merged into --out (eval_video.json and table.md; nothing replaced)."""
    import json
    from pathlib import Path

    from guidekit.toy.eval_video import markdown_tables, merge_results

    if len(folders) < 2:
        raise click.BadParameter(f"got {len(folders)} folder; accepted: two or more", param_hint="--merge")
    results = []
    for folder in folders:
        path = Path(folder) / "eval_video.json"
        if not path.is_file():
            raise click.BadParameter(f"{folder} has no eval_video.json; accepted: output folders of eval-video",
                                     param_hint="--merge")
        results.append(json.loads(path.read_text()))
    try:
        merged = merge_results(results)
    except ValueError as e:
        raise click.BadParameter(str(e).replace("results: ", "", 1), param_hint="--merge") from None
    out = Path(out)
    written = [out / "eval_video.json", out / "table.md"]
    if any(p.exists() for p in written):
        raise click.BadParameter(f"{out} already holds an evaluation; accepted: a new folder", param_hint="--out")
    out.mkdir(parents=True, exist_ok=True)
    written[0].write_text(json.dumps(merged, indent=2, default=float) + "\n")
    written[1].write_text(markdown_tables(merged) + "\n")
    return merged


if __name__ == "__main__":
    eval_video()
