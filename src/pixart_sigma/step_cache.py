"""Step caching: fewer transformer passes per image by reusing what the last steps computed (opt-in, approximate).

Neighbouring denoising steps change the transformer's features little, so a step can reuse earlier work:

- `first-block` (First Block Cache, after TeaCache): at each step the first block runs; when its residual
  (output - input) moved by at most `threshold` (mean absolute change relative to its size) since the image's
  last full step, the other blocks are skipped and the residual they added at that full step is added again.
  Decided per image, never per batch: an image comes out the same in any batch, as without a cache.
  Ours, on diffusers' hook registry: diffusers' own FirstBlockCache hook decides for the whole batch at once,
  so one image's content would change another's steps.
- `taylorseer` (TaylorSeer): the whole transformer runs every `interval`-th step; in between, each block's
  self-attention, cross-attention and feed-forward outputs are extrapolated from their last two full steps (a
  first-order Taylor series; copied while only one full step is there); the norms and the timestep's modulation
  still run. Keeps two activation-sized tensors per module: about 3.2 GB per image at 1024² in bfloat16.
- `taylorseer-lite` (diffusers' TaylorSeer Lite): the same schedule, but on the steps in between only the
  transformer's output is extrapolated and the blocks do not run at all: faster (a predicted step costs next
  to nothing) and almost no extra memory.

Both are diffusers' TaylorSeer hook, element-wise, so batch-safe as they are. All three run the first `warmup`
and the last `cooldown` steps in full: on the demo model, predicting either of the last two steps of 20 cost 5
to 20 points of its checker (tools/evaluate_step_cache.py).

A session is opened per call (`session`) and removes its hooks when the call ends, so the shared transformer
runs uncached outside it. Not under torch.compile (settings refuse the pair: the hooks' Python decisions
break its graph).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch

from .settings import Settings

_FIRST_BLOCK_HOOK = "pixart_sigma_first_block_cache"
# TaylorSeer extrapolates the outputs of these modules of every block (PixArt's BasicTransformerBlock).
TAYLORSEER_MODULES = r"^transformer_blocks\.\d+\.(attn1|attn2|ff)$"


@dataclass(frozen=True)
class StepCache:
    """One call's step cache, from its settings: the method and its parameters."""

    method: str = "off"
    threshold: float = 0.0
    interval: int = 1
    warmup: int = 1
    cooldown: int = 0

    @classmethod
    def of(cls, settings: Settings) -> "StepCache":
        return cls(settings.step_cache, settings.step_cache_threshold, settings.step_cache_interval,
                   settings.step_cache_warmup, settings.step_cache_cooldown)


class Passes:
    """What a session did: for each image, the steps that ran the whole transformer."""

    def __init__(self, images: int):
        self.full_steps = [0] * images


# -- first block cache --------------------------------------------------------------------------
class _FirstBlockState:
    """One call's first-block cache: the residuals kept from each image's last full step, and this step's decision."""

    def __init__(self, images: int, threshold: float, full_steps: Callable[[int], bool], passes: Passes):
        self.images, self.threshold, self.full_steps, self.passes = images, threshold, full_steps, passes
        self.step = -1
        self.first_residual: Optional[torch.Tensor] = None  # the first block's residual at each row's last full step
        self.rest_residual: Optional[torch.Tensor] = None  # what the other blocks added at that step
        self.first_output: Optional[torch.Tensor] = None  # this step's
        self.this_residual: Optional[torch.Tensor] = None
        self.reuse: Optional[torch.Tensor] = None  # bool per row: this step reuses rest_residual
        self.skip_rest = False  # every row reuses: the other blocks do not run at all

    def decide(self, residual: torch.Tensor) -> list[bool]:
        """Per image: whether its first block's residual moved by at most the threshold since its last full step."""
        if self.first_residual is None or self.full_steps(self.step):
            return [False] * self.images
        reuse = []
        for image in range(self.images):
            # The image's rows (its negative prompt's row, then its prompt's) made contiguous, so the sums run
            # in the same order as when the image is alone in its batch.
            now = residual[image::self.images].float().contiguous()
            before = self.first_residual[image::self.images].float().contiguous()
            change = (now - before).abs().mean() / before.abs().mean()
            reuse.append(bool(change <= self.threshold))  # NaN (a zero residual) runs the step in full
        return reuse

    def row_mask(self, reuse: list[bool], rows: int, device: torch.device) -> torch.Tensor:
        per_image = torch.tensor(reuse, device=device)
        return per_image.repeat(rows // self.images)[:, None, None]  # row r is image r % images

    def after_first(self, hidden: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        self.step += 1
        residual = output - hidden
        reuse = self.decide(residual)
        for image, reused in enumerate(reuse):
            self.passes.full_steps[image] += not reused
        self.first_output, self.this_residual = output, residual
        self.reuse = self.row_mask(reuse, output.shape[0], output.device)
        self.skip_rest = all(reuse)
        if self.skip_rest:
            return output + self.rest_residual
        return output

    def after_last(self, output: torch.Tensor) -> torch.Tensor:
        """The last block's output: the full rows keep theirs and refresh the cache; the others reuse it."""
        rest = output - self.first_output
        if self.rest_residual is None:  # the first step: every row ran in full
            self.rest_residual, self.first_residual = rest, self.this_residual
            return output
        self.rest_residual = torch.where(self.reuse, self.rest_residual, rest)
        self.first_residual = torch.where(self.reuse, self.first_residual, self.this_residual)
        return torch.where(self.reuse, self.first_output + self.rest_residual, output)


def _hidden_states(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _first_block_hooks(state: _FirstBlockState):
    from diffusers.hooks import ModelHook

    class FirstBlock(ModelHook):
        def new_forward(self, module, *args, **kwargs):
            output = self.fn_ref.original_forward(*args, **kwargs)
            return state.after_first(_hidden_states(args, kwargs), output)

    class LaterBlock(ModelHook):
        def __init__(self, last: bool):
            super().__init__()
            self.last = last

        def new_forward(self, module, *args, **kwargs):
            if state.skip_rest:
                return _hidden_states(args, kwargs)
            output = self.fn_ref.original_forward(*args, **kwargs)
            return state.after_last(output) if self.last else output

    return FirstBlock, LaterBlock


@contextlib.contextmanager
def _first_block(transformer, images: int, steps: int, cache: StepCache, passes: Passes) -> Iterator[None]:
    from diffusers.hooks import HookRegistry

    blocks = list(transformer.transformer_blocks)
    if len(blocks) < 2:  # nothing after the first block to skip
        passes.full_steps = [steps] * images
        yield
        return
    state = _FirstBlockState(images, cache.threshold, lambda step: step < cache.warmup or step >= steps - cache.cooldown,
                             passes)
    first_hook, later_hook = _first_block_hooks(state)
    registries = [HookRegistry.check_if_exists_or_initialize(block) for block in blocks]
    registries[0].register_hook(first_hook(), _FIRST_BLOCK_HOOK)
    for index, registry in enumerate(registries[1:], start=1):
        registry.register_hook(later_hook(last=index == len(blocks) - 1), _FIRST_BLOCK_HOOK)
    try:
        yield
    finally:
        for registry in registries:
            registry.remove_hook(_FIRST_BLOCK_HOOK, recurse=False)


# -- TaylorSeer ---------------------------------------------------------------------------------
@contextlib.contextmanager
def _taylorseer(transformer, steps: int, cache: StepCache, passes: Passes, lite: bool) -> Iterator[None]:
    from diffusers.hooks import HookRegistry, TaylorSeerCacheConfig, apply_taylorseer_cache
    from diffusers.hooks.hooks import CacheContext
    from diffusers.hooks.taylorseer_cache import _TAYLORSEER_CACHE_HOOK

    config = TaylorSeerCacheConfig(cache_interval=cache.interval, disable_cache_before_step=cache.warmup,
                                   disable_cache_after_step=steps - cache.cooldown if cache.cooldown else None,
                                   max_order=1, taylor_factors_dtype=transformer.dtype,
                                   cache_identifiers=None if lite else [TAYLORSEER_MODULES], use_lite_mode=lite)
    apply_taylorseer_cache(transformer, config)
    hooked = [module for module in transformer.modules()
              if _TAYLORSEER_CACHE_HOOK in getattr(getattr(module, "_diffusers_hook", None), "hooks", {})]
    hooks = [module._diffusers_hook.hooks[_TAYLORSEER_CACHE_HOOK] for module in hooked]
    context = CacheContext("pixart-sigma")
    for hook in hooks:
        hook.state_manager.set_context(context)

    def count(module, inputs, output):  # after the first hooked module: did this step run it in full?
        state = hooks[0].state_manager.get_state()
        if state.last_update_step == state.current_step:
            passes.full_steps = [steps + 1 for steps in passes.full_steps]

    counter = hooked[0].register_forward_hook(count) if hooked else None
    try:
        yield
    finally:
        if counter is not None:
            counter.remove()
        for hook in hooks:
            hook.state_manager.reset()
        HookRegistry.check_if_exists_or_initialize(transformer).remove_hook(_TAYLORSEER_CACHE_HOOK, recurse=True)


@contextlib.contextmanager
def session(transformer, cache: StepCache, images: int, steps: int,
            passes: Optional[Passes] = None) -> Iterator[Passes]:
    """Install `cache` on `transformer` for one denoising call over `images` images; removed on exit.

    Yields the call's `Passes` (full transformer steps per image; `passes` if given), filled in as the call runs.
    """
    passes = passes or Passes(images)
    if cache.method == "off":
        passes.full_steps = [steps] * images
        yield passes
    elif cache.method == "first-block":
        with _first_block(transformer, images, steps, cache, passes):
            yield passes
    elif cache.method in ("taylorseer", "taylorseer-lite"):
        with _taylorseer(transformer, steps, cache, passes, lite=cache.method == "taylorseer-lite"):
            yield passes
    else:
        raise ValueError(f"step_cache={cache.method!r} is not a step cache")
