"""Training of the embedded toy model: VAE first, then UNet and text encoder jointly on frozen-VAE latents.

Seeded and resumable: the data of every step is a pure function of (phase, step) — image ``i`` of step
``k`` is ``world.generate(base + k * batch + i)`` — and the noise of every step comes from a generator
seeded with (seed, phase, step), so a run resumed from a checkpoint continues exactly where it stopped.
Seeds below :data:`HELD_OUT_LIMIT` are never used for training; evaluations draw from there.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from . import world
from .model import (
    build_scheduler,
    build_text_encoder,
    build_tokenizer,
    build_train_scheduler,
    build_unet,
    build_unet_v2,
    build_vae,
)

__all__ = ["TrainConfig", "train", "HELD_OUT_LIMIT", "vae_psnr", "images_to_tensor"]

HELD_OUT_LIMIT = 10**6
_VAE_BASE = 10**7
_UNET_BASE = 2 * 10**7
_DECODER_BASE = 3 * 10**7


@dataclass
class TrainConfig:
    seed: int = 0
    # VAE phase
    vae_steps: int = 2500
    vae_batch: int = 8
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-6
    # UNet + text-encoder phase
    unet_arch: str = "v2"  # "v2": attention at 16x16 too (build_unet_v2); "v1": the first shipped model's UNet
    unet_steps: int = 4500
    batch: int = 32
    lr: float = 5e-4
    warmup: int = 100
    min_lr_fraction: float = 0.1
    caption_dropout: float = 0.1
    min_snr_gamma: float = 5.0
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    # decoder fine-tuning (encoder frozen, so the UNet's latents do not change)
    decoder_steps: int = 1500
    decoder_lr: float = 3e-4
    # bookkeeping
    checkpoint_every: int = 250
    log_every: int = 25
    psnr_images: int = 256  # held-out images for the VAE's PSNR after its phase
    scale_images: int = 1024  # training images that set the latent scaling factor

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


# The settings each phase reads. A checkpoint resumes with other values only for phases it has not begun
# (e.g. UNet variants from one trained VAE); bookkeeping (checkpoint_every, log_every) may always change.
_PHASE_SETTINGS = {
    "vae": ("seed", "vae_steps", "vae_batch", "vae_lr", "vae_kl_weight", "grad_clip", "psnr_images",
            "scale_images", "unet_arch"),  # the UNet is built (and checkpointed) from the start
    "unet": ("unet_steps", "batch", "lr", "warmup", "min_lr_fraction", "caption_dropout", "min_snr_gamma",
             "ema_decay"),
    "decoder": ("decoder_steps", "decoder_lr"),
}
_PHASES = ("vae", "unet", "decoder", "done")


def locked_settings(state: dict) -> set[str]:
    """Settings a checkpoint in ``state`` can no longer change: those of every phase it has begun."""
    current = _PHASES.index(state["phase"])
    begun = [ph for i, ph in enumerate(_PHASES[:3]) if i < current or (i == current and state["step"] > 0)]
    # the VAE's settings are always locked: its phase starts the checkpoint (and seeds every later one)
    return set().union(*(_PHASE_SETTINGS[ph] for ph in {"vae", *begun}))


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


class _Batches(torch.utils.data.IterableDataset):
    """Batches for steps [start, stop) of one phase; with workers, worker w makes steps w, w + n, ...

    DataLoader reads workers round-robin, so batches arrive in step order whatever the worker count.
    """

    def __init__(self, base: int, batch: int, start: int, stop: int):
        self.base, self.batch, self.start, self.stop = base, batch, start, stop

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid, n = (info.id, info.num_workers) if info else (0, 1)
        for step in range(self.start + wid, self.stop, n):
            seeds = range(self.base + step * self.batch, self.base + (step + 1) * self.batch)
            images, captions, _ = world.generate_batch(seeds)
            yield step, images_to_tensor(images), captions


def _loader(base, batch, start, stop, workers):
    ds = _Batches(base, batch, start, stop)
    return torch.utils.data.DataLoader(
        ds, batch_size=None, num_workers=workers, persistent_workers=False, prefetch_factor=4 if workers else None
    )


def _lr_factor(step: int, total: int, warmup: int, min_fraction: float) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_fraction + (1 - min_fraction) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def _step_generator(seed: int, phase: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + phase * 100_000_007 + step)


@torch.no_grad()
def vae_psnr(vae, n: int = 256, seed_offset: int = 0, device="cpu", batch: int = 64) -> float:
    """Mean PSNR (dB, on 8-bit images) of VAE reconstructions of held-out generated images."""
    vae.eval()
    psnrs = []
    for lo in range(0, n, batch):
        seeds = range(seed_offset + lo, seed_offset + min(n, lo + batch))
        images, _, _ = world.generate_batch(seeds)
        x = images_to_tensor(images).to(device)
        rec = vae.decode(vae.encode(x).latent_dist.mode()).sample
        rec = ((rec.float().clamp(-1, 1) + 1) * 127.5).round().cpu().numpy().transpose(0, 2, 3, 1)
        mse = ((rec - images.astype(np.float64)) ** 2).reshape(len(images), -1).mean(1)
        psnrs.extend(10 * np.log10(255.0**2 / np.maximum(mse, 1e-10)))
    return float(np.mean(psnrs))


def _log(log_path: Path, record: dict):
    record["process_cpu_s"] = round(time.process_time(), 2)  # this process's CPU time (not its workers')
    with open(log_path, "a") as fh:
        fh.write(json.dumps(record) + "\n")


def _ema_update(ema_params, params, decay):
    with torch.no_grad():
        torch._foreach_lerp_(ema_params, params, 1.0 - decay)


def train(
    out: str | os.PathLike,
    ckpt_dir: str | os.PathLike,
    config: Optional[TrainConfig] = None,
    device: str = "cpu",
    workers: int = 0,
    progress: bool = True,
    stop_after: Optional[float] = None,
    export_partial: bool = False,
    stop_before: Optional[str] = None,
) -> dict:
    """Train (or resume) and write the pipeline folder to ``out``; returns the training summary.

    ``stop_after`` (seconds) checkpoints and returns early, for sessions that cannot finish in one go;
    with ``export_partial`` a run stopped in the UNet or decoder phase still writes its EMA weights (and the decoder
    as it stands) to ``out``, marked unfinished in training.json. Checkpoints are stop points, and so is the end of
    each phase. ``stop_before`` ("unet" or "decoder") checkpoints and returns when the run reaches that phase,
    e.g. to start several UNet variants from one trained VAE.
    """
    from tqdm.auto import tqdm

    config = config or TrainConfig()
    if stop_before not in (None, "unet", "decoder"):
        raise ValueError(f"stop_before: got {stop_before!r}; accepted: None, 'unet', 'decoder'")
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = ckpt_dir / "checkpoint.pt"
    log_path = ckpt_dir / "train_log.jsonl"
    torch.manual_seed(config.seed)

    tokenizer = build_tokenizer()
    vae = build_vae().to(device)
    text_encoder = build_text_encoder(tokenizer).to(device)
    if config.unet_arch not in ("v1", "v2"):
        raise ValueError(f"unet_arch: got {config.unet_arch!r}; accepted: 'v1', 'v2'")
    unet = (build_unet_v2() if config.unet_arch == "v2" else build_unet()).to(device)
    if device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True
    state = {"phase": "vae", "step": 0, "elapsed": {"vae": 0.0, "unet": 0.0}, "losses": {}, "metrics": {}}
    vae_opt = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr, weight_decay=0.0)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=1e-2)
    ema = [p.detach().clone() for p in params]
    dec_params = list(vae.decoder.parameters()) + (
        list(vae.post_quant_conv.parameters()) if getattr(vae, "post_quant_conv", None) is not None else []
    )
    dec_opt = torch.optim.AdamW(dec_params, lr=config.decoder_lr, weight_decay=0.0)

    if ckpt_path.exists():
        ck = torch.load(ckpt_path, map_location=device, weights_only=False)
        saved = TrainConfig.from_dict(ck["config"])
        locked = locked_settings(ck["state"])
        diff = {k: (v, getattr(config, k)) for k, v in asdict(saved).items() if getattr(config, k) != v}
        refused = {k: v for k, v in diff.items() if k in locked}
        if refused:
            raise ValueError(f"config: the checkpoint in {ckpt_dir} was made with other settings {refused} "
                             "(checkpoint's, asked), used by phases it has begun; use the same options or "
                             "another --ckpt-dir")
        if diff:
            _log(log_path, {"phase": ck["state"]["phase"], "step": ck["state"]["step"],
                            "resumed_with_changed_settings": {k: {"was": a, "now": b} for k, (a, b) in diff.items()}})
        vae.load_state_dict(ck["vae"])
        unet.load_state_dict(ck["unet"])
        text_encoder.load_state_dict(ck["text_encoder"])
        vae_opt.load_state_dict(ck["vae_opt"])
        opt.load_state_dict(ck["opt"])
        if "dec_opt" in ck:
            dec_opt.load_state_dict(ck["dec_opt"])
        for e, v in zip(ema, ck["ema"]):
            e.copy_(v)
        state = ck["state"]
        if "scaling_factor" in state:
            vae.register_to_config(scaling_factor=state["scaling_factor"])
        print(f"resumed from {ckpt_path}: phase {state['phase']}, step {state['step']}")

    def save_checkpoint():
        tmp = ckpt_path.with_suffix(".tmp")
        torch.save(
            {
                "config": asdict(config),
                "vae": vae.state_dict(),
                "unet": unet.state_dict(),
                "text_encoder": text_encoder.state_dict(),
                "vae_opt": vae_opt.state_dict(),
                "opt": opt.state_dict(),
                "dec_opt": dec_opt.state_dict(),
                "ema": ema,
                "state": state,
            },
            tmp,
        )
        os.replace(tmp, ckpt_path)

    t_session = time.perf_counter()

    def out_of_time():
        if stop_before is not None and state["phase"] == stop_before and state["step"] == 0:
            return True
        return stop_after is not None and time.perf_counter() - t_session > stop_after

    def stopped_early():
        """Return an unfinished summary; with ``export_partial`` past the VAE phase, also write the EMA weights
        (and the decoder as it stands) to ``out``, marked unfinished in training.json."""
        if not export_partial or state["phase"] == "vae":
            return {"finished": False, **state}
        with torch.no_grad():
            for p, e in zip(params, ema):
                p.copy_(e)
        summary = export_pipeline(out, vae, text_encoder, tokenizer, unet, config, state, device)
        summary["finished"] = False
        (Path(out) / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary

    # ---------------- phase 1: VAE ----------------
    if state["phase"] == "vae":
        vae.train()
        start = state["step"]
        bar = tqdm(total=config.vae_steps, initial=start, desc="vae", disable=not progress)
        t0 = time.perf_counter()
        t_last = t0
        running = []
        for step, x, _ in _loader(_VAE_BASE, config.vae_batch, start, config.vae_steps, workers):
            x = x.to(device, non_blocking=True)
            for g in vae_opt.param_groups:
                g["lr"] = config.vae_lr * _lr_factor(step, config.vae_steps, 50, 0.05)
            post = vae.encode(x).latent_dist
            z = post.sample(generator=_step_generator(config.seed, 1, step))
            rec = vae.decode(z).sample
            mse = F.mse_loss(rec, x)
            kl = post.kl().mean() / x[0].numel()
            loss = mse + 0.1 * F.l1_loss(rec, x) + config.vae_kl_weight * kl
            vae_opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vae.parameters(), config.grad_clip)
            vae_opt.step()
            running.append(mse.item())
            state["step"] = step + 1
            bar.update(1)
            if (step + 1) % config.log_every == 0 or step + 1 == config.vae_steps:
                now = time.perf_counter()
                state["elapsed"]["vae"] += now - t_last
                t_last = now
                rec_mse = float(np.mean(running))
                running = []
                state["losses"]["vae_mse"] = rec_mse
                bar.set_postfix(mse=f"{rec_mse:.5f}")
                _log(log_path, {"phase": "vae", "step": step + 1, "mse": rec_mse, "kl": kl.item(),
                                "elapsed_s": round(state["elapsed"]["vae"], 2)})
            if (step + 1) % config.checkpoint_every == 0 or step + 1 == config.vae_steps:
                if (step + 1) % config.log_every:
                    now = time.perf_counter()
                    state["elapsed"]["vae"] += now - t_last
                    t_last = now
                save_checkpoint()
                if out_of_time() and step + 1 < config.vae_steps:
                    bar.close()
                    return {"finished": False, **state}
        bar.close()
        vae.eval()
        psnr = vae_psnr(vae, n=config.psnr_images, device=device)
        # latent scale: unit variance of the training latents
        with torch.no_grad():
            n = config.scale_images
            images, _, _ = world.generate_batch(range(_UNET_BASE - n, _UNET_BASE))
            lat = torch.cat([vae.encode(images_to_tensor(images[i:i + 128]).to(device)).latent_dist.mode()
                             for i in range(0, n, 128)])
            scale = float(1.0 / lat.float().std())
        vae.register_to_config(scaling_factor=scale)
        state.update(phase="unet", step=0, scaling_factor=scale)
        state["metrics"][f"vae_psnr_heldout_{config.psnr_images}"] = psnr
        _log(log_path, {"phase": "vae", "done": True, "psnr": psnr, "scaling_factor": scale})
        print(f"VAE: held-out PSNR {psnr:.2f} dB, latent scaling factor {scale:.4f}")
        save_checkpoint()
        if out_of_time():  # a phase boundary is a stop point too (UNet variants can start from here)
            return {"finished": False, **state}

    # ---------------- phase 2: UNet + text encoder ----------------
    if state["phase"] == "unet":
        vae.eval().requires_grad_(False)
        unet.train()
        text_encoder.train()
        sched = build_train_scheduler()
        ac = sched.alphas_cumprod.to(device)
        snr = ac / (1 - ac).clamp_min(1e-12)
        # min-SNR-gamma on the v-loss's natural (SNR + 1) weighting: x0-loss weight min(SNR, g) + 1,
        # so the zero-SNR end (which decides the global colours) keeps weight 1 instead of 0.
        weight_t = (snr.clamp(max=config.min_snr_gamma) + 1) / (snr + 1)
        caption_ids = {}

        def ids_for(captions):
            out = []
            for c in captions:
                if c not in caption_ids:
                    caption_ids[c] = tokenizer(c, padding="max_length", max_length=tokenizer.model_max_length,
                                               truncation=True, return_tensors="pt").input_ids[0]
                out.append(caption_ids[c])
            return torch.stack(out)

        start = state["step"]
        bar = tqdm(total=config.unet_steps, initial=start, desc="unet", disable=not progress)
        t_last = time.perf_counter()
        running = []
        for step, x, captions in _loader(_UNET_BASE, config.batch, start, config.unet_steps, workers):
            gen = _step_generator(config.seed, 2, step)
            b = x.shape[0]
            drop = torch.rand(b, generator=gen) < config.caption_dropout
            captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
            noise = torch.randn(b, 4, 16, 16, generator=gen).to(device)
            t = torch.randint(0, sched.config.num_train_timesteps, (b,), generator=gen).to(device)
            ids = ids_for(captions).to(device)
            with torch.no_grad():
                lat = vae.encode(x.to(device)).latent_dist.mode() * vae.config.scaling_factor
            noisy = sched.add_noise(lat, noise, t)
            target = sched.get_velocity(lat, noise, t)
            for g in opt.param_groups:
                g["lr"] = config.lr * _lr_factor(step, config.unet_steps, config.warmup, config.min_lr_fraction)
            hidden = text_encoder(ids).last_hidden_state
            pred = unet(noisy, t, hidden).sample
            per = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
            loss = (per * weight_t[t]).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            opt.step()
            decay = min(config.ema_decay, (1 + step) / (10 + step))
            _ema_update(ema, [p.detach() for p in params], decay)
            running.append(loss.item())
            state["step"] = step + 1
            bar.update(1)
            if (step + 1) % config.log_every == 0 or step + 1 == config.unet_steps:
                now = time.perf_counter()
                state["elapsed"]["unet"] += now - t_last
                t_last = now
                mean_loss = float(np.mean(running))
                running = []
                state["losses"]["unet"] = mean_loss
                bar.set_postfix(loss=f"{mean_loss:.4f}")
                _log(log_path, {"phase": "unet", "step": step + 1, "loss": mean_loss, "lr": opt.param_groups[0]["lr"],
                                "elapsed_s": round(state["elapsed"]["unet"], 2)})
            if (step + 1) % config.checkpoint_every == 0 or step + 1 == config.unet_steps:
                if (step + 1) % config.log_every:
                    now = time.perf_counter()
                    state["elapsed"]["unet"] += now - t_last
                    t_last = now
                save_checkpoint()
                if out_of_time() and step + 1 < config.unet_steps:
                    bar.close()
                    return stopped_early()
        bar.close()
        state.update(phase="decoder" if config.decoder_steps > 0 else "done", step=0)
        save_checkpoint()
        if out_of_time() and config.decoder_steps > 0:
            return stopped_early()

    # ---------------- phase 3: decoder fine-tuning ----------------
    if state["phase"] == "decoder":
        vae.requires_grad_(False)
        for p in dec_params:
            p.requires_grad_(True)
        vae.train()
        start = state["step"]
        bar = tqdm(total=config.decoder_steps, initial=start, desc="decoder", disable=not progress)
        t_last = time.perf_counter()
        state["elapsed"].setdefault("decoder", 0.0)
        running = []
        for step, x, _ in _loader(_DECODER_BASE, config.vae_batch, start, config.decoder_steps, workers):
            x = x.to(device, non_blocking=True)
            for g in dec_opt.param_groups:
                g["lr"] = config.decoder_lr * _lr_factor(step, config.decoder_steps, 50, 0.05)
            with torch.no_grad():
                z = vae.encode(x).latent_dist.mode()
            rec = vae.decode(z).sample
            mse = F.mse_loss(rec, x)
            loss = mse + 0.1 * F.l1_loss(rec, x)
            dec_opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(dec_params, config.grad_clip)
            dec_opt.step()
            running.append(mse.item())
            state["step"] = step + 1
            bar.update(1)
            last = step + 1 == config.decoder_steps
            if (step + 1) % config.log_every == 0 or last or (step + 1) % config.checkpoint_every == 0:
                now = time.perf_counter()
                state["elapsed"]["decoder"] += now - t_last
                t_last = now
            if (step + 1) % config.log_every == 0 or last:
                rec_mse = float(np.mean(running))
                running = []
                state["losses"]["decoder_mse"] = rec_mse
                bar.set_postfix(mse=f"{rec_mse:.5f}")
                _log(log_path, {"phase": "decoder", "step": step + 1, "mse": rec_mse,
                                "elapsed_s": round(state["elapsed"]["decoder"], 2)})
            if (step + 1) % config.checkpoint_every == 0 or last:
                save_checkpoint()
                if out_of_time() and not last:
                    bar.close()
                    return stopped_early()
        bar.close()
        vae.eval().requires_grad_(False)
        psnr = vae_psnr(vae, n=config.psnr_images, device=device)
        state["metrics"][f"vae_psnr_heldout_{config.psnr_images}_after_decoder"] = psnr
        _log(log_path, {"phase": "decoder", "done": True, "psnr": psnr})
        print(f"decoder fine-tuning: held-out PSNR {psnr:.2f} dB")
        state.update(phase="done", step=0)
        save_checkpoint()

    # ---------------- export ----------------
    with torch.no_grad():
        for p, e in zip(params, ema):
            p.copy_(e)
    summary = export_pipeline(out, vae, text_encoder, tokenizer, unet, config, state, device)
    return summary


def export_pipeline(out, vae, text_encoder, tokenizer, unet, config, state, device) -> dict:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=vae.to("cpu").float().eval(),
        text_encoder=text_encoder.to("cpu").float().eval(),
        tokenizer=tokenizer,
        unet=unet.to("cpu").float().eval(),
        scheduler=build_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(str(out), safe_serialization=True)
    summary = {
        "finished": state.get("phase") == "done",
        "stopped_at_step": {"phase": state.get("phase"), "step": state.get("step")},
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "config": asdict(config),
        "vae_steps": config.vae_steps,
        "unet_steps": config.unet_steps,
        "decoder_steps": config.decoder_steps,
        "elapsed_s": {k: round(v, 1) for k, v in state["elapsed"].items()},
        "final_losses": state["losses"],
        "metrics": state["metrics"],
        "scaling_factor": state.get("scaling_factor"),
    }
    (out / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
