"""`compile=True`: the transformer through torch.compile, its compiled code kept on disk.

At 512² and 1024² on a GPU, Python issuing kernels sets the pace of a denoising step; compiled
code fuses kernels, and CUDA graphs replay a whole step with one launch. CUDA graphs capture
the weights' addresses, so they are used only when the transformer never leaves the device.
Compiling takes about a minute per image size; the compiled code is cached on disk, so the next
process with the same size starts in seconds.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"  # torch's own variable: a user's setting wins
# Compiled variants kept per function: one per (size, batch, guidance on/off). Past torch's default
# of 8 further shapes would silently run uncompiled while their records say compile=True.
RECOMPILE_LIMIT = 64
# What a server operator weighs before letting clients ask for compile=true (measured: 20 s for the demo model).
COMPILE_COST = "20 s to a minute of compiling per new image size, and a growing disk cache"


def cache_dir() -> Path:
    """Where compiled code is kept: $TORCHINDUCTOR_CACHE_DIR, else ~/.cache/pixart-sigma/torch-compile."""
    configured = os.environ.get(CACHE_ENV)
    if configured:
        return Path(configured)
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "pixart-sigma" / "torch-compile"


def compile_mode(device: torch.device, resident: bool) -> str:
    """CUDA graphs ("reduce-overhead") only where the weights stay put; inductor's default elsewhere."""
    return "reduce-overhead" if device.type == "cuda" and resident else "default"


class CompiledDenoiser:
    """The transformer through torch.compile (the module itself is unchanged and still used uncompiled).

    Logs how long the first call of each input shape took (compiling happens there). Under CUDA graphs
    a call's outputs live in buffers the next replay overwrites, so each step's output is copied out.
    """

    def __init__(self, module: torch.nn.Module, device: torch.device, resident: bool):
        os.environ.setdefault(CACHE_ENV, str(cache_dir()))  # read by inductor when it first writes
        cache_dir().mkdir(parents=True, exist_ok=True)
        self.mode = compile_mode(device, resident)
        config = torch._dynamo.config
        for name in ("recompile_limit", "cache_size_limit"):  # the name changed across torch releases
            if hasattr(config, name):
                setattr(config, name, max(getattr(config, name), RECOMPILE_LIMIT))
        self.function = torch.compile(module, mode=self.mode, dynamic=False)
        self.first_call_seconds: dict[tuple, float] = {}

    def __call__(self, sample: torch.Tensor, *args, **kwargs):
        graphs = self.mode == "reduce-overhead"
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        shape = tuple(sample.shape)
        start = time.perf_counter()
        output = self.function(sample, *args, **kwargs)
        if shape not in self.first_call_seconds:
            self.first_call_seconds[shape] = time.perf_counter() - start
            log.info("compiled transformer for input %s: first call (compiling) took %.1f s", shape,
                     self.first_call_seconds[shape])
        return (output[0].clone(), *output[1:]) if graphs else output
