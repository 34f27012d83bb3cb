"""The warm pipeline: one place that encodes, denoises and decodes.

An `Engine` wraps a diffusers `PixArtSigmaPipeline` that already sits on its device and runs
PixArt-Sigma's sampling loop itself, so that it can cache prompt embeddings, seed every image
on its own, report progress, stop between steps and guard the VAE against NaN. The test suite
proves the images equal diffusers' own `PixArtSigmaPipeline.__call__` for the same weights.
"""

from __future__ import annotations

import inspect
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Optional, Protocol

import torch

log = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int], None]
EMBEDDING_CACHE_SIZE = 16


class Cancelled(Exception):
    """Raised out of `generate` when the caller's cancel flag was set; no images are returned."""


class GenerationError(RuntimeError):
    """The model ran but produced something unusable (e.g. NaN); the message says what to try."""


class CancelFlag(Protocol):
    def is_set(self) -> bool: ...


def _scheduler_classes() -> dict[str, type]:
    from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                           EulerDiscreteScheduler, SASolverScheduler, UniPCMultistepScheduler)

    return {
        "dpm-solver++": DPMSolverMultistepScheduler,
        "sa-solver": SASolverScheduler,
        "euler": EulerDiscreteScheduler,
        "euler-ancestral": EulerAncestralDiscreteScheduler,
        "ddim": DDIMScheduler,
        "unipc": UniPCMultistepScheduler,
    }


def _aspect_ratio_bins(native_size: int) -> Optional[dict]:
    """PixArt's trained aspect-ratio sizes for a checkpoint's native size in pixels; None when it has no table."""
    from diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha import (ASPECT_RATIO_256_BIN, ASPECT_RATIO_512_BIN,
                                                                        ASPECT_RATIO_1024_BIN)
    from diffusers.pipelines.pixart_alpha.pipeline_pixart_sigma import ASPECT_RATIO_2048_BIN

    return {256: ASPECT_RATIO_256_BIN, 512: ASPECT_RATIO_512_BIN, 1024: ASPECT_RATIO_1024_BIN,
            2048: ASPECT_RATIO_2048_BIN}.get(native_size)


def _step_kwargs(scheduler, generators) -> dict:
    """Stochastic samplers (euler-ancestral, sa-solver, ddim's eta) draw their noise from the per-image generators."""
    accepted = inspect.signature(scheduler.step).parameters
    kwargs = {"generator": generators} if "generator" in accepted else {}
    if "eta" in accepted:
        kwargs["eta"] = 0.0
    return kwargs


@dataclass
class Embeddings:
    prompt: torch.Tensor
    prompt_mask: torch.Tensor
    negative: Optional[torch.Tensor]
    negative_mask: Optional[torch.Tensor]
    truncated_tokens: int


@dataclass
class Request:
    """What one call of `Engine.generate` needs; all values already validated."""

    prompt: str
    negative_prompt: Optional[str]
    num_inference_steps: int
    guidance_scale: float
    width: int
    height: int
    seeds: list[int]
    scheduler: str = "dpm-solver++"
    use_resolution_binning: bool = True
    max_sequence_length: int = 300


@dataclass
class Output:
    images: list  # PIL images, one per seed
    truncated_tokens: int  # prompt tokens the encoder did not see
    generated_size: tuple[int, int]  # (width, height) actually sampled, before resizing back


class Engine:
    """A loaded pipeline on one device in one dtype. Thread-safe: one generation at a time."""

    def __init__(self, pipeline, device: torch.device, dtype: torch.dtype):
        self.pipeline = pipeline.to(device)
        self.device = device
        self.dtype = dtype
        self.pipeline.set_progress_bar_config(disable=True)
        self._lock = threading.Lock()
        self._embeddings: OrderedDict[tuple, Embeddings] = OrderedDict()
        self.text_encoder_calls = 0  # counted so that tests and users can see the cache work

    # -- text ---------------------------------------------------------------------------------
    def _encode_text(self, text: str, max_length: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        tokenizer, encoder = self.pipeline.tokenizer, self.pipeline.text_encoder
        tokens = tokenizer(text, padding="max_length", max_length=max_length, truncation=True,
                           add_special_tokens=True, return_tensors="pt")
        full_length = len(tokenizer(text, add_special_tokens=True).input_ids)
        mask = tokens.attention_mask.to(self.device)
        self.text_encoder_calls += 1
        embeds = encoder(tokens.input_ids.to(self.device), attention_mask=mask)[0]
        return embeds.to(dtype=encoder.dtype), mask, max(0, full_length - max_length)

    def encode(self, prompt: str, negative_prompt: Optional[str], max_length: int, guided: bool) -> Embeddings:
        """T5 embeddings of the prompt (and the negative prompt when guided), cached by text."""
        key = (prompt, negative_prompt or "", max_length, guided)
        cached = self._embeddings.get(key)
        if cached is not None:
            self._embeddings.move_to_end(key)
            return cached
        with torch.inference_mode():
            embeds, mask, truncated = self._encode_text(prompt, max_length)
            negative = negative_mask = None
            if guided:
                negative, negative_mask, _ = self._encode_text(negative_prompt or "", max_length)
        if truncated:
            # Counts only: prompts may be private, so they are never logged.
            log.warning("prompt is %d tokens over max_sequence_length=%d; the rest was not read",
                        truncated, max_length)
        result = Embeddings(embeds, mask, negative, negative_mask, truncated)
        self._embeddings[key] = result
        while len(self._embeddings) > EMBEDDING_CACHE_SIZE:
            self._embeddings.popitem(last=False)
        return result

    # -- images -------------------------------------------------------------------------------
    def sample_size(self, width: int, height: int, binning: bool) -> tuple[int, int]:
        """(width, height) to sample at: the nearest trained aspect-ratio bin when binning applies."""
        native = self.pipeline.transformer.config.sample_size * self.pipeline.vae_scale_factor
        bins = _aspect_ratio_bins(native) if binning else None
        if bins is None:
            # The transformer cuts the latent into patches: sides must be multiples of vae_scale x patch
            # (16 for PixArt), so sizes that are only multiples of 8 are sampled a little larger and cropped back.
            step = self.pipeline.vae_scale_factor * self.pipeline.transformer.config.patch_size
            return -(-width // step) * step, -(-height // step) * step
        bin_height, bin_width = self.pipeline.image_processor.classify_height_width_bin(height, width, ratios=bins)
        return bin_width, bin_height

    def make_scheduler(self, name: str):
        # A fresh scheduler per call: schedulers keep per-run state.
        # DDIMScheduler defaults to clip_sample=True, clipping predicted latents to [-1, 1]: right for
        # pixel-space models, wrong for VAE latents (scaled latents reach beyond +-1, colours wash out).
        overrides = {"sa-solver": {"algorithm_type": "data_prediction"}, "ddim": {"clip_sample": False}}.get(name, {})
        return _scheduler_classes()[name].from_config(self.pipeline.scheduler.config, **overrides)

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.pipeline.vae
        scaled = latents / vae.config.scaling_factor
        image = vae.decode(scaled.to(vae.dtype), return_dict=False)[0]
        if not torch.isfinite(image).all() and vae.dtype != torch.float32:
            log.warning("VAE decode in %s gave non-finite values; decoding again in float32", vae.dtype)
            vae.to(torch.float32)
            try:
                image = vae.decode(scaled.float(), return_dict=False)[0]
            finally:
                vae.to(self.dtype)
        if not torch.isfinite(image).all():
            raise GenerationError("the VAE produced non-finite pixels (NaN/inf); try dtype='float32'")
        return image

    def generate(self, request: Request, on_progress: Optional[ProgressCallback] = None,
                 cancel: Optional[CancelFlag] = None) -> Output:
        with self._lock, torch.inference_mode():
            return self._generate(request, on_progress, cancel)

    def _generate(self, request: Request, on_progress, cancel) -> Output:
        from diffusers.utils.torch_utils import randn_tensor

        pipe = self.pipeline
        transformer = pipe.transformer
        guided = request.guidance_scale > 1.0  # PixArt's rule: guidance <= 1 means no CFG pass
        text = self.encode(request.prompt, request.negative_prompt, request.max_sequence_length, guided)
        count = len(request.seeds)

        embeds = text.prompt.repeat(count, 1, 1)
        mask = text.prompt_mask.repeat(count, 1)
        if guided:
            embeds = torch.cat([text.negative.repeat(count, 1, 1), embeds])
            mask = torch.cat([text.negative_mask.repeat(count, 1), mask])

        width, height = self.sample_size(request.width, request.height, request.use_resolution_binning)
        scheduler = self.make_scheduler(request.scheduler)
        scheduler.set_timesteps(request.num_inference_steps, device=self.device)
        timesteps = scheduler.timesteps

        # One CPU generator per image: image k depends only on seeds[k], on any device and batch size.
        generators = [torch.Generator("cpu").manual_seed(seed) for seed in request.seeds]
        factor = pipe.vae_scale_factor
        shape = (count, transformer.config.in_channels, height // factor, width // factor)
        latents = randn_tensor(shape, generator=generators, device=self.device, dtype=embeds.dtype)
        latents = latents * scheduler.init_noise_sigma
        step_kwargs = _step_kwargs(scheduler, generators)
        learned_sigma = transformer.config.out_channels // 2 == transformer.config.in_channels
        conditions = {"resolution": None, "aspect_ratio": None}

        total = len(timesteps)
        for index, timestep in enumerate(timesteps):
            if cancel is not None and cancel.is_set():
                raise Cancelled(f"cancelled before step {index + 1} of {total}")
            model_input = torch.cat([latents] * 2) if guided else latents
            model_input = scheduler.scale_model_input(model_input, timestep)
            noise = transformer(
                model_input,
                encoder_hidden_states=embeds,
                encoder_attention_mask=mask,
                timestep=timestep[None].to(self.device).expand(model_input.shape[0]),
                added_cond_kwargs=conditions,
                return_dict=False,
            )[0]
            if guided:
                uncond, cond = noise.chunk(2)
                noise = uncond + request.guidance_scale * (cond - uncond)
            if learned_sigma:
                noise = noise.chunk(2, dim=1)[0]
            latents = scheduler.step(noise, timestep, latents, **step_kwargs, return_dict=False)[0]
            if on_progress is not None:
                on_progress(index + 1, total)

        if not torch.isfinite(latents).all():
            raise GenerationError(
                f"the denoiser produced NaN/inf in {self.dtype}; try dtype='bfloat16' or 'float32'")
        if cancel is not None and cancel.is_set():
            raise Cancelled(f"cancelled after step {total} of {total}")
        pixels = self._decode(latents)
        if (width, height) != (request.width, request.height):
            pixels = pipe.image_processor.resize_and_crop_tensor(pixels, request.width, request.height)
        images = pipe.image_processor.postprocess(pixels, output_type="pil")
        return Output(images, text.truncated_tokens, (width, height))


# -- the warm-model cache ---------------------------------------------------------------------
_engines: dict[tuple, Engine] = {}
_engines_lock = threading.Lock()
load_count = 0  # how many times weights were read in this process (tests check reuse)


def get_engine(checkpoint, device: torch.device, dtype: torch.dtype) -> Engine:
    """The process-wide warm engine for (checkpoint, device, dtype), loading it on first use."""
    from .checkpoints import load_pipeline

    global load_count
    key = (checkpoint.key, str(device), str(dtype))
    with _engines_lock:
        engine = _engines.get(key)
        if engine is None:
            load_count += 1
            engine = Engine(load_pipeline(checkpoint, dtype), device, dtype)
            _engines[key] = engine
        return engine


def unload_all() -> None:
    """Forget every warm model and free its memory (GPU included)."""
    with _engines_lock:
        _engines.clear()
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
