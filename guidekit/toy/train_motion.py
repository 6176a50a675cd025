"""Training of the embedded motion model: a tiny diffusers `MotionAdapter` on top of the frozen toy image model.

AnimateDiff's recipe on the toy video world: the image model (VAE, text encoder, UNet) stays frozen, the motion
modules learn to denoise 16-frame clips of :mod:`.video_world` with the image model's own noise schedule and
v-prediction loss.  Every motion module's ``proj_out`` starts at zero (AnimateDiff's initialisation; diffusers'
``MotionAdapter`` draws it at random), so training starts from the image model exactly.

Seeded and resumable like :mod:`.train`: clip ``j`` of step ``k`` is ``video_world.generate_clip(base + k * batch
+ j)``, the noise of step ``k`` comes from a generator seeded with (seed, k), and a checkpoint resumes where it
stopped.  Seeds below :data:`.train.HELD_OUT_LIMIT` are never used for training.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from . import video_world
from .model import SCHEDULER_KWARGS, build_train_scheduler
from .train import _ema_update, _log, _lr_factor, _step_generator, images_to_tensor

__all__ = ["MotionConfig", "build_motion_adapter", "motion_module_groups", "train_motion", "MOTION_MAX_SEQ_LENGTH"]

#: The longest sequence the motion model's positional table covers (twice the 16 training frames).
MOTION_MAX_SEQ_LENGTH = 32
_MOTION_BASE = 4 * 10**7


@dataclass
class MotionConfig:
    seed: int = 0
    steps: int = 3000
    batch: int = 2  # clips per step
    frames: int = 16
    lr: float = 5e-4
    warmup: int = 100
    min_lr_fraction: float = 0.1
    caption_dropout: float = 0.1
    min_snr_gamma: float = 5.0
    ema_decay: float = 0.998
    grad_clip: float = 1.0
    heads: int = 4  # temporal attention heads per motion module
    checkpoint_every: int = 100
    log_every: int = 25
    # continued training: start from an exported adapter folder instead of zeroed proj_out, and draw the clips
    # and noise of step k as those of step k + step_offset (so a continuation sees clips the first run did not)
    init_from: Optional[str] = None
    step_offset: int = 0

    @classmethod
    def from_dict(cls, d: dict) -> "MotionConfig":
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


# Settings that decide the result; a checkpoint resumes only with the same values (bookkeeping may change).
_LOCKED = ("seed", "steps", "batch", "frames", "lr", "warmup", "min_lr_fraction", "caption_dropout",
           "min_snr_gamma", "ema_decay", "grad_clip", "heads", "init_from", "step_offset")


def build_motion_adapter(unet, heads: int = 4, max_seq_length: int = MOTION_MAX_SEQ_LENGTH, zero_out: bool = True):
    """A `MotionAdapter` matching ``unet``'s blocks, with every motion module's ``proj_out`` zeroed.

    Args:
        unet (`UNet2DConditionModel`): the image UNet the adapter will sit on (its widths, layers per block and
            group-norm groups are copied: diffusers' ``from_unet2d`` runs the motion modules with the UNet's groups).
        heads (`int`, defaults to 4): temporal attention heads per motion module.
        max_seq_length (`int`, defaults to 32): ``motion_max_seq_length``, the positional table's length.
        zero_out (`bool`, defaults to True): zero ``proj_out`` so that the adapter starts as the identity.
    """
    from diffusers import MotionAdapter

    config = unet.config
    adapter = MotionAdapter(
        block_out_channels=tuple(config.block_out_channels),
        motion_layers_per_block=config.layers_per_block,
        motion_transformer_layers_per_block=1,
        motion_mid_block_layers_per_block=1,
        motion_num_attention_heads=heads,
        motion_norm_num_groups=config.norm_num_groups,
        motion_max_seq_length=max_seq_length,
        use_motion_mid_block=True,
    )
    if zero_out:
        for name, module in adapter.named_modules():
            if name.endswith("proj_out"):
                torch.nn.init.zeros_(module.weight)
                torch.nn.init.zeros_(module.bias)
    return adapter


def motion_module_groups(model) -> list:
    """The `MotionModules` containers of a `MotionAdapter` or `UNetMotionModel`, in one fixed order."""
    out = [block.motion_modules for block in model.down_blocks]
    if getattr(model, "mid_block", None) is not None and hasattr(model.mid_block, "motion_modules"):
        out.append(model.mid_block.motion_modules)
    out += [block.motion_modules for block in model.up_blocks]
    return out


def _copy_motion_modules(source, target) -> None:
    for src, dst in zip(motion_module_groups(source), motion_module_groups(target)):
        dst.load_state_dict(src.state_dict())


def _load_image_model(model_path):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    path = str(model_path)
    return (AutoencoderKL.from_pretrained(path, subfolder="vae"),
            CLIPTextModel.from_pretrained(path, subfolder="text_encoder"),
            CLIPTokenizer.from_pretrained(path, subfolder="tokenizer"),
            UNet2DConditionModel.from_pretrained(path, subfolder="unet"))


def _load_init(adapter, folder) -> None:
    """Load an exported adapter's weights into ``adapter`` (same architecture, else a clear error)."""
    from diffusers import MotionAdapter

    folder = Path(folder)
    if not (folder / "config.json").exists():
        raise ValueError(f"init_from: {folder} is not a MotionAdapter folder (no config.json); accepted: a folder "
                         "written by train-toy-motion, e.g. assets/toy-motion")
    source = MotionAdapter.from_pretrained(str(folder))
    try:
        adapter.load_state_dict(source.state_dict())
    except RuntimeError as err:
        raise ValueError(f"init_from: {folder} does not match this adapter's architecture (heads, widths): {err}") from None


def clips_to_tensor(clips: np.ndarray) -> torch.Tensor:
    """uint8 (N, F, H, W, 3) -> float (N * F, 3, H, W) in [-1, 1], frames of a clip consecutive."""
    n, f = clips.shape[:2]
    return images_to_tensor(clips.reshape(n * f, *clips.shape[2:]))


def train_motion(
    out: str | os.PathLike,
    ckpt_dir: str | os.PathLike,
    config: MotionConfig,
    model_path: Optional[str | os.PathLike] = None,
    device: str = "cpu",
    progress: bool = True,
    stop_after: Optional[float] = None,
    export_partial: bool = False,
) -> dict:
    """Train the motion adapter and write it (EMA weights) to ``out`` as a diffusers `MotionAdapter` folder.

    Args:
        out: the adapter folder to write (``config.json`` + weights, ``training.json``, ``train_log.jsonl``).
        ckpt_dir: checkpoint folder; a checkpoint there is resumed (with the same settings, else an error).
        config: the training settings.
        model_path: the frozen image model (a StableDiffusionPipeline folder); defaults to the embedded one.
        device: "cpu" or "cuda".
        progress: show a progress bar.
        stop_after: checkpoint and return after this many seconds (run again to resume).
        export_partial: a run stopped early still writes its (unfinished) EMA adapter to ``out``.
    """
    from diffusers import UNetMotionModel
    from tqdm.auto import tqdm

    from . import default_model_path

    t_start = time.perf_counter()
    torch.manual_seed(config.seed)
    model_path = Path(model_path) if model_path is not None else default_model_path()
    vae, text_encoder, tokenizer, image_unet = _load_image_model(model_path)
    adapter = build_motion_adapter(image_unet, heads=config.heads)
    if config.init_from is not None:
        _load_init(adapter, config.init_from)
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path, log_path = ckpt_dir / "motion.pt", ckpt_dir / "train_log.jsonl"

    state = {"step": 0, "elapsed": 0.0, "loss": None}
    ckpt = None
    if ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        saved = MotionConfig.from_dict(ckpt["config"])
        changed = [k for k in _LOCKED if getattr(saved, k) != getattr(config, k)]
        if changed:
            pairs = ", ".join(f"{k}: {getattr(saved, k)!r} (checkpoint) vs {getattr(config, k)!r} (asked)" for k in changed)
            raise ValueError(f"{ckpt_path} was trained with other settings ({pairs}); use the same options or "
                             "another --ckpt-dir")
        adapter.load_state_dict(ckpt["adapter"])
        state = ckpt["state"]
        if progress:
            print(f"resumed from {ckpt_path}: step {state['step']}")

    model = UNetMotionModel.from_unet2d(image_unet, adapter)
    model.freeze_unet2d_params()
    model.to(device)
    vae.to(device).eval().requires_grad_(False)
    text_encoder.to(device).eval().requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    ema_adapter = build_motion_adapter(image_unet, heads=config.heads)
    _copy_motion_modules(model, ema_adapter)
    if ckpt is not None:
        opt.load_state_dict(ckpt["optimizer"])
        ema_adapter.load_state_dict(ckpt["ema"])
    ema_params = [p for m in motion_module_groups(ema_adapter) for p in m.parameters()]
    live_params = [p for m in motion_module_groups(model) for p in m.parameters()]
    ema_adapter.to(device)

    def save_checkpoint():
        _copy_motion_modules(model, adapter)  # the adapter object is free once from_unet2d copied it in
        tmp = ckpt_path.with_suffix(".tmp")
        torch.save({"config": asdict(config), "state": state, "adapter": adapter.state_dict(),
                    "ema": ema_adapter.state_dict(), "optimizer": opt.state_dict()}, tmp)
        os.replace(tmp, ckpt_path)

    sched = build_train_scheduler()
    ac = sched.alphas_cumprod.to(device)
    snr = ac / (1 - ac).clamp_min(1e-12)
    weight_t = (snr.clamp(max=config.min_snr_gamma) + 1) / (snr + 1)  # as the image model's loss
    embeddings = {}

    @torch.no_grad()
    def embed(captions):
        for c in set(captions) - embeddings.keys():
            ids = tokenizer(c, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                            return_tensors="pt").input_ids.to(device)
            embeddings[c] = text_encoder(ids).last_hidden_state[0]
        return torch.stack([embeddings[c] for c in captions])

    n, f = config.batch, config.frames
    model.train()
    bar = tqdm(total=config.steps, initial=state["step"], desc="motion", disable=not progress)
    t_last, running = time.perf_counter(), []
    for step in range(state["step"], config.steps):
        data_step = step + config.step_offset
        gen = _step_generator(config.seed, 4, data_step)
        seeds = range(_MOTION_BASE + data_step * n, _MOTION_BASE + (data_step + 1) * n)
        clips, captions = video_world.generate_clips(seeds, f)
        drop = torch.rand(n, generator=gen) < config.caption_dropout
        captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
        with torch.no_grad():
            lat = vae.encode(clips_to_tensor(clips).to(device)).latent_dist.mode() * vae.config.scaling_factor
        lat = lat.reshape(n, f, *lat.shape[1:]).permute(0, 2, 1, 3, 4)  # (N, C, F, H, W)
        noise = torch.randn(lat.shape, generator=gen).to(device)
        t = torch.randint(0, sched.config.num_train_timesteps, (n,), generator=gen).to(device)
        noisy = sched.add_noise(lat, noise, t)  # one timestep per clip, as AnimateDiff trains
        target = sched.get_velocity(lat, noise, t)
        hidden = embed(captions).repeat_interleave(f, dim=0)  # AnimateDiff feeds one prompt row per frame
        for g in opt.param_groups:
            g["lr"] = config.lr * _lr_factor(step, config.steps, config.warmup, config.min_lr_fraction)
        pred = model(noisy, t, hidden).sample
        per = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3, 4))
        loss = (per * weight_t[t]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        opt.step()
        _ema_update(ema_params, [p.detach() for p in live_params], min(config.ema_decay, (1 + step) / (10 + step)))
        running.append(loss.item())
        state["step"] = step + 1
        bar.update(1)
        last = step + 1 == config.steps
        if (step + 1) % config.log_every == 0 or last:
            now = time.perf_counter()
            state["elapsed"] += now - t_last
            t_last = now
            state["loss"] = float(np.mean(running))
            running = []
            bar.set_postfix(loss=f"{state['loss']:.4f}")
            _log(log_path, {"phase": "motion", "step": step + 1, "loss": state["loss"],
                            "lr": opt.param_groups[0]["lr"], "elapsed_s": round(state["elapsed"], 2)})
        if (step + 1) % config.checkpoint_every == 0 or last:
            save_checkpoint()
            if not last and stop_after is not None and time.perf_counter() - t_start > stop_after:
                bar.close()
                summary = {"finished": False, "step": state["step"], "steps": config.steps}
                if export_partial:
                    summary.update(export_adapter(out, ema_adapter, config, state, device, log_path, finished=False))
                return summary
    bar.close()
    return export_adapter(out, ema_adapter, config, state, device, log_path, finished=True)


def export_adapter(out, adapter, config: MotionConfig, state: dict, device, log_path: Path, finished: bool) -> dict:
    """Write the adapter (float32, safetensors), ``training.json`` and a copy of the loss log to ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    adapter.to("cpu").float().save_pretrained(str(out), safe_serialization=True)
    adapter.to(device)
    summary = {
        "finished": finished,
        "step": state["step"],
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "config": asdict(config),
        "schedule": {k: v for k, v in SCHEDULER_KWARGS.items()},
        "elapsed_s": round(state["elapsed"], 1),
        "final_loss": state["loss"],
    }
    (out / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
    if log_path.exists():
        (out / "train_log.jsonl").write_text(log_path.read_text())
    return summary
