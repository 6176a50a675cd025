"""Batch jobs of kinds "reconstruct" and "edit": UAM on a real image (`guidekit reconstruct` / `guidekit edit`).

    {"kind": "reconstruct", "image": "photo.png", "prompt": "a red circle on a blue background", "steps": 50}
    {"kind": "edit", "image": "photo.png", "source": "a red circle ...", "target": "a green circle ...", "mode": "uam"}

The image path is relative to the job file's folder. A job writes one PNG (the reconstruction, or the edit);
an edit also writes its mask beside it (`<file>-mask.png`, before the PNG, so a finished PNG means a finished job).
The manifest row records the numbers the commands print, under "uam".
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from . import uam_image
from .jobs_schema import COMMON, SEED_FIELDS, Job, JobError, Param, _image_file, _NAME

KIND_FIELDS: dict[str, dict[str, Param]] = {
    "reconstruct": {p.name: p for p in [
        Param("prompt", str, None, "Reconstruct: the source caption, used by the baseline only (optional)."),
        Param("guidance", float, uam_image.DEFAULT_GUIDANCE, "Reconstruct: CFG scale of the baseline with prompt.",
              min=0.0, max=100.0),
        Param("baseline", str, "ddim", "Reconstruct: also run plain DDIM inversion (its numbers go in the "
              "manifest), or not.", choices=("ddim", "none")),
    ]},
    "edit": {p.name: p for p in [
        Param("source", str, None, "Edit: what the image shows (required)."),
        Param("target", str, None, "Edit: what it should become (required)."),
        Param("mode", str, "uam", "Edit: uam (adaptive mask) or masactrl (no mask, the baseline).",
              choices=uam_image.EDIT_MODES),
        Param("guidance", float, uam_image.DEFAULT_GUIDANCE, "Edit: CFG scale.", min=0.0, max=100.0),
        Param("quantile", float, uam_image.DEFAULT_QUANTILE, "Edit: largest quantile of the mask threshold.",
              min=0.0, max=1.0),
        Param("recon_t", int, uam_image.DEFAULT_RECON_T, "Edit: the mask acts below this timestep.", min=1, max=1000),
        Param("dilate_radius", int, uam_image.DEFAULT_DILATE_RADIUS, "Edit: mask dilation radius (latent px).",
              min=0, max=16),
    ]},
}
SHARED = ("kind", "image", "name", "steps")


def is_kind(params: dict) -> bool:
    return params.get("kind") in KIND_FIELDS


def parse_job(raw: dict, line: int = 0, base: Optional[Path] = None) -> Job:
    """A reconstruct or edit job (`raw` has "kind"); JobError naming the line and the field."""
    where = f"line {line}: " if line else ""
    kind = raw["kind"]
    fields = KIND_FIELDS[kind]
    accepted = list(SHARED) + list(fields)
    unknown = [k for k in raw if k not in accepted and raw.get(k) is not None]
    if unknown:
        seeds = [k for k in unknown if k in SEED_FIELDS]
        why = " (DDIM inversion is deterministic: one image per job)" if seeds else ""
        raise JobError(f"{where}{', '.join(map(repr, unknown))}: not accepted in a {kind!r} job{why}; accepted: "
                       + ", ".join(accepted))
    if raw.get("image") in (None, ""):
        raise JobError(f"{where}image: required in a {kind!r} job; accepted: an image file, its path relative to the "
                       "job file's folder or absolute")
    params: dict[str, Any] = {"kind": kind}
    for name in ("name", "steps"):
        p, v = COMMON[name], raw.get(name)
        params[name] = (uam_image.DEFAULT_STEPS if name == "steps" else p.default) if v is None else p.check(v, where)
    if params["name"] is not None and not _NAME.match(params["name"]):
        raise JobError(f"{where}name: expected 1-64 letters, digits, '.', '_' or '-', got {params['name']!r}")
    for p in fields.values():
        v = raw.get(p.name)
        params[p.name] = p.default if v is None else p.check(v, where)
    if kind == "edit":
        for name in ("source", "target"):
            if not (params[name] or "").strip():
                raise JobError(f"{where}{name}: required in an 'edit' job; accepted: a non-empty caption")
        if not 0 < params["quantile"] < 1:
            raise JobError(f"{where}quantile: expected a number in (0, 1), got {raw['quantile']!r}")
    path, digest, (w, h) = _image_file(raw["image"], "image", where, base)
    params["image"] = raw["image"]
    params["image_sha256"] = digest  # the image's bytes name the job's files, not its path
    params["width"], params["height"] = w, h
    return Job(line=line, raw=dict(raw), params=params, seeds=[0], files={"image": str(path)})


def resolve(params: dict, pipe, where: str = "") -> dict:
    """`params` checked against the model: the image's size follows the size rule of every entry point."""
    from guidekit.checks import check_image_memory, check_image_size

    from .models import size_multiple

    try:
        check_image_size(params["width"], params["height"], multiple_of=size_multiple(pipe),
                         names=("image width", "image height"))
        check_image_memory(pipe, params["width"], params["height"], images=2, name="image")
    except ValueError as e:
        raise JobError(f"{where}image: {params['image']!r} is {params['width']}x{params['height']}; {e}") from None
    return dict(params)


def title(params: dict) -> str:
    return f"{params['kind']} {Path(params['image']).stem}"


def tag(params: dict) -> str:
    """The method part of a job's file names (the kind is in its title): an edit's mode."""
    return params["mode"] if params["kind"] == "edit" else ""


def run(upipe, params: dict, files: dict) -> tuple:
    """(output PIL image, {extra file suffix: PIL image}, numbers for the manifest) of one job on `upipe`
    (`guidekit.apps.uam_image.uam_pipeline`)."""
    import PIL.Image

    with PIL.Image.open(files["image"]) as im:
        image = im.convert("RGB")
    if params["kind"] == "reconstruct":
        result = uam_image.run_reconstruct(upipe, image, params["steps"], prompt=params["prompt"],
                                           guidance=params["guidance"], baseline=params["baseline"] == "ddim")
        numbers = {"psnr": result["uam"][1]["psnr"], "ssim": result["uam"][1]["ssim"]}
        if result["baseline"] is not None:
            numbers["baseline"] = {"setting": result["baseline_setting"], "psnr": result["baseline"][1]["psnr"],
                                   "ssim": result["baseline"][1]["ssim"]}
        return result["uam"][0], {}, numbers
    result = uam_image.run_edit(upipe, image, params["source"], params["target"], params["steps"],
                                guidance=params["guidance"], mode=params["mode"], quantile=params["quantile"],
                                recon_t=params["recon_t"], dilate_radius=params["dilate_radius"])
    extra = {} if result["mask"] is None else {"mask": uam_image.mask_to_image(result["mask"], image.size)}
    return result["image"], extra, {"mask_coverage": result["coverage"], "mask_source": result["mask_source"]}
