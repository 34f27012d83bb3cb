"""What a LoRA costs per step: base calls against calls with one repeated LoRA set, alternating in one process.

The set is fused into the transformer at its first call and found fused by the next ones (loras.fuse), so a
repeated set should cost what the base model costs; switching sets costs one fuse, timed apart. Two measures:
blocks of whole calls (base calls, then calls with the set), and single denoiser steps in pairs (base, then
fused) whose ratio holds on a machine shared with other work, where whole-call timings drift. The LoRA
targets every Linear of every block (rank 16): the most a LoRA touches.

    python benchmarks/lora_benchmark.py                       # demo model, 20 steps, 5 rounds of 3 calls each
    python benchmarks/lora_benchmark.py --model-name demo --steps 10 --rounds 3 --calls 2
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from pixart_sigma import PixArtSigmaModel
from pixart_sigma.lora_formats import Lora, LoraWeights, transformer_targets, write_lora
from pixart_sigma.loras import fuse, prepare_loras

PROMPT = "a large red circle on a blue background"
RANK = 16


def every_block_linear(config) -> Lora:
    g = torch.Generator().manual_seed(0)
    weights = {}
    for name, target in transformer_targets(config).items():
        if name.startswith("transformer_blocks.") and not target.kernel:
            weights[name] = LoraWeights(torch.randn(RANK, target.in_features, generator=g) * 0.02,
                                        torch.randn(target.out_features, RANK, generator=g) * 0.02, float(RANK))
    return Lora(weights)


def seconds_per_step(model: PixArtSigmaModel, steps: int, **call) -> float:
    start = time.perf_counter()
    model.generate(PROMPT, num_inference_steps=steps, **call)
    return (time.perf_counter() - start) / steps


def paired_step_ratio(model: PixArtSigmaModel, uses, pairs: int) -> tuple[float, float, float]:
    """One denoiser step with the base weights, then one with the set fused (the fuse itself untimed), `pairs`
    times: neighbours share the machine's load, so the median of the pairs' ratios survives a busy machine."""
    engine = model.engine
    transformer = engine.pipeline.transformer
    config = transformer.config
    latents = torch.randn(2, config.in_channels, config.sample_size, config.sample_size, dtype=engine.dtype)
    text = engine.encode(PROMPT, 300).embeds.expand(2, -1, -1)
    sizes = {"resolution": None, "aspect_ratio": None}

    def step() -> float:
        start = time.perf_counter()
        transformer(latents, encoder_hidden_states=text, timestep=torch.tensor([500, 500]), added_cond_kwargs=sizes)
        return time.perf_counter() - start

    base, fused = [], []
    with torch.inference_mode():
        for _ in range(pairs):
            fuse(transformer, [])
            base.append(step())
            fuse(transformer, uses)
            fused.append(step())
        fuse(transformer, [])
    ratios = [f / b for b, f in zip(base, fused)]
    return statistics.median(base), statistics.median(fused), statistics.median(ratios)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-name", default="demo")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5, help="base block then LoRA block, this many times")
    parser.add_argument("--calls", type=int, default=3, help="calls per block")
    parser.add_argument("--pairs", type=int, default=40, help="base step / LoRA step pairs")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        model = PixArtSigmaModel(model_name=args.model_name, seed=0, lora_dir=folder)
        transformer = model.engine.pipeline.transformer
        lora = every_block_linear(dict(transformer.config))
        write_lora(Path(folder) / "bench.safetensors", lora, "kohya")
        loras = [{"name": "bench", "scale": 0.8}]
        uses = prepare_loras(loras, transformer.config, Path(folder))
        seconds_per_step(model, args.steps)  # warm-up: kernels chosen, prompt cached
        seconds_per_step(model, args.steps, loras=loras)
        base, with_lora = [], []
        for _ in range(args.rounds):
            base += [seconds_per_step(model, args.steps) for _ in range(args.calls)]
            with_lora += [seconds_per_step(model, args.steps, loras=loras) for _ in range(args.calls)]
        paired = paired_step_ratio(model, uses, args.pairs)
        switches = []
        with torch.inference_mode():
            for _ in range(3):
                fuse(transformer, [])
                start = time.perf_counter()
                fuse(transformer, uses)
                switches.append(time.perf_counter() - start)
            fuse(transformer, [])

    b, lo = statistics.median(base), statistics.median(with_lora)
    fastest_b, fastest_lo = min(base), min(with_lora)  # on a shared machine the least disturbed call
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, model {args.model_name} ({model.settings['dtype']} -> "
          f"{str(model.engine.dtype)[6:]}), {args.steps} steps, {args.rounds}x{args.calls} calls each")
    print(f"LoRA: {len(lora.transformer)} modules, rank {RANK}")
    print(f"base: {b * 1000:.2f} ms/step (median), repeated LoRA set: {lo * 1000:.2f} ms/step")
    print(f"ratio LoRA / base: {lo / b:.3f} (medians), {fastest_lo / fastest_b:.3f} (fastest calls: "
          f"{fastest_b * 1000:.2f} / {fastest_lo * 1000:.2f} ms/step)")
    print(f"paired steps (guided batch of 2, the fuse between them untimed): base {paired[0] * 1000:.2f} ms, "
          f"LoRA {paired[1] * 1000:.2f} ms, median ratio {paired[2]:.3f}")
    print(f"switching sets (restore + fuse): {statistics.median(switches) * 1000:.1f} ms, once per change of set")


if __name__ == "__main__":
    main()
