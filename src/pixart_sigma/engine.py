"""The warm pipeline: one place that encodes, denoises and decodes, and the cache that keeps it warm.

An `Engine` wraps a diffusers `PixArtSigmaPipeline` that already sits on its device and runs
PixArt-Sigma's sampling loop itself (in the stages of sampling.py), so that it can cache prompt
embeddings, seed every image on its own, report progress, stop between steps and guard the VAE
against NaN. The test suite proves the images equal diffusers' own `PixArtSigmaPipeline.__call__`
for the same weights.

The warm cache loads each checkpoint once per (device, dtype), shares the text encoder, tokenizer
and VAE between checkpoints that use the same files, loads different keys in parallel, evicts the
least recently used engines past a memory budget, and runs one generation at a time per device.
"""

from __future__ import annotations

import contextlib
import gc
import inspect
import logging
import math
import os
import sys
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch

from . import sampling, step_cache, text_cache
from .calls import check_memory_mode, check_text_encoder_memory
from .devices import INT8, dtype_name, int8_activation_dtype, module_bytes, quantize_int8
from .errors import Cancelled, GenerationError, SettingsError
from .loras import LoraUse, fuse
from .quiet import import_torchao_quietly
from .placement import OFFLOADED, PARTS, PartSizes, Placement, place, resolve_mode
from .sampling import CancelFlag, Conditioning, LatentLayout, ProgressCallback, StartStage, StepHook
from .settings import SAMPLERS, Settings, check_images_per_call, check_pixel_budget
from .sizes import SizePlan, fit_to_size, plan_size

log = logging.getLogger(__name__)

EMBEDDING_CACHE_SIZE = 32  # texts per text encoder; a fixed negative prompt stays in it
WAIT_POLL_SECONDS = 0.05  # how often a call waiting for its device looks at its cancel flag
MEMORY_BUDGET_ENV = "PIXART_SIGMA_CACHE_GB"  # warm weights kept per device before the least recent go


def check_callbacks(on_progress: Any, cancel: Any) -> None:
    """Refuse callbacks that would only fail at step 1, after the prompt was encoded."""
    if on_progress is not None and not callable(on_progress):
        raise SettingsError([f"on_progress={on_progress!r} is not valid: pass a function taking (step, total), or None"])
    if cancel is not None and not callable(getattr(cancel, "is_set", None)):
        raise SettingsError([f"cancel={cancel!r} is not valid: pass an object with is_set() "
                             "(a threading.Event), or None"])


def sampler_class(name: str) -> type:
    """The diffusers scheduler class of a `scheduler` setting."""
    import diffusers

    return getattr(diffusers, SAMPLERS[name].diffusers_class)


def make_scheduler(name: str, base_config: dict):
    """A fresh scheduler for one call (schedulers keep per-run state), from the checkpoint's config."""
    return sampler_class(name).from_config(base_config, **SAMPLERS[name].overrides)


def _step_kwargs(scheduler, generators) -> dict:
    """Stochastic samplers (euler-ancestral, sa-solver, ddim's eta) draw their noise from the per-image generators."""
    accepted = inspect.signature(scheduler.step).parameters
    kwargs = {"generator": generators} if "generator" in accepted else {}
    if "eta" in accepted:
        kwargs["eta"] = 0.0
    return kwargs


# -- one generation at a time per device --------------------------------------------------------
_device_locks: dict[str, threading.Lock] = {}
_device_locks_guard = threading.Lock()
_held = threading.local()  # devices this thread is generating on (to refuse re-entry instead of deadlocking)


def _device_lock(device: torch.device) -> threading.Lock:
    with _device_locks_guard:
        return _device_locks.setdefault(str(device), threading.Lock())


class _DeviceTurn:
    """Holds the device for one generation; waits honouring `cancel`; refuses a nested call from a callback."""

    def __init__(self, device: torch.device, cancel: Optional[CancelFlag]):
        self.name, self.cancel, self.lock = str(device), cancel, _device_lock(device)

    def __enter__(self):
        held = getattr(_held, "devices", set())
        if self.name in held:
            raise GenerationError(
                f"generate() was called from inside a callback of a generation still running on {self.name}: "
                "one generation at a time per device; call it after that generation returns")
        if self.cancel is None:
            self.lock.acquire()
        else:
            while not self.lock.acquire(timeout=WAIT_POLL_SECONDS):
                if self.cancel.is_set():
                    raise Cancelled(f"cancelled while waiting for {self.name}")
        _held.devices = held | {self.name}
        return self

    def __exit__(self, *exc):
        _held.devices = getattr(_held, "devices", set()) - {self.name}
        self.lock.release()
        return False


# -- text ---------------------------------------------------------------------------------------
@dataclass
class Encoded:
    embeds: torch.Tensor
    mask: torch.Tensor
    truncated_tokens: int  # tokens past max_length that the encoder did not read


class TextEncoder:
    """T5 tokenizer and encoder with an LRU cache of embeddings by text; shared by checkpoints that share them."""

    def __init__(self, tokenizer, encoder, device: torch.device):
        self.tokenizer, self.encoder, self.device = tokenizer, encoder, device
        self._cache: OrderedDict[tuple[str, int], Encoded] = OrderedDict()
        self._lock = threading.Lock()
        self.calls = 0  # encoder runs, so that tests and users can see the cache work

    def encode(self, text: str, max_length: int, use_cache: bool = True, placed=contextlib.nullcontext) -> Encoded:
        """`placed()`: a context that puts the encoder on its device, entered only when T5 must run."""
        key = (text, max_length)
        with self._lock:
            cached = self._cache.get(key) if use_cache else None
            if cached is not None:
                self._cache.move_to_end(key)
                return cached
            with torch.inference_mode(), placed():
                tokens = self.tokenizer(text, padding="max_length", max_length=max_length, truncation=True,
                                        add_special_tokens=True, return_tensors="pt")
                full_length = len(self.tokenizer(text, add_special_tokens=True).input_ids)
                mask = tokens.attention_mask.to(self.device)
                self.calls += 1
                embeds = self.encoder(tokens.input_ids.to(self.device), attention_mask=mask)[0]
            result = Encoded(embeds.to(dtype=self.encoder.dtype), mask, max(0, full_length - max_length))
            self._cache[key] = result
            while len(self._cache) > EMBEDDING_CACHE_SIZE:
                self._cache.popitem(last=False)
            return result

    def clear(self) -> None:
        with self._lock:
            self._cache.clear()


class _Stage:
    """Puts a part on the device at the first encode that needs it and keeps it there until closed."""

    def __init__(self, placement, part: str):
        self.placement, self.part, self.stack = placement, part, contextlib.ExitStack()
        self.entered = False

    def __call__(self):
        if not self.entered:
            self.stack.enter_context(self.placement.using(self.part))
            self.entered = True
        return contextlib.nullcontext()

    def close(self) -> None:
        self.stack.close()


@dataclass
class Output:
    images: list  # PIL images, one per seed
    truncated_tokens: int  # prompt tokens the encoder did not see
    generated_size: tuple[int, int]  # (width, height) actually sampled, before fitting to the request
    full_steps: list[int]  # per image: the steps that ran the whole transformer (fewer under a step cache)


class Engine:
    """A loaded pipeline on one device in one dtype. Thread-safe: one generation at a time per device.

    `memory` is a concrete memory mode (placement.OFFLOADED): the engine puts each part on the device
    for the time it runs. `move=True` first moves the whole pipeline there (resident).
    """

    def __init__(self, pipeline, device: torch.device, dtype: torch.dtype, text: Optional[TextEncoder] = None,
                 move: bool = True, located=None, memory: str = "resident"):
        self.pipeline = pipeline.to(device) if move else pipeline
        self.located = located  # checkpoints.Located: the folders and hub revisions it was read from
        self.device = device
        self.dtype = dtype
        self.placement = Placement(memory, device, {part: getattr(pipeline, part) for part in PARTS})
        self.pipeline.set_progress_bar_config(disable=True)
        self.text = text or TextEncoder(pipeline.tokenizer, pipeline.text_encoder, device)
        self._compiled_transformer = None  # made on the first call with compile=True

    def denoiser(self, compile: bool):
        """The transformer, or its torch.compile wrapper (built once, then reused for every size)."""
        if not compile:
            return self.pipeline.transformer
        if self._compiled_transformer is None:
            from .compiling import CompiledDenoiser

            resident = "transformer" not in OFFLOADED[self.memory]
            self._compiled_transformer = CompiledDenoiser(self.pipeline.transformer, self.device, resident)
        return self._compiled_transformer

    @property
    def memory(self) -> str:
        """The concrete memory mode (placement.OFFLOADED)."""
        return self.placement.mode

    @property
    def text_encoder_calls(self) -> int:
        return self.text.calls

    @property
    def native_size(self) -> int:
        return self.pipeline.transformer.config.sample_size * self.pipeline.vae_scale_factor

    def modules(self) -> list[torch.nn.Module]:
        """The parts that stay on the device between calls (offloaded ones wait in RAM)."""
        return self.placement.resident_parts()

    def encode(self, text: str, max_length: int, use_cache: bool = True, placed=None) -> Encoded:
        """T5 embeddings of one text (cached by text). `placed`: a `_Stage` shared by several encodes."""
        placed = placed or (lambda: self.placement.using("text_encoder"))
        encoded = self.text.encode(text, max_length, use_cache, placed=placed)
        if encoded.truncated_tokens:
            # Counts only: prompts may be private, so they are never logged.
            log.warning("prompt is %d tokens over max_sequence_length=%d; the rest was not read",
                        encoded.truncated_tokens, max_length)
        return encoded

    def plan(self, width: int, height: int, binning: bool):
        """How a requested size is sampled and fitted (see sizes.plan_size)."""
        multiple = self.pipeline.vae_scale_factor * self.pipeline.transformer.config.patch_size
        return plan_size(width, height, native_size=self.native_size, multiple=multiple, binning=binning)

    def decode(self, latents: torch.Tensor, tiled: bool = False) -> torch.Tensor:
        """Latents to pixels in [-1, 1]; a half-precision overflow is decoded again in float32."""
        vae = self.pipeline.vae
        scaled = latents / vae.config.scaling_factor
        return self._run_vae(lambda inputs: vae.decode(inputs, return_dict=False)[0], scaled, tiled, "decode")

    def encode_pixels(self, pixels: torch.Tensor, tiled: bool = False) -> torch.Tensor:
        """Pixels (images, 3, height, width) in [-1, 1] to scaled latents in this engine's dtype: `decode`'s inverse.

        Deterministic: the mean of the VAE's latent distribution, not a sample from it. The posterior's
        spread is small (the demo VAE's about 0.02) and denoising re-noises the latents anyway, while a
        sample would need noise of its own: the mean keeps an encode a function of the pixels alone, the
        same on every call and machine, and draws nothing from the images' generators. Sides must be
        multiples of `pipeline.vae_scale_factor`. Like `decode`, it switches the shared VAE's tiling: run it
        inside a generation (a start stage) or while nothing else generates on this device.
        """
        vae = self.pipeline.vae
        mean = self._run_vae(lambda inputs: vae.encode(inputs).latent_dist.mean, pixels.to(self.device), tiled,
                             "encode")
        return (mean * vae.config.scaling_factor).to(self.dtype)

    def _run_vae(self, run: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor, tiled: bool,
                 what: str) -> torch.Tensor:
        """`run(inputs)` with the VAE on the device in its dtype; a half-precision overflow runs again in float32."""
        vae = self.pipeline.vae
        # The VAE is shared between checkpoints on this device; the device turn makes this switch private.
        (vae.enable_tiling if tiled else vae.disable_tiling)()
        with torch.inference_mode(), self.placement.using("vae"):
            output = run(inputs.to(vae.dtype))
            # A streamed VAE's hooks keep their own copies of the weights: it cannot be recast here.
            if not torch.isfinite(output).all() and vae.dtype != torch.float32 and self.memory != "sequential-offload":
                log.warning("VAE %s in %s gave non-finite values; running it again in float32", what, vae.dtype)
                dtype = vae.dtype
                vae.to(torch.float32)
                try:
                    output = run(inputs.float())
                finally:
                    vae.to(dtype)
        if not torch.isfinite(output).all():
            produced = "pixels" if what == "decode" else "latents"
            raise GenerationError(f"the VAE produced non-finite {produced} (NaN/inf); try dtype='float32'")
        return output

    def generate(self, prompt: str, settings: Settings, seeds: list[int],
                 on_progress: Optional[ProgressCallback] = None, cancel: Optional[CancelFlag] = None, *,
                 start: StartStage = sampling.noise_start, hooks: Sequence[StepHook] = (),
                 loras: Sequence[LoraUse] = ()) -> Output:
        """Images for one prompt, one per seed; `settings` already validated, with width and height set."""
        return self.generate_many([prompt], settings, [seeds], on_progress, cancel, start=start, hooks=hooks,
                                  loras=loras)[0]

    def generate_many(self, prompts: list[str], settings: Settings, seeds: list[list[int]],
                      on_progress: Optional[ProgressCallback] = None, cancel: Optional[CancelFlag] = None, *,
                      start: StartStage = sampling.noise_start, hooks: Sequence[StepHook] = (),
                      loras: Sequence[LoraUse] = ()) -> list[Output]:
        """Several prompts denoised together in one batch, one Output per prompt with one image per seed.

        Fills the device better than one call per prompt; image k of a prompt depends only on that prompt,
        its seed and the settings, as in `generate`. `start` makes the latents and timesteps to begin
        from (default: each seed's noise, every step); `hooks` run after each step (sampling.py). `loras`: the
        call's LoRAs, read (loras.prepare_loras); fused into the transformer in this call's device turn, and
        taken off by the next call without them (settings.loras names them; these are what is applied).
        """
        check_callbacks(on_progress, cancel)
        if len(prompts) != len(seeds) or not prompts or not all(seeds):
            raise SettingsError([f"generate_many needs one non-empty seed list per prompt: got {len(prompts)} "
                                 f"prompt(s) and {len(seeds)} seed list(s)"])
        check_image_count(settings.width, settings.height, seeds)
        check_memory_mode(settings.compile, loras, self.memory, settings.step_cache)
        with _DeviceTurn(self.device, cancel), torch.inference_mode():
            # The transformer is shared by every call on this device: its weights are this call's set for the turn.
            fuse(self.pipeline.transformer, loras)
            return self._generate(prompts, settings, seeds, start, hooks, on_progress, cancel)

    def _generate(self, prompts: list[str], s: Settings, seed_groups: list[list[int]], start_stage: StartStage,
                  hooks: Sequence[StepHook], on_progress: Optional[ProgressCallback],
                  cancel: Optional[CancelFlag]) -> list[Output]:
        images_per_prompt = [len(group) for group in seed_groups]
        # Conditioning.
        negative_prompt = (s.negative_prompt or "") if sampling.uses_guidance(s.guidance_scale) else None
        texts, negative = self.encode_prompts(prompts, negative_prompt, s.max_sequence_length, cancel)
        conditioning = sampling.batch_conditioning(texts, images_per_prompt, negative, self.dtype)

        # Start.
        plan = self.plan(s.width, s.height, s.use_resolution_binning)
        scheduler = make_scheduler(s.scheduler, self.pipeline.scheduler.config)
        scheduler.set_timesteps(s.num_inference_steps, device=self.device)
        # One CPU generator per image: image k depends only on seeds[k], on any device and batch size.
        generators = [torch.Generator("cpu").manual_seed(seed) for group in seed_groups for seed in group]
        layout = self.latent_layout(len(generators), plan)
        start = start_stage(scheduler, layout, generators)
        sampling.check_start(start, layout)

        # Denoise, then finish.
        passes = step_cache.Passes(len(generators))
        latents = self.denoise(conditioning, scheduler, start, guidance_scale=s.guidance_scale, compile=s.compile,
                               generators=generators, hooks=hooks, on_progress=on_progress, cancel=cancel,
                               cache=step_cache.StepCache.of(s), passes=passes)
        images = self.finish(latents, plan, tiled=s.vae_tiling)
        outputs, first = [], 0
        for text, count in zip(texts, images_per_prompt):
            outputs.append(Output(images[first:first + count], text.truncated_tokens,
                                  (plan.sample_width, plan.sample_height), passes.full_steps[first:first + count]))
            first += count
        return outputs

    def encode_prompts(self, prompts: list[str], negative_prompt: Optional[str], max_length: int,
                       cancel: Optional[CancelFlag] = None) -> tuple[list[Encoded], Optional[Encoded]]:
        """The conditioning stage's T5 work: each prompt's embeddings, and the negative prompt's unless None.

        T5 comes to the device at most once for all the new texts of the call (offload modes); cached
        texts do not bring it at all.
        """
        with contextlib.closing(_Stage(self.placement, "text_encoder")) as stage:
            texts = []
            for prompt in prompts:
                if cancel is not None and cancel.is_set():
                    raise Cancelled("cancelled while encoding the prompts")
                texts.append(self.encode(prompt, max_length, placed=stage))
            negative = None if negative_prompt is None else self.encode(negative_prompt, max_length, placed=stage)
        return texts, negative

    def latent_layout(self, images: int, plan: SizePlan) -> LatentLayout:
        """The latents a batch of `images` is denoised in, at the plan's sample size, in this engine's dtype."""
        factor = self.pipeline.vae_scale_factor
        channels = self.pipeline.transformer.config.in_channels
        shape = (images, channels, plan.sample_height // factor, plan.sample_width // factor)
        return LatentLayout(shape, self.dtype, self.device)

    def denoise(self, conditioning: Conditioning, scheduler, start: sampling.Start, *, guidance_scale: float,
                compile: bool, generators: list[torch.Generator], hooks: Sequence[StepHook] = (),
                on_progress: Optional[ProgressCallback] = None, cancel: Optional[CancelFlag] = None,
                cache: step_cache.StepCache = step_cache.StepCache(),
                passes: Optional[step_cache.Passes] = None) -> torch.Tensor:
        """The denoising stage: the transformer (compiled if asked) on the device for the whole loop.

        `generators`: the images' own, for a stochastic sampler's steps. `cache`: the call's step cache;
        `passes`, if given, is filled with each image's full transformer steps. Raises on NaN/inf latents, and
        `Cancelled` when cancel was set during the last step (before the decode is paid for).
        """
        config = self.pipeline.transformer.config
        learned_sigma = config.out_channels // 2 == config.in_channels  # PixArt predicts noise and variance
        step_kwargs = _step_kwargs(scheduler, generators)
        with self.placement.using("transformer"):
            denoiser = sampling.GuidedDenoiser(self.denoiser(compile), conditioning, guidance_scale, learned_sigma)
            # The text's projection and cross-attention keys/values once per call, not per step (same pixels).
            reuse = contextlib.nullcontext() if compile else text_cache.session(self.pipeline.transformer,
                                                                                 denoiser.embeds)
            steps = len(start.timesteps)
            with reuse, step_cache.session(self.pipeline.transformer, cache, len(generators), steps, passes):
                latents = sampling.denoise(denoiser, scheduler, start, step_kwargs=step_kwargs, hooks=hooks,
                                           on_progress=on_progress, cancel=cancel)
        if not torch.isfinite(latents).all():
            raise GenerationError(
                f"the denoiser produced NaN/inf in {self.dtype}; try dtype='bfloat16' or 'float32'")
        total = len(start.timesteps)
        if cancel is not None and cancel.is_set():
            raise Cancelled(f"cancelled after step {total} of {total}")
        return latents

    def finish(self, latents: torch.Tensor, plan: SizePlan, tiled: bool = False) -> list:
        """The finishing stage: decode, fit to the requested size, and make PIL images (one per latent)."""
        pixels = fit_to_size(self.decode(latents, tiled=tiled), plan)
        return self.pipeline.image_processor.postprocess(pixels, output_type="pil")


def check_image_count(width: int, height: int, seed_groups: list[list[int]]) -> None:
    """The per-call caps on images and pixels, counted on the seeds handed over (one image per seed)."""
    counts = {len(group) for group in seed_groups}
    if len(counts) == 1:  # what every front end sends: n images per prompt, worded as the settings are
        prompts, per_prompt = len(seed_groups), counts.pop()
    else:
        prompts, per_prompt = 1, sum(len(group) for group in seed_groups)
    check_images_per_call(prompts, per_prompt)
    check_pixel_budget(width, height, per_prompt, prompts=prompts)


# -- the warm-model cache ---------------------------------------------------------------------
class _Pending:
    """A load in progress that other callers of the same key wait for."""

    def __init__(self):
        self.done = threading.Event()
        self.error: Optional[BaseException] = None


_lock = threading.Lock()  # guards the dicts below; never held while loading
_read_lock = threading.Lock()  # held while weights are read, see _part
_engines: OrderedDict[tuple, Engine] = OrderedDict()  # least recently used first
_parts: dict[tuple, weakref.ref] = {}  # shared parts stay alive only while an engine holds them
_pending: dict[tuple, _Pending] = {}
load_count = 0  # how many times an engine was built in this process (tests check reuse)
part_load_count = 0  # how many times a part's weights were read


def _once(key: tuple, lookup: Callable[[], Any], build: Callable[[], Any], store: Callable[[Any], None]):
    """Load `key` once even when many threads ask at the same time; other keys load in parallel.

    `build` runs without the lock; `store` runs under it (where shared state such as the load counts changes).
    """
    while True:
        with _lock:
            found = lookup()
            if found is not None:
                return found
            pending = _pending.get(key)
            mine = pending is None
            if mine:
                pending = _pending[key] = _Pending()
        if not mine:
            pending.done.wait()
            if pending.error is not None:
                raise pending.error
            continue  # look it up again (it may already have been evicted: then load it ourselves)
        try:
            value = build()
            with _lock:
                store(value)
            return value
        except BaseException as exc:
            pending.error = exc
            raise
        finally:
            with _lock:
                _pending.pop(key, None)
            pending.done.set()


def _part(part: str, folder, device: torch.device, dtype: torch.dtype, memory: str = "resident"):
    """One shared pipeline part for its device, loaded once for everyone who names the same folder.

    It is first put where `memory` wants it between uses; a part streamed block by block carries
    offloading hooks, so it is shared only with engines that stream too.
    """
    from .checkpoints import load_part, loading_guard

    device_free = part not in PARTS
    streamed = memory == "sequential-offload" and not device_free
    key = ("part", part, str(folder)) + (() if device_free else (str(device), str(dtype), streamed))

    def lookup():
        ref = _parts.get(key)
        return ref() if ref is not None else None

    def build():
        # One read at a time: diffusers and transformers build models under process-wide switches (meta
        # device, default dtype, lazy imports) that concurrent loads trip over. Lookups of warm keys never
        # take this lock, so they do not wait.
        with _read_lock, loading_guard(folder, part):
            if dtype == INT8:  # text_encoder_dtype=int8: read in the dtype it computes in, then Linear weights to int8
                value = quantize_int8(load_part(folder, part, int8_activation_dtype(device)))
            else:
                value = load_part(folder, part, dtype)
            if not device_free:
                place(value, memory, part, device)
        return value

    def store(value):
        global part_load_count
        _parts[key] = weakref.ref(value)
        part_load_count += 1  # here, under _lock: loads of different parts finish at the same time

    return _once(key, lookup, build, store)


def _module_bytes(modules) -> dict[int, int]:
    return {id(module): module_bytes(module) for module in modules}


def memory_budget(device: torch.device) -> int:
    """Bytes of warm weights kept per device: PIXART_SIGMA_CACHE_GB, else 90% of a GPU or half the RAM."""
    setting = os.environ.get(MEMORY_BUDGET_ENV)
    if setting:
        try:
            gigabytes = float(setting)
        except ValueError:
            gigabytes = math.nan
        if gigabytes == math.inf:
            return sys.maxsize  # no limit
        if math.isfinite(gigabytes) and gigabytes >= 0:
            return int(gigabytes * 2**30)
        log.warning("%s=%r is not a number of GB (0 or more, or inf); using the default budget",
                    MEMORY_BUDGET_ENV, setting[:40])
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory * 0.9)
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    except (ValueError, OSError, AttributeError):
        return 16 * 2**30


def _evict_over_budget(device: torch.device, keep: tuple) -> None:
    """Drop least recently used engines on `device` until its warm weights fit the budget (called under _lock)."""
    budget = memory_budget(device)
    while True:
        on_device = [(key, engine) for key, engine in _engines.items() if engine.device == device]
        sizes: dict[int, int] = {}
        for _, engine in on_device:
            sizes.update(_module_bytes(engine.modules()))
        if sum(sizes.values()) <= budget or len(on_device) <= 1:
            return
        victim = next(key for key, _ in on_device if key != keep)
        log.info("evicting a warm model to stay within %s GiB on %s", round(budget / 2**30, 1), device)
        del _engines[victim]


def _part_sizes(located, dtype: torch.dtype, text_dtype: torch.dtype) -> PartSizes:
    from .checkpoints import parameter_count, vae_dtype

    def size(part, part_dtype):
        # INT8: 1 byte per weight (T5's embedding stays in its float dtype: a few % more than counted).
        return parameter_count(located.folders[part]) * torch.empty((), dtype=part_dtype).element_size()

    return PartSizes(size("text_encoder", text_dtype), size("transformer", dtype), size("vae", vae_dtype(dtype)))


def _engine_key(checkpoint, device: torch.device, dtype: torch.dtype, text_dtype: Optional[torch.dtype],
                memory: str) -> tuple:
    return ("engine", checkpoint.key, str(device), str(dtype), str(text_dtype or dtype), memory)


def is_warm(checkpoint, device: torch.device, dtype: torch.dtype, text_dtype: Optional[torch.dtype] = None,
            memory: str = "resident") -> bool:
    """Whether `get_engine` with these arguments would answer without loading (asking never loads)."""
    with _lock:
        return _engine_key(checkpoint, device, dtype, text_dtype, memory) in _engines


def get_engine(checkpoint, device: torch.device, dtype: torch.dtype, text_dtype: Optional[torch.dtype] = None,
               memory: str = "resident") -> Engine:
    """The process-wide warm engine for (checkpoint, device, dtypes, memory mode), loading it on first use.

    `text_dtype`: the T5 encoder's (default `dtype`); `memory`: a mode of settings.MEMORY_MODES.
    """
    from .checkpoints import locate

    text_dtype = text_dtype or dtype
    key = _engine_key(checkpoint, device, dtype, text_dtype, memory)

    def lookup():
        engine = _engines.get(key)
        if engine is not None:
            _engines.move_to_end(key)
        return engine

    def build():
        with _read_lock:  # diffusers' lazy imports are not thread-safe either
            import_torchao_quietly()  # before diffusers and transformers import it, with its chatter
            from diffusers import PixArtSigmaPipeline
        located = locate(checkpoint)
        mode = resolve_mode(memory, device, lambda: _part_sizes(located, dtype, text_dtype))
        check_text_encoder_memory(dtype_name(text_dtype), mode)
        parts = {part: _part(part, folder, device, text_dtype if part == "text_encoder" else dtype, mode)
                 for part, folder in located.folders.items()}
        text_key = ("text", str(located.folders["text_encoder"]), str(located.folders["tokenizer"]), str(device),
                    str(text_dtype), mode == "sequential-offload")
        text = _shared_text_encoder(text_key, parts["tokenizer"], parts["text_encoder"], device)
        engine = Engine(PixArtSigmaPipeline(**parts), device, dtype, text=text, move=False, located=located,
                        memory=mode)
        return engine

    def store(engine):
        global load_count
        _engines[key] = engine
        load_count += 1  # here, under _lock: engines of different keys finish loading at the same time
        _evict_over_budget(device, key)

    return _once(key, lookup, build, store)


_text_encoders: dict[tuple, weakref.ref] = {}


def _shared_text_encoder(key: tuple, tokenizer, encoder, device) -> TextEncoder:
    """One embedding cache per shared T5, so the 512, 1024 and 2K checkpoints reuse each other's prompts."""
    with _lock:
        ref = _text_encoders.get(key)
        text = ref() if ref is not None else None
        if text is None or text.encoder is not encoder:
            text = TextEncoder(tokenizer, encoder, device)
            _text_encoders[key] = weakref.ref(text)
        return text


def cached_engines() -> list[Engine]:
    """The warm engines, least recently used first."""
    with _lock:
        return list(_engines.values())


def unload_all() -> None:
    """Forget every warm model and free its memory (GPU included); models reload on their next use."""
    with _lock:
        _engines.clear()
        _parts.clear()
        _text_encoders.clear()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
