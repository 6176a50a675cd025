"""Style-transfer jobs: StyleID of `content_image` in the style of `style_image`, from StyleID's start point or
StyleSSP's."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Optional

from guidekit.checks import check_image_size

from .jobs_schema import COMMON, SEED_FIELDS, JobError, Param, _NAME, _image_file


#: Style-transfer jobs: StyleID (`StyleIDStableDiffusionPipeline.transfer`) of `content_image` in the style of
#: `style_image`, from the plain StyleID start point or with `guidekit.StyleSSP`'s. Defaults: `guidekit style`'s.
START_POINTS = ("styleid", "stylessp")

#: StyleSSP's negative-guided inversion scale w_inv, named as the hook's argument.
STYLESSP_SCALE = "inversion_guidance_scale"

STYLE: dict[str, Param] = {p.name: p for p in [
    Param("content_image", str, None,
          "Style transfer: the content image (a path relative to the job file's folder, or absolute). Its layout is "
          "kept; the output has its size, a multiple of the model's VAE factor. Give it together with `style_image`; "
          "such a job has no prompt or guidance fields."),
    Param("style_image", str, None,
          "Style transfer: the style image (relative to the job file's folder, or absolute); its size is a multiple "
          "of the model's VAE factor too."),
    Param("content_prompt", str, None,
          "Style transfer: a caption of the content image, the positive side c+ of StyleSSP's negative-guided "
          "inversion (\"\" when left out). Plain StyleID does not use it."),
    Param("style_prompt", str, None,
          "Style transfer: what the style image shows, the negative side c- of StyleSSP's negative-guided inversion; "
          "without it StyleSSP uses its frequency start point only. Plain StyleID does not use it."),
    Param("start_point", str, "stylessp",
          "Style transfer: the sampling start point; styleid: StyleID's AdaIN start point; stylessp: StyleID + "
          "guidekit.StyleSSP() (frequency manipulation, plus the negative-guided inversion with `style_prompt`).",
          choices=START_POINTS),
    Param("gamma", float, 0.75,
          "Style transfer: StyleID query preservation; larger keeps more content (the paper's 0.75; its high style "
          "fidelity setting: 0.3).", min=0.0, max=1.0),
    Param("temperature", float, 1.5,
          "Style transfer: StyleID attention temperature T > 0; > 1 sharpens the injected attention (the paper's "
          "1.5).", min=0.0, max=100.0),
    Param("alpha", float, 0.7,
          "Style transfer, stylessp: factor on the lowest and highest frequencies of the start point; 1 turns the "
          "frequency step off (StyleSSP's official 0.7).", min=0.0, max=1.0),
    Param(STYLESSP_SCALE, float, None,
          "Style transfer, stylessp: w_inv of the negative-guided inversion eps(c-) + w_inv (eps(c+) - eps(c-)) "
          "(StyleSSP's official 1.5); 1 turns it off. Default: 1.5 with `style_prompt`, else 1.", min=1.0, max=11.0),
]}

#: Fields of every job that a style-transfer job uses too (`steps` defaults to 50 there, StyleID's official).
STYLE_SHARED = ("name", "steps")

STYLE_STEPS = 50

#: The StyleSSP-only fields.
STYLESSP_ONLY = ("alpha", STYLESSP_SCALE)

_STYLE_ACCEPTED = ", ".join(list(STYLE) + list(STYLE_SHARED) + ["seed", "seeds"])


def _parse_style(raw: dict, where: str, base: Optional[Path]) -> tuple[dict, dict]:
    """A style-transfer job's parameters and its image files (absolute paths)."""
    given = [k for k in raw if raw.get(k) is not None]
    images = [k for k in ("content_image", "style_image") if k in given]
    if not images:
        names = [k for k in given if k in STYLE]
        raise JobError(f"{where}{', '.join(names)}: only appl{'ies' if len(names) == 1 else 'y'} to style-transfer "
                       "jobs; accepted: together with "
                       "\"content_image\" and \"style_image\" (image files), or remove them")
    if len(images) == 1:
        missing = "style_image" if images == ["content_image"] else "content_image"
        raise JobError(f"{where}{missing}: required with {images[0]}; accepted: an image file, its path relative to "
                       "the job file's folder or absolute")
    other = [k for k in given if k not in STYLE and k not in STYLE_SHARED and k not in SEED_FIELDS]
    if other:
        raise JobError(f"{where}{', '.join(other)}: not accepted in a style-transfer job (one with content_image and "
                       f"style_image: the output has the content image's size, no prompt or guidance); accepted "
                       f"there: {_STYLE_ACCEPTED}")
    params: dict[str, Any] = {}
    for name in STYLE_SHARED:
        p = COMMON[name]
        v = raw.get(name)
        params[name] = (STYLE_STEPS if name == "steps" else p.default) if v is None else p.check(v, where)
    if params["name"] is not None and not _NAME.match(params["name"]):
        raise JobError(f"{where}name: expected 1-64 letters, digits, '.', '_' or '-', got {params['name']!r}")
    for p in STYLE.values():
        v = raw.get(p.name)
        params[p.name] = p.default if v is None else p.check(v, where)
    if params["temperature"] <= 0:
        raise JobError(f"{where}temperature: expected a number in (0.0, 100.0], got {raw['temperature']!r}")
    for name in ("content_prompt", "style_prompt"):
        if params[name] is not None:
            params[name] = params[name].strip() or None
    if params["start_point"] == "styleid":
        for name in STYLESSP_ONLY:
            if raw.get(name) is not None:
                raise JobError(f"{where}{name}: only applies to start_point 'stylessp', but this job has start_point "
                               "'styleid'; remove it or set \"start_point\": \"stylessp\"")
            del params[name]
    else:
        scale = params[STYLESSP_SCALE]
        if scale is None:
            params[STYLESSP_SCALE] = 1.5 if params["style_prompt"] else 1.0
        elif scale > 1 and not params["style_prompt"]:
            raise JobError(f"{where}{STYLESSP_SCALE}: {scale:g} needs style_prompt (what the style image shows, the "
                           "negative side of the inversion guidance); accepted: a style_prompt, or 1 (no "
                           "negative-guided inversion)")
    files = {}
    for name in ("content_image", "style_image"):
        path, digest, (w, h) = _image_file(params[name], name, where, base)
        try:
            check_image_size(w, h, multiple_of=8, names=(f"{name} width", f"{name} height"))
        except ValueError as e:
            raise JobError(f"{where}{name}: {params[name]!r} is {w}x{h}; {e}") from None
        files[name] = str(path)
        params[f"{name}_sha256"] = digest
        if name == "content_image":
            params["width"], params["height"] = w, h  # the output has the content's size
    return params, files


def styleid_supported(pipe) -> bool:
    """Whether StyleID runs on `pipe`: Stable Diffusion 1.x/2.x pipelines only."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return isinstance(pipe, StableDiffusionPipeline) and not isinstance(pipe, StableDiffusionXLPipeline)


def style_hooks(params: dict) -> list:
    """The start-point hooks of a style-transfer job: none for "styleid", `guidekit.StyleSSP` for "stylessp"."""
    if params["start_point"] != "stylessp":
        return []
    import guidekit

    w_inv = params[STYLESSP_SCALE]
    return [guidekit.StyleSSP(alpha=params["alpha"], inversion_guidance_scale=w_inv, negative_inversion=w_inv > 1)]


def style_transfer(spipe, params: dict, seeds: Iterable[int], files: dict, generator_device: str = "cpu"):
    """A style-transfer job's images: one `transfer` per seed on `spipe` (a `StyleIDStableDiffusionPipeline`;
    `guidekit.apps.style.style_pipeline` makes one from a loaded pipeline), each with its own `torch.Generator`
    (StyleSSP draws its start-point noise from it), so an image never depends on order or process count.
    `files`: the job's image paths (`Job.files`). Returns float numpy images (N, H, W, 3) in [0, 1]."""
    import numpy as np
    import PIL.Image
    import torch

    images = {}
    for name in ("content_image", "style_image"):
        with PIL.Image.open(files[name]) as im:
            images[name] = im.convert("RGB")
    out = []
    for seed in seeds:
        result = spipe.transfer(
            images["content_image"], images["style_image"], num_inference_steps=params["steps"],
            gamma=params["gamma"], temperature=params["temperature"], hooks=style_hooks(params),
            content_prompt=params.get("content_prompt"), style_prompt=params.get("style_prompt"),
            generator=torch.Generator(device=generator_device).manual_seed(int(seed)), output_type="np")
        out.append(np.asarray(result.images[0], dtype=np.float32))
    return np.stack(out)
