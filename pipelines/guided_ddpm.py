"""Unconditional pixel-space generation (`UNet2DModel`) with guidekit hooks (EluCD, ...), a drop-in for the stock
`DDPMPipeline`."""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from diffusers import DDPMPipeline
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

from guidekit.guidance.cfg import CFG
from guidekit.hooks import HookChain, SamplerHook

from .hooked import HookedPipelineMixin


class GuidedDDPMPipeline(HookedPipelineMixin, DDPMPipeline):
    """`DDPMPipeline` whose denoising loop runs guidekit hooks: unconditional pixel models, EluCD's own setting.

    Loads with `from_pretrained` / `from_pipe` like the stock pipeline (a `UNet2DModel` and a `DDPMScheduler` or
    `DDIMScheduler`) and takes every stock argument, plus `hooks`. With no hook it gives the stock pipeline's
    images for the same generator, with either scheduler.

    How the stock loop maps onto the hook points:

    * the model is unconditional: each step has one prediction, no conditional/unconditional pair. The guidance
      slot sees ``pred_cond`` only (``pred_uncond`` is always `None`), so ``guidekit.CFG()`` is a pass-through
      here; a guidance hook that needs the pair (``guidekit.APG()``) is refused with an error;
    * correction hooks (``guidekit.EluCD``) see the model's prediction (``SamplerState.prediction_type`` is the
      scheduler's). There is no VAE: EluCD classifies x̂0 clipped to [-1, 1] directly, and with
      ``DDPMScheduler`` its x̂0 correction moves the step's mean by EluCD's u = (Σ_t + a_t)·s·g (exactly when
      the scheduler's ``clip_sample`` is off; with it on, the scheduler clips the corrected x̂0 too);
    * the scheduler step is stock's, ``scheduler.step(pred, t, image, generator=generator)``: ``DDPMScheduler``
      draws its noise from the call's generator, ``DDIMScheduler`` takes the generator for ``eta > 0`` only
      (``eta`` is 0 in stock's call).

    Where it differs from stock, for schedulers stock does not support: the start noise is scaled by the
    scheduler's ``init_noise_sigma`` and the model sees ``scale_model_input``'s output. Both are no-ops for
    DDPM and DDIM (``init_noise_sigma`` is 1, ``scale_model_input`` the identity).

    Example:
        >>> import guidekit
        >>> from guidekit.pipelines import GuidedDDPMPipeline
        >>> pipe = GuidedDDPMPipeline.from_pretrained("google/ddpm-cat-256")
        >>> image = pipe(num_inference_steps=100, hooks=[guidekit.EluCD(classifier, "tabby, tabby cat")]).images[0]
    """

    default_guidance_scale = 1.0
    _uncond_encoded = False

    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        return False  # unconditional: there is no conditional/unconditional pair to mix

    @classmethod
    def check_hooks(cls, chain: HookChain) -> None:
        """Refuse a guidance hook other than CFG: it would need an unconditional prediction this model lacks."""
        if not isinstance(chain.guidance, CFG):
            raise ValueError(
                f"hooks: {chain.guidance!r} fills the guidance slot, which mixes a conditional and an unconditional "
                f"prediction; {cls.__name__} is unconditional (one prediction per step), so there is nothing to mix; "
                "accepted: no guidance hook (or guidekit.CFG(), a pass-through here) plus correction hooks such as "
                "guidekit.EluCD"
            )

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        generator: Optional[Union[torch.Generator, list[torch.Generator]]] = None,
        num_inference_steps: int = 1000,
        output_type: Optional[str] = "pil",
        return_dict: bool = True,
        hooks: Optional[Sequence[SamplerHook]] = None,
    ):
        r"""Generate images; the stock arguments mean what they mean in `DDPMPipeline.__call__`.

        Args:
            batch_size (`int`, defaults to 1): the number of images.
            hooks (`SamplerHook` or `list[SamplerHook]`, *optional*): guidekit hooks for this call, e.g.
                `[guidekit.EluCD(classifier, "tabby, tabby cat")]`. No guidance hook other than `guidekit.CFG()`
                (a pass-through: the model is unconditional). `None` uses the hooks given to `guidekit.attach`.
        """
        chain, state = self.start_hooks(hooks, None, 0.0, generator)
        self.check_hooks(chain)
        self._guidance_scale = state.guidance_scale

        # 1. Start noise, as stock
        sample_size = self.unet.config.sample_size
        if isinstance(sample_size, int):
            image_shape = (batch_size, self.unet.config.in_channels, sample_size, sample_size)
        else:
            image_shape = (batch_size, self.unet.config.in_channels, *sample_size)
        device = self._execution_device
        if device.type == "mps":  # randn is not reproducible on mps
            image = randn_tensor(image_shape, generator=generator, dtype=self.unet.dtype).to(device)
        else:
            image = randn_tensor(image_shape, generator=generator, device=device, dtype=self.unet.dtype)
        image = image * self.scheduler.init_noise_sigma

        def denoise(model_input: torch.Tensor, t: torch.Tensor, with_uncond: bool) -> torch.Tensor:
            return self.unet(model_input, t).sample

        # 2. Timesteps
        self.scheduler.set_timesteps(num_inference_steps)
        timesteps = self.scheduler.timesteps
        state.num_steps = len(timesteps)

        # 3. Denoising loop, with the hooks at their points
        chain.validate(state)
        chain.begin(state)
        try:
            image = chain.init_latents(state, image)
            for i, t in enumerate(self.progress_bar(timesteps)):
                model_output = self.guided_prediction(chain, state, i, t, image, denoise)
                image = self.scheduler.step(model_output, t, image, generator=generator).prev_sample
                state.latents = image
                chain.step_end(state)
        finally:
            chain.end(state)

        # 4. To images, as stock
        image = (image / 2 + 0.5).clamp(0, 1)
        if output_type != "pt":
            image = image.cpu().permute(0, 2, 3, 1).numpy()
            if output_type == "pil":
                image = self.numpy_to_pil(image)
        self.maybe_free_model_hooks()

        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)
