"""PixArt-Sigma's sampling loop in stages, each with a small interface that editing and adapters plug into.

`Engine._generate` runs them in this order:

- conditioning: the prompts' (and under guidance the negative prompt's) T5 embeddings and masks, one
  row per image (`Engine.encode_prompts`, then `batch_conditioning` makes the `Conditioning`);
- start: the latents to start from and the timesteps to run (a `StartStage`: `noise_start` for text to
  image; `given_start` and `noised_start` for latents an editing feature brings, e.g. an encoded image);
- denoise: `denoise` steps through the timesteps with a `GuidedDenoiser` (CFG and the learned-sigma
  split live there; an adapter wraps the transformer it calls), running `StepHook`s after each step
  (inpainting will blend the known region back there), reporting progress and honouring cancel;
- finish: decode and fit to the requested size (`Engine.finish`).

Randomness: each image has one CPU generator seeded with its seed. The start draws from it first, a
stochastic sampler's steps after, in the order diffusers draws them; anything else that needs noise
must bring generators of its own, so that text to image keeps drawing exactly what it draws today.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Protocol, Sequence

import torch

from .errors import Cancelled

ProgressCallback = Callable[[int, int], None]
# After step `index` (0-based) at `timestep`: new latents to go on from, or None to keep `latents`.
StepHook = Callable[[int, torch.Tensor, torch.Tensor], Optional[torch.Tensor]]
# A diffusers scheduler with its timesteps set (schedulers share no base class worth naming here).
Scheduler = Any


class CancelFlag(Protocol):
    def is_set(self) -> bool: ...


def uses_guidance(guidance_scale: float) -> bool:
    """PixArt's rule, as diffusers': a scale of 1 or less runs no unconditional pass at all."""
    return guidance_scale > 1.0


# -- conditioning -------------------------------------------------------------------------------
@dataclass
class Conditioning:
    """The text the denoiser reads, one row per image of the batch."""

    embeds: torch.Tensor  # (images, tokens, channels), in the denoiser's dtype
    mask: torch.Tensor  # (images, tokens)
    negative_embeds: Optional[torch.Tensor] = None  # the negative prompt's rows; None when guidance is off
    negative_mask: Optional[torch.Tensor] = None

    @property
    def guided(self) -> bool:
        return self.negative_embeds is not None


def batch_conditioning(texts: Sequence[Any], images_per_text: Sequence[int], negative: Optional[Any],
                       dtype: torch.dtype) -> Conditioning:
    """Each text's embeddings repeated for its images (texts: `engine.Encoded`), the negative's for every image.

    The embeddings come in the text encoder's dtype (bfloat16 on a CPU even for a float32 model): cast once here.
    """
    embeds = torch.cat([text.embeds.repeat(count, 1, 1) for text, count in zip(texts, images_per_text)])
    mask = torch.cat([text.mask.repeat(count, 1) for text, count in zip(texts, images_per_text)])
    if negative is None:
        return Conditioning(embeds.to(dtype), mask)
    images = sum(images_per_text)
    return Conditioning(embeds.to(dtype), mask, negative.embeds.to(dtype).repeat(images, 1, 1),
                        negative.mask.repeat(images, 1))


# -- start --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LatentLayout:
    """What the start latents must be: (images, channels, height, width) in latent pixels, dtype, device."""

    shape: tuple[int, int, int, int]
    dtype: torch.dtype
    device: torch.device


@dataclass
class Start:
    """Where denoising begins: latents at the noise level of `timesteps[0]`, and the timesteps still to run."""

    latents: torch.Tensor
    timesteps: torch.Tensor


class StartStage(Protocol):
    def __call__(self, scheduler: Scheduler, layout: LatentLayout, generators: list[torch.Generator]) -> Start:
        """`generators`: one per image, drawn from by the start first (see the module's docstring)."""
        ...


def image_noise(layout: LatentLayout, generators: list[torch.Generator]) -> torch.Tensor:
    """Standard normal noise, image k from generators[k] alone (on the CPU, then moved): the same on any device."""
    from diffusers.utils.torch_utils import randn_tensor

    return randn_tensor(layout.shape, generator=generators, device=layout.device, dtype=layout.dtype)


def noise_start(scheduler: Scheduler, layout: LatentLayout, generators: list[torch.Generator]) -> Start:
    """Text to image: pure noise scaled to the scheduler's first noise level, and every timestep."""
    return Start(image_noise(layout, generators) * scheduler.init_noise_sigma, scheduler.timesteps)


def kept_timesteps(scheduler: Scheduler, skip_steps: int) -> torch.Tensor:
    """The scheduler's timesteps after its first `skip_steps` steps; the scheduler is told where it begins
    (multistep solvers index their own state by step, not by timestep)."""
    steps = len(scheduler.timesteps) // scheduler.order
    if not 0 <= skip_steps < steps:
        raise ValueError(f"skip_steps={skip_steps} must leave at least one of the {steps} steps to run")
    first = skip_steps * scheduler.order
    if hasattr(scheduler, "set_begin_index"):  # DDIM has none: it reads everything from the timestep
        scheduler.set_begin_index(first)
    return scheduler.timesteps[first:]


def given_start(latents: torch.Tensor, skip_steps: int = 0) -> StartStage:
    """Start from `latents` already at the noise level of the first timestep kept, skipping `skip_steps` steps."""

    def start(scheduler: Scheduler, layout: LatentLayout, generators: list[torch.Generator]) -> Start:
        return Start(latents.to(layout.device, layout.dtype), kept_timesteps(scheduler, skip_steps))

    return start


def noised_start(clean_latents: torch.Tensor, skip_steps: int) -> StartStage:
    """Image to image: clean latents (`Engine.encode_pixels`) noised to the first timestep kept, each image
    with noise from its own generator; the more steps skipped, the more of the image is kept."""

    def start(scheduler: Scheduler, layout: LatentLayout, generators: list[torch.Generator]) -> Start:
        timesteps = kept_timesteps(scheduler, skip_steps)
        clean = clean_latents.to(layout.device, layout.dtype)
        return Start(scheduler.add_noise(clean, image_noise(layout, generators), timesteps[:1]), timesteps)

    return start


def check_start(start: Start, layout: LatentLayout) -> None:
    """A start stage's latents must fit the batch the conditioning and the size were made for."""
    if tuple(start.latents.shape) != layout.shape:
        raise ValueError(f"the start latents have shape {tuple(start.latents.shape)}; this batch needs {layout.shape}")
    if len(start.timesteps) == 0:
        raise ValueError("the start left no timestep to run")


# -- denoise ------------------------------------------------------------------------------------
class GuidedDenoiser:
    """Latents as the scheduler scaled them for `timestep` -> the noise prediction to step with.

    Runs the transformer once on the batch, or under classifier-free guidance once on the negative
    rows and the prompt rows together (negative first, as diffusers) and mixes them by the scale. A
    transformer that learned its variance returns it as extra channels: only the noise is kept.
    `transformer`: the module, its compiled wrapper, or anything called the same way (an adapter).
    """

    def __init__(self, transformer: Callable[..., Any], conditioning: Conditioning, guidance_scale: float,
                 learned_sigma: bool):
        self.transformer, self.guidance_scale, self.learned_sigma = transformer, guidance_scale, learned_sigma
        self.guided = conditioning.guided
        if self.guided:
            self.embeds = torch.cat([conditioning.negative_embeds, conditioning.embeds])
            self.mask = torch.cat([conditioning.negative_mask, conditioning.mask])
        else:
            self.embeds, self.mask = conditioning.embeds, conditioning.mask

    def __call__(self, latents: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        model_input = torch.cat([latents] * 2) if self.guided else latents
        noise = self.transformer(
            model_input,
            encoder_hidden_states=self.embeds,
            encoder_attention_mask=self.mask,
            timestep=timestep[None].to(model_input.device).expand(model_input.shape[0]),
            added_cond_kwargs={"resolution": None, "aspect_ratio": None},  # PixArt-Sigma has no size conditioning
            return_dict=False,
        )[0]
        if self.guided:
            uncond, cond = noise.chunk(2)
            noise = uncond + self.guidance_scale * (cond - uncond)
        if self.learned_sigma:
            noise = noise.chunk(2, dim=1)[0]
        return noise


def denoise(denoiser: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], scheduler: Scheduler, start: Start, *,
            step_kwargs: Optional[dict] = None, hooks: Sequence[StepHook] = (),
            on_progress: Optional[ProgressCallback] = None, cancel: Optional[CancelFlag] = None) -> torch.Tensor:
    """Step from `start` through its timesteps; after each step the hooks run in order, then progress.

    `step_kwargs`: extra arguments of `scheduler.step` (a stochastic sampler's per-image generators).
    Cancel is looked at before each step; progress counts the steps of this start (`len(start.timesteps)`).
    """
    latents = start.latents
    total = len(start.timesteps)
    for index, timestep in enumerate(start.timesteps):
        if cancel is not None and cancel.is_set():
            raise Cancelled(f"cancelled before step {index + 1} of {total}")
        noise = denoiser(scheduler.scale_model_input(latents, timestep), timestep)
        latents = scheduler.step(noise, timestep, latents, **(step_kwargs or {}), return_dict=False)[0]
        latents = run_hooks(hooks, index, timestep, latents)
        if on_progress is not None:
            on_progress(index + 1, total)
    return latents


def run_hooks(hooks: Sequence[StepHook], index: int, timestep: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
    for hook in hooks:
        replaced = hook(index, timestep, latents)
        if replaced is None:
            continue
        if replaced.shape != latents.shape:
            raise ValueError(f"a step hook returned latents of shape {tuple(replaced.shape)} "
                             f"for latents of shape {tuple(latents.shape)}")
        latents = replaced
    return latents
