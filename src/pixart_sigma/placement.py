"""Memory modes: where the T5 encoder, the transformer and the VAE wait between uses.

The modes (settings.MEMORY_MODES) only move weights; every part still runs on the chosen device
in the chosen dtype, so no mode changes a pixel. `auto` is decided once, when a model loads, from
the device's free memory and the parts' sizes (read from the safetensors headers, no weights).
"""

from __future__ import annotations

import logging
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch

log = logging.getLogger(__name__)

OFFLOAD_DEVICE = torch.device("cpu")
# Activations on top of the weights, with the VAE decode: at 1024² in bfloat16 the H200 measured
# 12.6 GiB peak for 10.9 GiB of weights; 2048² needs more (use vae_tiling there on small cards).
ACTIVATION_RESERVE = 3 << 30
PARTS = ("text_encoder", "transformer", "vae")  # the parts with weights; tokenizer and scheduler have none
# Which parts wait off the device in each mode (sequential-offload streams every part block by block).
OFFLOADED = {
    "resident": (),
    "text-offload": ("text_encoder",),
    "model-offload": PARTS,
    "sequential-offload": PARTS,
}


@dataclass(frozen=True)
class PartSizes:
    """Bytes of each part's weights in the dtype it will be loaded in."""

    text_encoder: int
    transformer: int
    vae: int


def choose_mode(free_bytes: int, sizes: PartSizes, reserve: int = ACTIVATION_RESERVE) -> str:
    """The fastest mode whose peak fits `free_bytes`: the peak of each mode, from what it holds at once."""
    peaks = {
        "resident": sizes.text_encoder + sizes.transformer + sizes.vae + reserve,
        # T5 alone while encoding; then the transformer and the VAE with the activations.
        "text-offload": max(sizes.text_encoder + sizes.transformer + sizes.vae,
                            sizes.transformer + sizes.vae + reserve),
        "model-offload": max(sizes.text_encoder, sizes.transformer + reserve, sizes.vae + reserve),
    }
    for mode, peak in peaks.items():
        if peak <= free_bytes:
            return mode
    return "sequential-offload"


def resolve_mode(mode: str, device: torch.device, sizes_of) -> str:
    """`auto` made concrete for `device`; `sizes_of()` is called only when the free memory matters."""
    if mode != "auto":
        return mode
    if device.type != "cuda":
        return "resident"  # the CPU has nowhere else to put them; mps shares the RAM
    free, _total = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)  # cached by torch, reusable
    chosen = choose_mode(free, sizes_of())
    log.info("memory=auto chose %s for %.1f GiB free on %s", chosen, free / 2**30, device)
    return chosen


def place(module: torch.nn.Module, mode: str, part: str, device: torch.device) -> None:
    """Put a part where `mode` keeps it between uses: streamed block by block, off the device, or on it."""
    if mode == "sequential-offload":
        stream_blocks(module.to(OFFLOAD_DEVICE), device, part)
    else:
        module.to(OFFLOAD_DEVICE if part in OFFLOADED[mode] else device)


# Where a part's block lists sit below its top level: group offloading looks only one level down,
# and T5EncoderModel keeps its 24 blocks in `encoder.block` (else the whole 9.5 GB T5 is one group).
BLOCK_MODULES = {"text_encoder": ["encoder"], "vae": ["encoder", "decoder"]}
KEEPERS = "_pixart_sigma_keepers"  # on a part: the engines whose mode keeps it on the device


def _all_on(module: torch.nn.Module, device: torch.device) -> bool:
    return all(tensor.device == device for tensor in module.parameters())


def stream_blocks(module: torch.nn.Module, device: torch.device, part: str) -> None:
    """Sequential offload: diffusers' group offloading moves one block at a time to `device` as it runs.

    With CUDA streams the next block's copy overlaps the current block's compute; low_cpu_mem_usage
    pins each block as it goes instead of a pinned copy of every weight (twice the RAM for a moment).
    """
    from diffusers.hooks import apply_group_offloading

    apply_group_offloading(module, onload_device=device, offload_device=OFFLOAD_DEVICE, offload_type="block_level",
                           num_blocks_per_group=1, use_stream=device.type == "cuda", low_cpu_mem_usage=True,
                           block_modules=BLOCK_MODULES.get(part))


class Placement:
    """Puts each part on the device for the time it runs, as the engine's memory mode says."""

    def __init__(self, mode: str, device: torch.device, parts: dict[str, torch.nn.Module]):
        self.mode, self.device, self.parts = mode, device, parts
        # A part shared with an engine that keeps it on the device stays there (no moving it back and forth).
        for name, module in parts.items():
            if name not in OFFLOADED[mode]:
                keepers = module.__dict__.setdefault(KEEPERS, weakref.WeakSet())
                keepers.add(self)

    def resident_parts(self) -> list[torch.nn.Module]:
        """The parts this mode keeps on the device between calls (what the warm-model budget counts)."""
        return [module for name, module in self.parts.items() if name not in OFFLOADED[self.mode]]

    def settle(self) -> None:
        """Put each part where this mode keeps it between uses (for a pipeline the user hands over)."""
        for name, module in self.parts.items():
            place(module, self.mode, name, self.device)

    @contextmanager
    def using(self, part: str) -> Iterator[torch.nn.Module]:
        """The part on the device while the block runs; back off it afterwards if this mode offloads it."""
        module = self.parts[part]
        if self.mode == "sequential-offload":  # its hooks move the blocks
            yield module
            return
        # Parts are shared between checkpoints whose engines may have other modes: look, then move.
        try:
            if not _all_on(module, self.device):
                module.to(self.device)
            yield module
        finally:
            # Back off the device when this mode says so (also after a failed move: never half there),
            # unless an engine sharing the part keeps it on the device.
            kept = bool(module.__dict__.get(KEEPERS))  # a WeakSet: empty once those engines are gone
            if part in OFFLOADED[self.mode] and self.device != OFFLOAD_DEVICE and not kept:
                module.to(OFFLOAD_DEVICE)
