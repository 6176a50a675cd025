"""`guidekit eval-elucd`: steer the embedded model's unconditional samples to each "{colour} {shape}" class with
the embedded classifier, three ways (unguided, ClassifierGuidance, EluCD) plus EluCD's ablations, judged by
`guidekit.toy.judge` (`guidekit.toy.RECOMMENDED_ELUCD` was chosen this way).

    guidekit eval-elucd --out runs/eval-elucd
"""

from __future__ import annotations

import json

import click

from guidekit.apps.cli import FiniteFloatRange


def _scales(ctx, param, value):
    try:
        scales = tuple(float(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(f"got {value!r}; expected comma-separated numbers such as 2,5,10")
    if any(not (0 < s < float("inf")) for s in scales):
        raise click.BadParameter(f"got {value!r}; every scale must be a finite number > 0")
    return scales


@click.command("eval-elucd", context_settings={"show_default": True})
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Folder for eval_elucd.json and eval_elucd.md.")
@click.option("--model", default=None, help="Pipeline folder (default: the embedded toy model).")
@click.option("--classifier", default=None, help="Classifier folder (default: the embedded toy classifier).")
@click.option("--samples", type=click.IntRange(1, 100), default=4, help="Samples per class (18 classes).")
@click.option("--steps", type=click.IntRange(1, 1000), default=None,
              help="Sampling steps [default: guidekit.toy.RECOMMENDED_ELUCD_SAMPLER's].")
@click.option("--scheduler", type=click.Choice(["ddpm", "ddim"]), default=None,
              help="Sampler: ddpm (ancestral, EluCD's own) or ddim (deterministic) "
                   "[default: guidekit.toy.RECOMMENDED_ELUCD_SAMPLER's].")
@click.option("--scales", default=None, callback=lambda c, p, v: None if v is None else _scales(c, p, v),
              help="Guidance scales of ClassifierGuidance and EluCD [default: RECOMMENDED_ELUCD's scale only].")
@click.option("--ablation-scale", type=FiniteFloatRange(min=0, min_open=True), default=None, help="Scale of the ablation rows [default: the largest scale].")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu")
@click.option("--threads", type=click.IntRange(1), default=1, help="torch CPU threads.")
def eval_elucd(out, model, classifier, samples, steps, scheduler, scales, ablation_scale, device, threads):
    """Unguided vs ClassifierGuidance vs EluCD (and its ablations) on the embedded model; prints the table."""
    import torch

    from guidekit.guidance import TransformersClassifier
    from guidekit.toy import RECOMMENDED_ELUCD, default_classifier_path, eval_elucd as ev
    from guidekit.toy.evaluate import load_pipeline

    torch.set_num_threads(threads)
    if scales is None:
        scales = (float(RECOMMENDED_ELUCD["scale"]),)
    if device == "cuda" and not torch.cuda.is_available():
        raise click.BadParameter("cuda was asked for but torch sees no CUDA device", param_hint="--device")
    pipe = load_pipeline(model, device)
    clf = TransformersClassifier.from_pretrained(str(classifier or default_classifier_path())).to(device)
    result = ev.run(pipe, clf, scales=scales, samples=samples, steps=steps, ablation_scale=ablation_scale, log=click.echo,
                    scheduler=scheduler)
    result["best_scale"] = ev.pick_scale(result)
    ev.save(result, out)
    click.echo(ev.markdown(result))
    click.echo("best EluCD scale (accuracy, fidelity within 0.03 of unguided): " + json.dumps(result["best_scale"]))


if __name__ == "__main__":
    eval_elucd()
