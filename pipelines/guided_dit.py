"""DiT class-conditional generation with guidekit hooks (CFG, APG, EluCD, ...), a drop-in for the stock pipeline."""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from diffusers import DiTPipeline
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

from guidekit.hooks import SamplerHook

from .hooked import HookedPipelineMixin

#: The class id DiT reserves for "no class" (the unconditional half of classifier-free guidance).
NULL_CLASS = 1000


class GuidedDiTPipeline(HookedPipelineMixin, DiTPipeline):
    """`DiTPipeline` whose denoising loop runs guidekit hooks.

    Loads with `from_pretrained` / `from_pipe` like the stock pipeline and takes every stock argument, plus
    `hooks`. With no hook (or `guidekit.CFG()`) it gives the stock pipeline's images for the same generator.

    How the stock loop maps onto the hook points:

    * the transformer predicts ε and, for learned-sigma models (``out_channels`` = 2 × latent channels), a
      variance. Hooks see the ε part only: the guidance slot combines the class-conditional and null-class
      (id 1000) ε, and correction hooks (EluCD) see the guided ε (``SamplerState.prediction_type`` is the
      scheduler's, ``"epsilon"`` for DiT). The variance channels are dropped before the scheduler step, as
      stock drops them;
    * stock's CFG is ``uncond + w·(cond − uncond)`` on all latent channels of ε, which is exactly the
      formula of ``guidekit.CFG``, so CFG is the default guidance and reproduces stock. (The original DiT
      code guides only the first 3 of the 4 channels by default; the installed diffusers does not, nor does
      this pipeline. A hook that wants the 3-channel variant can copy channel 3 from ``pred_cond``.)
      As in stock, the null-class pass runs only when the guidance scale is > 1;
    * stock steps the scheduler on both CFG halves and keeps the first; so does this pipeline whenever the
      call runs the null-class batch, so that an ancestral scheduler (``DDPMScheduler``) draws its noise
      with the same shape from the same (global) random state as stock and gives the same images.

    Where it differs from stock, on purpose: stock neither scales the start noise by the scheduler's
    ``init_noise_sigma`` nor steps the unscaled latents (it passes the output of ``scale_model_input`` to
    ``scheduler.step``). Both are no-ops for the schedulers DiT is used with (DDIM, DDPM, DPM-Solver, PNDM,
    where ``init_noise_sigma`` is 1 and ``scale_model_input`` is the identity), so there the output equals
    stock; with sigma schedulers (Euler, LMS) stock's samples are not valid and this pipeline does what the
    other diffusers pipelines do.

    Example (APG, and EluCD steering toward the class with an ImageNet classifier; both take the short name
    "tabby" of the ImageNet label "tabby, tabby cat"):
        >>> import guidekit
        >>> from guidekit.guidance import TransformersClassifier
        >>> from guidekit.pipelines import GuidedDiTPipeline
        >>> pipe = GuidedDiTPipeline.from_pretrained("facebook/DiT-XL-2-256")
        >>> classifier = TransformersClassifier.from_pretrained("microsoft/resnet-50")
        >>> ids = pipe.get_label_ids(["tabby"])
        >>> hooks = [guidekit.APG(), guidekit.EluCD(classifier, "tabby")]
        >>> image = pipe(ids, guidance_scale=4.0, hooks=hooks).images[0]
    """

    default_guidance_scale = 4.0

    def __init__(self, transformer, vae, scheduler, id2label: Optional[dict] = None):
        super().__init__(transformer=transformer, vae=vae, scheduler=scheduler, id2label=id2label)
        if id2label is not None:
            # Kept in the config, so `save_pretrained` writes the label names and `from_pipe` carries them.
            self.register_to_config(id2label={int(k): v for k, v in id2label.items()})

    @classmethod
    def from_pipe(cls, pipeline, **kwargs):
        new = super().from_pipe(pipeline, **kwargs)
        if "id2label" not in kwargs and not new.labels and getattr(pipeline, "labels", None):
            new.labels = dict(pipeline.labels)  # a stock pipeline keeps its label names outside its config
        return new

    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self._guidance_scale > 1

    @torch.no_grad()
    def __call__(
        self,
        class_labels: Union[int, list[int]],
        guidance_scale: Optional[float] = None,
        generator: Optional[Union[torch.Generator, list[torch.Generator]]] = None,
        num_inference_steps: int = 50,
        output_type: Optional[str] = "pil",
        return_dict: bool = True,
        hooks: Optional[Sequence[SamplerHook]] = None,
    ):
        r"""Generate images; the stock arguments mean what they mean in `DiTPipeline.__call__`.

        Args:
            class_labels (`int` or `list[int]`): the class ids, one per image (`pipe.get_label_ids` maps names).
            guidance_scale (`float`, *optional*, effective default 4.0): the guidance scale w. `None` takes the
                guidance hook's scale, else 4.0 (the stock default). At w <= 1 no null-class pass runs.
            hooks (`SamplerHook` or `list[SamplerHook]`, *optional*): guidekit hooks for this call, e.g.
                `[guidekit.APG()]` or `[guidekit.EluCD(classifier, "tabby")]`. At most one guidance hook (CFG
                when none); the others run in the order given. `None` uses the hooks given to `guidekit.attach`.
        """
        chain, state = self.start_hooks(hooks, guidance_scale, 0.0, generator)
        self._guidance_scale = state.guidance_scale
        if isinstance(class_labels, int):
            class_labels = [class_labels]

        # 1. Start latents, labels; with guidance the transformer batch is [classes, null class]
        batch_size = len(class_labels)
        latent_size = self.transformer.config.sample_size
        latent_channels = self.transformer.config.in_channels
        device = self._execution_device
        latents = randn_tensor(
            shape=(batch_size, latent_channels, latent_size, latent_size),
            generator=generator,
            device=device,
            dtype=self.transformer.dtype,
        )
        latents = latents * self.scheduler.init_noise_sigma
        self._uncond_encoded = self.do_classifier_free_guidance
        class_labels = torch.tensor(class_labels, device=device).reshape(-1)
        class_null = torch.tensor([NULL_CLASS] * batch_size, device=device)
        learned_sigma = self.transformer.config.out_channels // 2 == latent_channels
        extra = {}  # the transformer's channels after ε, for the conditional batch

        def denoise(model_input: torch.Tensor, t: torch.Tensor, with_uncond: bool) -> torch.Tensor:
            labels = torch.cat([class_labels, class_null], 0) if with_uncond else class_labels
            if torch.is_tensor(t):
                timesteps = t.reshape(-1)[:1].to(model_input.device)
            else:
                dtype = torch.float64 if isinstance(t, float) else torch.int64
                timesteps = torch.tensor([t], dtype=dtype, device=model_input.device)
            timesteps = timesteps.expand(model_input.shape[0])
            out = self.transformer(model_input, timestep=timesteps, class_labels=labels).sample
            eps, extra["rest"] = out[:, :latent_channels], out[:batch_size, latent_channels:]
            if with_uncond:
                cond_eps, uncond_eps = eps.chunk(2)
                eps = torch.cat([uncond_eps, cond_eps])  # the order `guided_prediction` expects
            return eps

        # 2. Timesteps
        self.scheduler.set_timesteps(num_inference_steps)
        timesteps = self.scheduler.timesteps
        state.num_steps = len(timesteps)

        # 3. Denoising loop, with the hooks at their points
        chain.validate(state)
        chain.begin(state)
        try:
            latents = chain.init_latents(state, latents)
            for i, t in enumerate(self.progress_bar(timesteps)):
                noise_pred = self.guided_prediction(chain, state, i, t, latents, denoise)
                if not learned_sigma and extra["rest"].shape[1] > 0:
                    noise_pred = torch.cat([noise_pred, extra["rest"]], dim=1)  # stock passes these on
                if self._uncond_encoded:
                    # Stock steps both CFG halves and keeps the first: the same noise draws for ancestral schedulers.
                    both = self.scheduler.step(torch.cat([noise_pred] * 2), t, torch.cat([latents] * 2)).prev_sample
                    latents = both[:batch_size]
                else:
                    latents = self.scheduler.step(noise_pred, t, latents).prev_sample
                state.latents = latents
                chain.step_end(state)
        finally:
            chain.end(state)

        # 4. Decode, as stock
        latents = 1 / self.vae.config.scaling_factor * latents
        samples = self.vae.decode(latents).sample
        samples = (samples / 2 + 0.5).clamp(0, 1)
        if output_type != "pt":
            samples = samples.cpu().permute(0, 2, 3, 1).float().numpy()
            if output_type == "pil":
                samples = self.numpy_to_pil(samples)
        self.maybe_free_model_hooks()

        if not return_dict:
            return (samples,)
        return ImagePipelineOutput(images=samples)
