"""Scripted batch generation: a job file in, one PNG per image (one GIF/WebP per video) and a manifest out.

Examples::

    # Eight APG images and eight CFG images of the example jobs, with the embedded model
    guidekit batch assets/examples/jobs.jsonl --out runs/example

    # The same run on every GPU of a machine (or several machines): accelerate splits the images
    accelerate launch -m guidekit.apps.batch assets/examples/jobs.jsonl --out runs/example --model ID_OR_PATH

    # Rerunning any of these skips finished images and redoes unfinished ones.

    # Style transfer jobs (StyleID, or StyleID + StyleSSP) name two images, relative to the job file:
    #   {"content_image": "content.png", "style_image": "style.png", "start_point": "stylessp"}

    # UAM jobs reconstruct or edit an image (relative to the job file), one PNG each:
    #   {"kind": "reconstruct", "image": "photo.png"}
    #   {"kind": "edit", "image": "photo.png", "source": "a red circle", "target": "a green circle"}

    # Video jobs (AnimateDiff + FreeNoise, on the embedded video model or --video-model) have `frames`:
    #   {"prompts": {"0": "a red circle", "24": "a blue circle"}, "frames": 48, "freenoise": true, "format": "webp"}

Layout of --out::

    DIR/<name>-<method>-<key>-s<seed>.png   one finished image (written to a temporary file, then renamed)
    DIR/<name>-<method>-<key>-s<seed>.gif   one finished video (or .webp: the job's `format`), written the same way
    DIR/<name>-<method>-<key>-s0-mask.png   an edit job's mask, written before its image

    <name>: the job's name, or the start of its prompt; <method>: what it runs and at which scale (apg-w3,
    cfg-w7.5-elucd2, cfg-w3-freenoise, stylessp, uam; `method_tag`); <key>: a hash of every resolved parameter
    and the model, which makes the name unique.
    DIR/manifest.jsonl             one row per finished image, merged at the end of each run
    DIR/.parts/*.jsonl             rows written while a run is going on (merged into manifest.jsonl)
    DIR/.lock                      held by the run using DIR: a second run on DIR at the same time is refused
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import importlib.util
import json
import os
import socket
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import click

from guidekit.toy.settings import embedded_name

from .jobs import (CLASSIFIER, GUIDANCE, KINDS, STYLE, ClassifierCache, Job, JobError, generate, generate_video,
                   is_style, is_video, job_key, kind_module, read_jobs, resolve, resolve_video, style_transfer, to_pil,
                   video_bytes)

LOCK = ".lock"
MANIFEST = "manifest.jsonl"
# tqdm's default turns slow rates into s/img; always show images/s, and the time left (ETA).
BAR_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_noinv_fmt}]"
PARTS = ".parts"
EMBEDDED_ID = "guidekit-toy-sd"  # the model id recorded for the embedded model
EMBEDDED_VIDEO_ID = "guidekit-toy-video"  # the model id recorded for the embedded video model


#----------------------------------------------------------------------------
# Model loading and identity.

def load_model(model: Optional[str], dtype=None):
    """Load the pipeline the run uses (the shared loader of `guidekit generate`), in `dtype` (default float32).

    Loading in the run's dtype, rather than converting afterwards, lets diffusers keep the modules that must
    stay in float32 there (and spares the warning a later `.to(dtype)` gives about them).
    """
    from .jobs import load_pipeline

    return load_pipeline(model, dtype=dtype)


def model_identity(pipe, requested: Optional[str]) -> dict:
    """Model id, revision (hub snapshot commit) or a content hash of a local folder, and the pipeline class."""
    path = getattr(pipe, "name_or_path", None) or getattr(pipe.config, "_name_or_path", None) or requested
    ident = {"id": requested or path, "path": str(path) if path else None, "class": type(pipe).__name__,
             "revision": None, "sha256": None}
    if path and not os.path.isdir(path) and str(path).count("/") == 1:
        try:  # a hub id: its snapshot folder in the local cache (never the network) names the revision
            from huggingface_hub import snapshot_download

            path = snapshot_download(str(path), local_files_only=True)
            ident["path"] = path
        except Exception:  # noqa: BLE001 - identity is best effort; the id is still recorded
            pass
    if path and _is_embedded(path):
        ident["id"] = EMBEDDED_ID  # the same id (and file names) wherever the package is installed
    if path and os.path.isdir(path):
        p = Path(path)
        # A hub snapshot folder is named by its commit: .../models--org--name/snapshots/<commit>
        if p.parent.name == "snapshots" and len(p.name) == 40:
            ident["revision"] = p.name
        ident["sha256"] = _folder_hash(p)
    return ident


def classifier_identity(name: str) -> dict:
    """A job's classifier as the manifest records it: the name the job gave, and the content hash of its
    folder (None for a hub id)."""
    local = Path(name).expanduser()
    return {"id": name, "sha256": _folder_hash(local) if local.is_dir() else None}


def _is_embedded(path) -> bool:
    try:
        from guidekit.toy import default_model_path

        return Path(path).resolve() == Path(default_model_path()).resolve()
    except (ImportError, OSError, AttributeError):
        return False


def _walk(folder: Path):
    """Every path under `folder`, through linked folders too (a model folder may be assembled from links to the
    folders of others, as the embedded video model is); each real folder is entered once."""
    seen = set()
    for root, dirs, names in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        yield from (Path(root) / name for name in names)


def _folder_hash(folder: Path, full_limit: int = 256 * 2**20) -> str:
    """SHA-256 over a model folder: file names and contents for folders up to 256 MiB, otherwise names,
    sizes and the first/last MiB of each file (prefixed "partial:") so that large checkpoints hash fast."""
    files = sorted(f for f in _walk(folder) if f.is_file() and not f.name.startswith("."))
    total = sum(f.stat().st_size for f in files)
    h = hashlib.sha256()
    partial = total > full_limit
    for f in files:
        h.update(str(f.relative_to(folder)).encode() + b"\0")
        size = f.stat().st_size
        h.update(str(size).encode() + b"\0")
        with open(f, "rb") as fh:
            if partial and size > 2 * 2**20:
                h.update(fh.read(2**20))
                fh.seek(size - 2**20)
                h.update(fh.read(2**20))
            else:
                for block in iter(lambda: fh.read(2**20), b""):
                    h.update(block)
    return ("partial:" if partial else "") + h.hexdigest()


#----------------------------------------------------------------------------
# Work items and files.

@dataclass
class Item:
    job: Job
    params: dict  # resolved
    key: str
    seed: int

    @property
    def file(self) -> str:
        """`<name or prompt>-<method and scale>-<key>-s<seed>.<suffix>`: the key (a hash of the resolved params and
        the model) makes it unique; the method tag only makes it readable, and follows from the same params."""
        prefix = self.job.params["name"] or _slug(_title(self.params))
        suffix = self.params["format"] if is_video(self.params) else "png"
        tag = method_tag(self.params)
        return f"{prefix}-{tag + '-' if tag else ''}{self.key}-s{self.seed}.{suffix}"


def _number(value) -> str:
    return f"{float(value):g}"


def method_tag(params: dict) -> str:
    """What a job runs, for its file names: "apg-w3", "cfg-w7.5-elucd2" (with a classifier: its calibration and
    scale), "cfg-w3-freenoise" (a video), "stylessp" (a style transfer), the mode of an edit ("uam")."""
    if params.get("kind") in KINDS:
        tag = getattr(kind_module(params["kind"]), "tag", None)
        return tag(params) if tag is not None else ""
    if is_style(params):
        return params["start_point"]
    tag = f"{params['guidance']}-w{_number(params['guidance_scale'])}"
    if is_video(params):
        return tag + ("-freenoise" if params.get("freenoise") is not None else "-plain")
    if params.get("classifier") is not None:
        tag += f"-{params['calibration']}{_number(params['classifier_scale'])}"
    return tag


def _title(params: dict) -> str:
    """What a job makes, in words: its prompt (a video's first key prompt), or "<content> in the style of <style>"
    for a style transfer, "<kind> <image>" for a job with a kind."""
    if params.get("kind") in KINDS:
        return kind_module(params["kind"]).title(params)
    if is_style(params):
        return f"{Path(params['content_image']).stem} in the style of {Path(params['style_image']).stem}"
    if params.get("prompts"):
        return next(iter(params["prompts"].values()))
    return params["prompt"]


def _slug(text: str, n: int = 32) -> str:
    out = "".join(c if c.isalnum() else "-" for c in text.lower())
    out = "-".join(filter(None, out.split("-")))
    return (out[:n].rstrip("-")) or "image"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


#: Scheduler classes by the `scheduler` a job's params name (jobs with the recommended EluCD sampler).
SAMPLER_NAMES = {"ddpm": "DDPMScheduler", "ddim": "DDIMScheduler"}


def a1111_parameters(params: dict, seed: int, model: dict) -> str:
    """The `parameters` PNG text chunk in the format most image tools read (A1111 style)."""
    if params.get("kind") in KINDS:
        line = (f"Steps: {params['steps']}, Sampler: DDIM inversion (UAM {params['kind']}), "
                f"Size: {params['width']}x{params['height']}, Model: {model.get('id')}")
        return f"{_title(params)}\n{line}"
    if is_style(params):
        line = (f"Steps: {params['steps']}, Sampler: DDIM inversion (StyleID), Seed: {seed}, "
                f"Size: {params['width']}x{params['height']}, Model: {model.get('id')}, ")
        line += ", ".join(f"{k}: {params[k]}" for k in STYLE if k in params and params[k] is not None)
        return f"{_title(params)}\n{line}"
    sampler = SAMPLER_NAMES.get(params.get("scheduler")) or model.get("scheduler", "default")
    line = (f"Steps: {params['steps']}, Sampler: {sampler}, "
            f"CFG scale: {params['guidance_scale']}, Seed: {seed}, Size: {params['width']}x{params['height']}, "
            f"Model: {model.get('id')}, Guidance: {params['guidance']}")
    extra = GUIDANCE[params["guidance"]].params
    if extra:
        line += ", " + ", ".join(f"{k}: {params[k]}" for k in extra)
    if params.get("classifier") is not None:
        line += ", " + ", ".join(f"{k}: {params[k]}" for k in CLASSIFIER)
    neg = f"\nNegative prompt: {params['negative_prompt']}" if params.get("negative_prompt") else ""
    return f"{params['prompt']}{neg}\n{line}"


def png_bytes(image, text: dict) -> bytes:
    import io

    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    for k, v in text.items():
        info.add_itxt(k, v)
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def write_tmp(path: Path, data: bytes) -> Path:
    """Write `data` to a hidden temporary file beside `path` and fsync it; rename it with `os.replace`."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    return tmp


def write_atomic(path: Path, data: bytes) -> None:
    """Write then rename: `path` appears only complete, or not at all."""
    os.replace(write_tmp(path, data), path)


def append_row(path: Path, row: dict) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(row, sort_keys=True) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def merge_manifest(out: Path) -> int:
    """Merge manifest.jsonl and every .parts/*.jsonl into one manifest.jsonl (atomically): one row per
    existing image, the latest row wins. Returns the number of rows. Safe to run again after a crash."""
    rows: dict[str, list[dict]] = {}
    parts = sorted((out / PARTS).glob("*.jsonl"), key=lambda f: f.stat().st_mtime_ns)
    sources = [out / MANIFEST] + parts
    for src in sources:
        if not src.exists():
            continue
        for line in src.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a row cut off by a crash: its image was not renamed into place either
            if isinstance(row, dict) and "file" in row:
                rows.setdefault(row["file"], []).append(row)
    kept = []
    for name, candidates in sorted(rows.items()):
        path = out / name
        if not path.exists():
            continue
        if len(candidates) > 1:  # an image redone after a crash: keep the row that describes the file
            digest = _sha256(path.read_bytes())
            candidates = [r for r in candidates if r.get("sha256") == digest] or candidates
        kept.append(candidates[-1])
    data = "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept).encode()
    write_atomic(out / MANIFEST, data)
    for src in parts:
        src.unlink(missing_ok=True)
    return len(kept)


#----------------------------------------------------------------------------
# One run per output folder.

class OutputLocked(RuntimeError):
    """The output folder cannot be held for this run: another run holds it (the message names the folder, the
    lock file and the holder), or its file system cannot lock files."""


def _flock(fd: int, path: Path) -> bool:
    """Take an exclusive lock on `path`, open as `fd`, without waiting; False if another open file holds it.

    flock locks belong to the open file, and the kernel drops them when the holder exits in any way (a
    killed run leaves no stale lock). On NFS, Linux maps them to the server's byte-range locks.
    """
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as e:  # e.g. ENOLCK: a file system without locks
        raise OutputLocked(f"--out: cannot lock {path} ({e}); "
                           "use an output folder on a file system with file locks") from None
    return True


@contextlib.contextmanager
def output_lock(out: Path):
    """Hold DIR/.lock for the duration, or raise `OutputLocked` when another live run holds it.

    The file stays after the run (deleting it would let a waiting run lock a file that a third run no longer
    sees); only the lock, not the file, says that a run is going on. The file records the holder's pid and
    host, for the message a second run shows.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK
    if importlib.util.find_spec("fcntl") is None:  # Windows: no flock
        _say(f"note: this platform has no file locks; do not start a second run on {out} while this one runs")
        yield path
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if not _flock(fd, path):
            holder = path.read_text(encoding="utf-8", errors="replace").strip() or "holder not yet recorded"
            raise OutputLocked(f"--out: {out} is in use by another guidekit batch run ({holder}, lock file {path}); "
                               "wait for it to finish or stop it, or choose another --out")
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        yield path
    finally:
        os.close(fd)  # releases the lock


@contextlib.contextmanager
def launch_lock(state, out: Path):
    """The output lock for a whole launch: its main process holds it, and the other processes of the same
    `accelerate launch` share the folder. Every process learns from the main one whether the run may go on.

    Yields True to go on. When another run holds the folder, the main process raises `OutputLocked` and the
    others yield False (the main process reports it; one message, not one per process).
    """
    with contextlib.ExitStack() as held:
        failure = None
        if state.is_main_process:
            try:
                held.enter_context(output_lock(out))
            except (OutputLocked, OSError) as e:  # OSError: DIR cannot be created; the others must not wait
                failure = e
        error = None if failure is None else str(failure)
        if state.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            error = broadcast_object_list([error])[0]
        if failure is not None:
            raise failure
        # The main process merges the manifest after every process has passed the run's last barrier, so
        # releasing the lock when it leaves needs no further barrier here.
        yield error is None


#----------------------------------------------------------------------------
# The run.

def _say(msg: str) -> None:
    click.echo(msg, err=True)


def _hang_for_tests(done: int) -> None:
    """Test aid: GUIDEKIT_BATCH_HANG_BEFORE_RENAME=N blocks forever before renaming the image after N
    finished ones, so a test can kill a run at a known point without timing."""
    at = os.environ.get("GUIDEKIT_BATCH_HANG_BEFORE_RENAME")
    if at is not None and done == int(at):
        _say(f"[test] hanging before rename after {done} image(s)")
        sys.stderr.flush()
        while True:
            time.sleep(3600)


def run_batch(jobs_file, out, model=None, strict=False, batch_size=1, dtype="auto", pipe=None,
              video_model=None) -> int:
    """Run a job file; returns the exit status (0 all done, 1 some image failed, 2 bad input with --strict).

    `video_model`: the video jobs' model (an AnimateDiff pipeline folder, or a MotionAdapter folder paired with
    the image model); None: the embedded video model. Raises `OutputLocked` when another run is using `out`,
    JobError when `video_model` cannot be loaded.
    """
    from accelerate import PartialState

    state = PartialState(cpu=_cpu_only())
    main = state.is_main_process
    out = Path(out)

    jobs, errors = read_jobs(jobs_file, family=_image_family(model, pipe))
    if main:
        for line, msg in errors:
            _say(f"{jobs_file}: skipped {msg}" if not strict else f"{jobs_file}: {msg}")
    if errors and strict:
        if main:
            _say(f"--strict: {len(errors)} bad line(s); nothing was generated")
        return 2
    if not jobs:
        if main:
            _say(f"{jobs_file}: no job to run")
        return 0 if not errors else 1

    # Locked before the model loads: a second run on the same folder stops at once, having done nothing.
    with launch_lock(state, out) as go_on:
        if not go_on:
            return 1
        return _run_jobs(state, jobs, errors, jobs_file, out, model, strict, batch_size, dtype, pipe, video_model)


def _image_family(model, pipe):
    """The image model's family (`guidekit.apps.families.Family`) from its model_index.json, before any weights
    load, so that a job whose method it cannot run is a bad line of the job file; None when unknown (loading
    the model then says what is wrong with it)."""
    from .families import family_of_pipe
    from .models import ModelLoadError, model_family

    if pipe is not None:
        return family_of_pipe(pipe)
    if model is None:
        return None  # the embedded model: Stable Diffusion, every method runs
    try:
        return model_family(model)
    except ModelLoadError:
        return None


def _image_model(pipe, model, run_dtype, device) -> tuple:
    """The image model (loaded unless given) in the run's dtype on its device, and its identity."""
    if pipe is None:
        pipe, model = load_model(model, dtype=run_dtype)
    if pipe.dtype != run_dtype:  # a pipeline passed in by the caller
        pipe = pipe.to(dtype=run_dtype)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    ident = model_identity(pipe, model)
    ident["scheduler"] = type(pipe.scheduler).__name__
    return pipe, ident


def _video_path(video_model) -> Optional[Path]:
    from .jobs import embedded_video_model_path

    return Path(video_model).expanduser() if video_model is not None else embedded_video_model_path()


def _is_adapter(path: Optional[Path]) -> bool:
    """Whether the video model at `path` is a motion adapter, which runs on the image model."""
    return path is not None and not (path / "model_index.json").is_file() and (path / "config.json").is_file()


def _needs_image_model(jobs: list, video_model) -> bool:
    """Whether the run needs the image model: for image or style jobs, or for a motion adapter's video jobs."""
    videos = [job for job in jobs if is_video(job.params)]
    return len(videos) < len(jobs) or _is_adapter(_video_path(video_model))


def _video_model(jobs: list, video_model, pipe, run_dtype, device, image_ident) -> tuple:
    """(video pipeline, its identity, why there is none): (None, None, "") when no job is a video job. A
    `video_model` that cannot be loaded raises JobError; a missing embedded one is the message of each video job."""
    from .jobs import GET_VIDEO_MODEL, load_video_pipeline

    if not any(is_video(job.params) for job in jobs):
        return None, None, ""
    path = _video_path(video_model)
    if path is None:
        return None, None, ("frames: a video job needs a video model, and the embedded one is not installed; "
                            + GET_VIDEO_MODEL)
    vpipe = load_video_pipeline(path, pipe, device=device, dtype=run_dtype)
    return vpipe, video_identity(vpipe, path, image_ident), ""


def video_identity(vpipe, path: Path, image_ident: Optional[dict]) -> dict:
    """The video model as the manifest records it; a motion adapter's id names the image model it runs on."""
    from .jobs import embedded_video_model_path

    embedded = embedded_video_model_path()
    ident = {"id": str(path), "path": str(path), "class": type(vpipe).__name__, "revision": None,
             "sha256": _folder_hash(path), "scheduler": type(vpipe.scheduler).__name__}
    if embedded is not None and path.resolve() == embedded.resolve():
        ident["id"] = EMBEDDED_VIDEO_ID  # the same id (and file names) wherever the package is installed
    if _is_adapter(path) and image_ident is not None:
        ident["image_model"] = {k: image_ident[k] for k in ("id", "sha256")}
        ident["id"] = f"{image_ident['id']}+{ident['id']}"
    return ident


def _run_jobs(state, jobs, errors, jobs_file, out: Path, model, strict, batch_size, dtype, pipe, video_model) -> int:
    """Load the model (unless given), generate every unfinished image, merge the manifest: `run_batch`'s work
    while this launch holds the output folder."""
    import torch
    from tqdm.auto import tqdm

    import guidekit

    main = state.is_main_process
    device = state.device
    run_dtype = {"auto": torch.float16 if device.type == "cuda" else torch.float32,
                 "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    ident, embedded, recommended = None, None, None
    if pipe is not None or _needs_image_model(jobs, video_model):
        pipe, ident = _image_model(pipe, model, run_dtype, device)
        # A job that leaves a value out gets the default of `guidekit.apps.defaults`: for the embedded model (the
        # folder holding its weights) its recommendation; the resolved values name its files and are recorded.
        recommended = embedded_name(ident["path"])
        embedded = True if recommended is not None else None
    # Video jobs run on the video model, loaded only when the file has one; without it they are bad lines.
    vpipe, vident, no_video = _video_model(jobs, video_model, pipe, run_dtype, device, ident)
    # The folder whose denoiser the video jobs run: a motion adapter runs on the image model's
    vsource = (ident or {}).get("path") if _is_adapter(_video_path(video_model)) else (vident or {}).get("path")
    vrecommended = embedded_name(vsource)
    # Each classifier a job names is loaded once per run; its label is resolved to a class id, which (with the
    # classifier's path, scale and calibration) is recorded and names the files like any other parameter.
    classifiers = ClassifierCache()
    classifier_ids: dict[str, dict] = {}
    spipe = None  # the StyleID pipeline (the same modules) of style-transfer jobs, made at the first one
    upipe = None  # the UAM pipeline (the same modules) of reconstruct and edit jobs, made at the first one

    # Expand jobs into one item per image; a job the model cannot run is a bad line too.
    items: list[Item] = []
    seen: set[str] = set()
    bad_after_load = 0
    for job in jobs:
        where = f"line {job.line}: "
        try:
            if is_video(job.params):
                if vpipe is None:
                    raise JobError(where + no_video)
                params = resolve_video(job.params, vpipe, where=where, model=vsource)
            elif job.params.get("kind") in KINDS:
                params = kind_module(job.params["kind"]).resolve(job.params, pipe, where=where)
            else:
                params = resolve(job.params, pipe, where=where, images=min(batch_size, len(job.seeds)),
                                 embedded=embedded, classifiers=classifiers)
        except JobError as e:
            bad_after_load += 1
            if main:
                _say(f"{jobs_file}: {'' if strict else 'skipped '}{e}")
            if strict:
                return 2
            continue
        key = job_key(params, (vident if is_video(params) else ident)["id"] or "")
        if params.get("classifier") is not None and params["classifier"] not in classifier_ids:
            classifier_ids[params["classifier"]] = classifier_identity(params["classifier"])
        for seed in job.seeds:
            item = Item(job, params, key, seed)
            if item.file in seen:
                if main:
                    _say(f"{jobs_file}: line {job.line}: seed {seed} repeats an earlier job; generated once")
                continue
            seen.add(item.file)
            items.append(item)

    if main:
        out.mkdir(parents=True, exist_ok=True)
        (out / PARTS).mkdir(exist_ok=True)
        for stale in out.glob(".*.tmp"):  # unfinished images of a killed run
            stale.unlink(missing_ok=True)
        merge_manifest(out)  # rows a killed run left in .parts
    state.wait_for_everyone()

    pending = [it for it in items if not (out / it.file).exists()]
    skipped = len(items) - len(pending)
    # Every process must split the same list: no image is renamed into place before all have looked.
    state.wait_for_everyone()
    part = out / PARTS / f"rank{state.process_index}-{os.getpid()}-{time.time_ns()}.jsonl"

    new = failed = 0
    t_start = time.perf_counter()
    with state.split_between_processes(pending) as mine:
        bar = tqdm(total=len(mine), unit="img", desc=f"[{state.process_index}] generating" if state.num_processes > 1
                   else "generating", position=state.process_index, dynamic_ncols=True, file=sys.stderr,
                   bar_format=BAR_FORMAT)
        for chunk in _chunks(mine, batch_size):
            params = chunk[0].params
            t0 = time.perf_counter()
            extra, numbers = {}, None
            ran: dict = {}  # what the call ran with (generate and generate_video fill it)
            try:
                if params.get("kind") in KINDS:  # a chunk of one job: its image and extra files (an edit's mask)
                    if upipe is None:
                        from .uam_image import uam_pipeline

                        upipe = uam_pipeline(pipe)
                    image, extra, numbers = kind_module(params["kind"]).run(upipe, params, chunk[0].job.files)
                    outputs, nsfw = [_png(image, params, chunk[0].seed, ident)], None
                    extra = {_extra_name(chunk[0].file, k): png_bytes(im, {}) for k, im in extra.items()}
                elif is_video(params):  # a chunk of one video
                    frames = generate_video(vpipe, params, chunk[0].seed, record=ran)
                    outputs, nsfw = [video_bytes(frames, params["format"], params["fps"])], None
                else:
                    if is_style(params):
                        if spipe is None:
                            from .style import style_pipeline

                            spipe = style_pipeline(pipe)
                        seeds = [it.seed for it in chunk]
                        images, nsfw = style_transfer(spipe, params, seeds, chunk[0].job.files), None
                    else:
                        images, nsfw = generate(pipe, params, [it.seed for it in chunk], classifiers=classifiers,
                                                record=ran)
                    outputs = [_png(image, params, it.seed, ident) for it, image in zip(chunk, to_pil(images))]
            except Exception as e:  # one failed call must not lose the others
                failed += len(chunk)
                _say(f"line {chunk[0].job.line}: seeds {[it.seed for it in chunk]} failed: {type(e).__name__}: {e}")
                if not isinstance(e, (ValueError, JobError)):
                    traceback.print_exc()
                if strict:
                    break
                bar.update(len(chunk))
                continue
            dt = time.perf_counter() - t0
            for i, (it, data) in enumerate(zip(chunk, outputs)):
                row = {
                    "file": it.file,
                    "sha256": _sha256(data),
                    "line": it.job.line,
                    "job": it.job.raw,
                    "params": params,
                    "seed": it.seed,
                    "model": vident if is_video(params) else ident,
                    **({} if is_video(params) or is_style(params) or params.get("kind") in KINDS
                       else _guidance_record(pipe, params)),
                    # the settings the call ran with, and the embedded model whose recommendation applied
                    **({"settings": {**ran, "recommended": vrecommended if is_video(params) else recommended}}
                       if ran else {}),
                    **({"classifier": classifier_ids[params["classifier"]]} if params.get("classifier") else {}),
                    "guidekit_version": guidekit.__version__,
                    "versions": _versions(),
                    "device": str(device),
                    "dtype": str(run_dtype).replace("torch.", ""),
                    "process": state.process_index,
                    "num_processes": state.num_processes,
                    "timings": {"call_seconds": round(dt, 4), "images_in_call": len(chunk),
                                "seconds_per_image": round(dt / len(chunk), 4)},
                    "nsfw": bool(nsfw[i]) if nsfw is not None else None,
                    **({"uam": numbers, "files": sorted(extra)} if numbers is not None else {}),
                    "finished_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                }
                # Image bytes, then the row, are durable before the image appears under its name;
                # a row without an image is dropped at merge, a leftover .tmp is deleted by the next run.
                for name, blob in extra.items():  # before the image: a finished image has its extra files
                    write_atomic(out / name, blob)
                tmp = write_tmp(out / it.file, data)
                append_row(part, row)
                _hang_for_tests(new)
                os.replace(tmp, out / it.file)
                new += 1
            bar.update(len(chunk))
        bar.close()
    elapsed = time.perf_counter() - t_start

    counts = [new, failed]
    if state.num_processes > 1:
        from accelerate.utils import gather_object

        gathered = gather_object([counts])
        new, failed = (sum(c[0] for c in gathered), sum(c[1] for c in gathered))
    state.wait_for_everyone()
    if main:
        rows = merge_manifest(out)
        bad = len(errors) + bad_after_load
        rate = f", {new / elapsed:.2f} images/s" if new and elapsed > 0 else ""
        _say(f"done: {new} generated, {skipped} already finished, {failed} failed, {bad} bad line(s) skipped; "
             f"{elapsed:.1f} s{rate}; {state.num_processes} process(es)")
        _say(f"manifest: {out / MANIFEST} ({rows} images)")
    no_valid_line = not items and bad_after_load > 0
    return 1 if failed or no_valid_line else 0


def _guidance_record(pipe, params: dict) -> dict:
    """An image job's model family and the guidance slot's scale as the pipeline took it: {"family": "flux",
    "scale": {"true_cfg_scale": 4.0, "negative_prompt": ""}}."""
    from .families import family_of_pipe
    from .jobs import guidance_call

    family = family_of_pipe(pipe)
    return {"family": family.name if family is not None else None, "scale": guidance_call(pipe, params)}


def _png(image, params: dict, seed: int, ident: dict) -> bytes:
    """One image as PNG bytes with its parameters in text chunks. No local path or timing: the same image is the
    same file on any process or machine."""
    import guidekit

    meta = {"prompt": _title(params), "params": params, "seed": seed,
            "model": {k: v for k, v in ident.items() if k != "path"}, "guidekit_version": guidekit.__version__}
    return png_bytes(image, {"parameters": a1111_parameters(params, seed, ident),
                             "guidekit": json.dumps(meta, sort_keys=True)})


def _extra_name(file: str, what: str) -> str:
    """The name of a job's extra file (an edit's mask) beside its image `file`."""
    stem, dot, suffix = file.rpartition(".")
    return f"{stem}-{what}.{suffix}"


def _cpu_only() -> bool:
    """Whether this machine has no accelerator: accelerate then runs launched processes as MULTI_CPU (gloo)."""
    import torch

    if os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"):
        return True
    accel = getattr(torch, "accelerator", None)
    if accel is not None and hasattr(accel, "is_available"):
        return not accel.is_available()
    return not torch.cuda.is_available()


def _chunks(items, size):
    """Consecutive items of the same job, at most `size` per call (one per call for videos)."""
    chunk: list = []
    for it in items:
        one = is_video(it.params) or it.params.get("kind") in KINDS
        if chunk and (len(chunk) == (1 if one else size) or it.key != chunk[0].key):
            yield chunk
            chunk = []
        chunk.append(it)
    if chunk:
        yield chunk


def _versions() -> dict:
    import diffusers
    import torch
    import transformers

    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__}


#----------------------------------------------------------------------------
# Command line.

@click.command(context_settings={"show_default": True, "help_option_names": ["-h", "--help"]})
@click.argument("jobs", metavar="JOBS", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out", "out", metavar="DIR", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Output folder: PNGs and manifest.jsonl. Finished images there are never overwritten.")
@click.option("--model", metavar="ID_OR_PATH", default=None,
              help="Hub id or local folder of a Stable Diffusion 1.x/2.x, SDXL, SD3, Flux or Qwen-Image model (the "
                   "family is read from its model_index.json; SD3, Flux and Qwen-Image run cfg and apg jobs); "
                   "default: the embedded toy model.")
@click.option("--strict", is_flag=True, help="Stop at the first bad job line or failed image instead of skipping it.")
@click.option("--batch-size", metavar="INT", type=click.IntRange(min=1, max=64), default=1,
              help="Images per pipeline call (seeds of one job). Images do not depend on it.")
@click.option("--dtype", type=click.Choice(["auto", "fp32", "fp16", "bf16"]), default="auto",
              help="Model dtype; auto is fp16 on CUDA and fp32 elsewhere.")
@click.option("--video-model", metavar="DIR", default=None, type=click.Path(file_okay=False, path_type=Path),
              help="Model of the video jobs (those with frames): a local AnimateDiff pipeline folder, or a "
                   "MotionAdapter folder run on --model; default: the embedded video model.")
def batch(jobs, out, model, strict, batch_size, dtype, video_model):
    """Generate every image of a JSONL/CSV job file into DIR, resumably.

    \b
    JOBS: one job per line, e.g.
      {"prompt": "a red circle on a blue background", "seeds": "0-7", "guidance": "apg", "guidance_scale": 12}
    Fields: prompt, negative_prompt, name, seed | seeds, steps, width, height, guidance (cfg|apg),
    guidance_scale, guidance_rescale (cfg), eta, norm_threshold, momentum, space, start, stop (apg),
    classifier, label, classifier_scale, calibration (EluCD classifier guidance, any method).
    Style transfer jobs instead: content_image, style_image (paths relative to JOBS), start_point
    (styleid|stylessp), content_prompt, style_prompt, gamma, temperature, alpha, inversion_guidance_scale
    (stylessp),
    with name, seed | seeds, steps (default 50), e.g.
      {"content_image": "a.png", "style_image": "b.png", "start_point": "stylessp", "style_prompt": "a red circle"}
    UAM jobs have a kind: {"kind": "reconstruct", "image": "a.png"} or {"kind": "edit", "image": "a.png",
    "source": "...", "target": "..."} (fields of guidekit reconstruct / guidekit edit; one PNG per job).
    Video jobs (one animated file per seed, on --video-model) add frames, and optionally prompts (an object
    {frame: prompt}; prompt, if given, is frame 0's), freenoise (true, false, or an object of guidekit.FreeNoise
    arguments), fps and format (gif|webp), e.g.
      {"prompts": {"0": "a red circle", "24": "a blue circle"}, "frames": 48, "freenoise": {"context_stride": 2}}
    Defaults are those of guidekit generate and guidekit video (guidekit.apps.defaults): guidance apg (cfg
    in a video job); guidance_scale, steps and APG's eta / norm_threshold / momentum the embedded model's
    (guidekit.toy.settings_for), else the model family's scale (7.5 for SD), 25 steps and the paper's
    0 / 15 / -0.5; guidance_scale 1 for an empty prompt. A job with the embedded classifier on the embedded
    model gets guidekit.toy.RECOMMENDED_ELUCD (a classifier_scale it gives wins) and samples with
    guidekit.toy.RECOMMENDED_ELUCD_SAMPLER (ancestral DDPM; its steps unless the job gives steps); other jobs
    keep the model's scheduler. The manifest records every resolved value.

    \b
    Examples:
      guidekit batch assets/examples/jobs.jsonl --out runs/example
      accelerate launch -m guidekit.apps.batch assets/examples/jobs.jsonl --out runs/example
    """
    try:
        code = run_batch(jobs, out, model=model, strict=strict, batch_size=batch_size, dtype=dtype,
                         video_model=video_model)
    except JobError as e:
        raise click.UsageError(str(e)) from None
    except OutputLocked as e:
        raise click.ClickException(str(e)) from None
    sys.exit(code)


if __name__ == "__main__":  # `accelerate launch -m ...` skips the CLI group: be as quiet as it is
    from guidekit.apps.quiet import quiet

    quiet()
    batch()
