"""Our `generate` beside diffusers' PixArtSigmaPipeline, same weights, same process.

Builds the release architecture with random weights (DiT-XL/2 611 M, T5-XXL encoder 4.76 B,
SDXL VAE) -- the same compute as the real checkpoint -- and times, per resolution:
end to end (ours with a cold, a new-prompt and a warm prompt cache, and without the text K/V cache;
diffusers in --dtype and in our dtype, as `torch_dtype=` gives it), transformer passes per image, T5
encode, one DiT step (CFG batch), VAE decode, peak GPU memory, and our images' drift (PSNR) from
diffusers'. Ours runs in what dtype=auto picks (on a CPU with native bfloat16: bfloat16). Then each
step_cache at its defaults (time, passes, PSNR against no cache), images/s with several prompts per
call, each memory mode (time, peak, same pixels), and VAE tiling at the largest size. Prints Markdown
tables; --json writes the rows.

    python benchmarks/benchmark.py                       # GPU: 512, 1024, 2048 at 20 steps (2 min on an H200)
    python benchmarks/benchmark.py --preset cpu-small    # CPU: 2-layer DiT and T5 at full width, 256 px
    python benchmarks/benchmark.py --preset cpu-cache --step-cache-only  # CPU: step_cache at the DiT's full depth
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from pixart_sigma import PixArtSigmaModel  # noqa: E402
from pixart_sigma.testing import PIXART_SCHEDULER_CONFIG, tiny_components, tiny_tokenizer  # noqa: E402

PROMPT = "a photo of a red fox sitting in the snow at sunset, highly detailed"
PRESETS = {
    "full": dict(dit_layers=28, t5_layers=24, sizes=[512, 1024, 2048], steps=20, repeats=3, batches=[1, 4, 8]),
    "cpu-small": dict(dit_layers=2, t5_layers=2, sizes=[256], steps=4, repeats=2, batches=[1, 4]),
    # step_cache on a CPU: the release DiT's full depth (28 blocks), where the transformer dominates, at 20 steps
    "cpu-cache": dict(dit_layers=28, t5_layers=2, sizes=[256], steps=20, repeats=2, batches=[1]),
    # the test suite's check that every section runs: its tiny test model (seconds, not minutes)
    "smoke": dict(dit_layers=0, t5_layers=0, sizes=[64], steps=2, repeats=1, batches=[1, 2]),
}


def build_pipeline(dit_layers: int, t5_layers: int, dtype: torch.dtype, device: torch.device):
    """The release architecture with `dit_layers` and `t5_layers`; 0 and 0: the test suite's tiny model."""
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    if not dit_layers and not t5_layers:
        pipe = PixArtSigmaPipeline(**tiny_components()).to(device, dtype)
        for module in (pipe.transformer, pipe.text_encoder, pipe.vae):
            module.eval()  # T5's dropout is on in a module built in code
        pipe.set_progress_bar_config(disable=True)
        return pipe

    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build straight in the target dtype: T5-XXL is 19 GB in float32
    try:
        with torch.device(device):
            transformer = PixArtTransformer2DModel(
                sample_size=128, num_layers=dit_layers, patch_size=2, attention_head_dim=72, num_attention_heads=16,
                caption_channels=4096, cross_attention_dim=1152, in_channels=4, out_channels=8,
                norm_type="ada_norm_single", use_additional_conditions=False)
            text_encoder = T5EncoderModel(T5Config(
                vocab_size=32128, d_model=4096, d_ff=10240, num_layers=t5_layers, num_heads=64, d_kv=64,
                feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False))
            vae = AutoencoderKL(
                block_out_channels=[128, 256, 512, 512], in_channels=3, out_channels=3, latent_channels=4,
                down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                layers_per_block=2, sample_size=1024, scaling_factor=0.13025)
    finally:
        torch.set_default_dtype(previous)
    for module in (transformer, text_encoder, vae):
        module.eval()  # as from_pretrained leaves them: a new module is in training mode (T5's dropout on)
    pipe = PixArtSigmaPipeline(tokenizer=tiny_tokenizer(), text_encoder=text_encoder, vae=vae, transformer=transformer,
                               scheduler=DPMSolverMultistepScheduler(**PIXART_SCHEDULER_CONFIG))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device, fn, repeats):
    """Median seconds and peak GPU GiB over `repeats` runs after one warm-up."""
    fn()
    times, peak = [], 0.0
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
        if device.type == "cuda":
            peak = max(peak, torch.cuda.max_memory_allocated(device) / 2**30)
    return statistics.median(times), peak


def psnr(a, b) -> float:
    """Peak signal-to-noise ratio of two 8-bit images in dB (inf when identical)."""
    import numpy as np

    x, y = (np.asarray(image.convert("RGB"), dtype=np.float64) for image in (a, b))
    mse = float(np.mean((x - y) ** 2))
    return float("inf") if mse == 0 else 10 * math.log10(255**2 / mse)


class TransformerCalls:
    """Counts a transformer's forward calls (one per step: the guidance rows run in the same call)."""

    def __init__(self, transformer):
        self.count = 0
        self.handle = transformer.register_forward_hook(self._add)

    def _add(self, *_):
        self.count += 1

    def close(self):
        self.handle.remove()


def diffusers_call(pipe, size: int, steps: int):
    """The baseline: diffusers' own PixArtSigmaPipeline.__call__, seeded."""
    def theirs():
        return pipe(PROMPT, num_inference_steps=steps, guidance_scale=4.5, width=size, height=size,
                    generator=torch.Generator("cpu").manual_seed(0), use_resolution_binning=False,
                    clean_caption=False).images
    return theirs


def bench_size(model: PixArtSigmaModel, pipe, same_dtype_pipe, size: int, steps: int, repeats: int, device) -> dict:
    """Ours against diffusers in its default dtype (`pipe`) and in ours (`same_dtype_pipe`, bfloat16 on a CPU
    that has it), and ours without the text cache, all on the same weights; transformer passes per image."""
    from pixart_sigma import text_cache

    engine = model.engine
    call = dict(seed=0, num_inference_steps=steps, guidance_scale=4.5, width=size, height=size,
                use_resolution_binning=False)

    def ours_cold():
        engine.text.clear()
        return model.generate(PROMPT, **call)

    prompts = (f"{PROMPT}, take {k}" for k in range(1000))

    def ours_new_prompt():  # a prompt never seen; the negative prompt ("") cached, as after a session's first call
        return model.generate(next(prompts), **call)

    theirs, theirs_same = diffusers_call(pipe, size, steps), diffusers_call(same_dtype_pipe, size, steps)
    row = {"size": size, "steps": steps}
    row["diffusers_s"], row["diffusers_peak_gib"] = timed(device, theirs, repeats)
    row["diffusers_same_dtype_s"], _ = timed(device, theirs_same, repeats)
    row["ours_cold_s"], row["ours_peak_gib"] = timed(device, ours_cold, repeats)
    row["ours_warm_s"], row["ours_warm_peak_gib"] = timed(device, lambda: model.generate(PROMPT, **call), repeats)
    row["ours_new_prompt_s"], _ = timed(device, ours_new_prompt, repeats)
    session = text_cache.session
    text_cache.session = lambda transformer, embeds: contextlib.nullcontext()  # the text's K/V at every step
    try:
        row["ours_no_text_cache_s"], _ = timed(device, ours_cold, repeats)
    finally:
        text_cache.session = session
    counter = TransformerCalls(same_dtype_pipe.transformer)
    theirs_same()
    counter.close()
    row["diffusers_passes"] = counter.count
    # Drift of our images (in our dtype) from diffusers' (in the baseline's): inf when identical.
    image = model.generate(PROMPT, **call)[0]
    row["ours_passes"] = json.loads(image.info["pixart_sigma"])["full_transformer_steps"]
    row["psnr_db"] = psnr(image, theirs()[0])
    row["psnr_same_dtype_db"] = psnr(image, theirs_same()[0])

    text_encoder = engine.pipeline.text_encoder
    with torch.inference_mode():
        row["t5_ms"] = timed(device, lambda: engine.encode(PROMPT, 300, use_cache=False), repeats)[0] * 1e3
        text, negative = engine.encode(PROMPT, 300), engine.encode("", 300)
        embeds = torch.cat([negative.embeds, text.embeds]).to(engine.dtype)
        mask = torch.cat([negative.mask, text.mask])
        latents = torch.randn(2, 4, size // 8, size // 8, device=device, dtype=engine.dtype)
        timestep = torch.tensor([500, 500], device=device)
        transformer = engine.pipeline.transformer
        row["dit_step_ms"] = timed(device, lambda: transformer(
            latents, encoder_hidden_states=embeds, encoder_attention_mask=mask, timestep=timestep,
            added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False), repeats)[0] * 1e3
        row["vae_ms"] = timed(device, lambda: engine.decode(latents[:1]), repeats)[0] * 1e3
    row["speedup"] = row["diffusers_s"] / row["ours_cold_s"]
    row["speedup_same_dtype"] = row["diffusers_same_dtype_s"] / row["ours_cold_s"]
    row["speedup_same_dtype_new_prompt"] = row["diffusers_same_dtype_s"] / row["ours_new_prompt_s"]
    row["speedup_same_dtype_warm"] = row["diffusers_same_dtype_s"] / row["ours_warm_s"]
    row["text_cache_speedup"] = row["ours_no_text_cache_s"] / row["ours_cold_s"]
    row["text_encoder_dtype"] = str(text_encoder.dtype)
    return row


def bench_step_cache(model: PixArtSigmaModel, size: int, steps: int, repeats: int, device) -> list[dict]:
    """Each step cache at its default parameters against ours without one: time (prompt cached), full transformer
    passes per image, PSNR against the uncached image. Random weights: the passes first-block skips here say
    nothing about a trained model's (tools/evaluate_step_cache.py measures the demo model's)."""
    from pixart_sigma.settings import STEP_CACHES

    call = dict(seed=0, num_inference_steps=steps, guidance_scale=4.5, width=size, height=size,
                use_resolution_binning=False)
    def run(method):
        return model.generate(PROMPT, step_cache=method, **call)

    images = {method: run(method)[0] for method in STEP_CACHES}  # warm-up, and the images compared
    times: dict[str, list[float]] = {method: [] for method in STEP_CACHES}
    peaks = dict.fromkeys(STEP_CACHES, 0.0)
    for _ in range(repeats):  # round-robin: a machine that slows down mid-run slows every method alike
        for method in STEP_CACHES:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            sync(device)
            start = time.perf_counter()
            run(method)
            sync(device)
            times[method].append(time.perf_counter() - start)
            if device.type == "cuda":
                peaks[method] = max(peaks[method], torch.cuda.max_memory_allocated(device) / 2**30)
    rows = []
    for method in STEP_CACHES:
        image = images[method]
        rows.append({"step_cache": method, "size": size, "steps": steps, "s": statistics.median(times[method]),
                     "passes": json.loads(image.info["pixart_sigma"])["full_transformer_steps"],
                     "psnr_db": psnr(image, images["off"]), "peak_gib": peaks[method]})
    for row in rows:
        row["speedup"] = rows[0]["s"] / row["s"]
    return rows


def bench_batching(model: PixArtSigmaModel, size: int, steps: int, repeats: int, device, batches) -> list[dict]:
    """Images per second with several prompts denoised together (generate_many), prompts cached."""
    prompts = [f"{PROMPT}, variation {k}" for k in range(max(batches))]
    call = dict(num_inference_steps=steps, guidance_scale=4.5, width=size, height=size, use_resolution_binning=False)
    rows = []
    for batch in batches:
        seconds, peak = timed(device, lambda: model.generate_many(prompts[:batch], seeds=list(range(batch)), **call),
                              repeats)
        rows.append({"size": size, "batch": batch, "images_per_s": batch / seconds, "s": seconds, "peak_gib": peak})
    base = rows[0]["images_per_s"]
    for row in rows:
        row["vs_batch_1"] = row["images_per_s"] / base
    return rows


def bench_memory_modes(pipe, size: int, steps: int, repeats: int, device) -> list[dict]:
    """Each memory mode on the same modules: time with a new and a cached prompt, peak memory, same pixels."""
    call = dict(seed=0, num_inference_steps=steps, guidance_scale=4.5, width=size, height=size,
                use_resolution_binning=False)
    rows, reference = [], None
    for mode in ("resident", "text-offload", "model-offload", "sequential-offload"):  # sequential last: its hooks stay
        if mode != "sequential-offload":
            pipe.to(device)
        model = PixArtSigmaModel.from_pipeline(pipe, memory=mode)
        engine = model.engine

        def cold():
            engine.text.clear()
            return model.generate(PROMPT, **call)

        row = {"mode": mode, "size": size}
        row["new_prompt_s"], row["new_prompt_peak_gib"] = timed(device, cold, repeats)
        row["cached_prompt_s"], row["cached_prompt_peak_gib"] = timed(device, lambda: model.generate(PROMPT, **call),
                                                                      repeats)
        image = model.generate(PROMPT, **call)[0]
        reference = reference or image
        row["same_pixels"] = psnr(image, reference) == float("inf")
        rows.append(row)
    return rows


def bench_compile(model: PixArtSigmaModel, size: int, steps: int, repeats: int, device) -> dict:
    """compile=True against the eager run: the first image (compiling), then steady state, and the drift."""
    call = dict(seed=0, num_inference_steps=steps, guidance_scale=4.5, width=size, height=size,
                use_resolution_binning=False)
    row = {"size": size}
    row["eager_s"], row["eager_peak_gib"] = timed(device, lambda: model.generate(PROMPT, **call), repeats)
    sync(device)
    start = time.perf_counter()
    fast = model.generate(PROMPT, compile=True, **call)[0]
    sync(device)
    row["first_image_s"] = time.perf_counter() - start
    row["compiled_s"], row["compiled_peak_gib"] = timed(device, lambda: model.generate(PROMPT, compile=True, **call),
                                                        repeats)
    row["speedup"] = row["eager_s"] / row["compiled_s"]
    row["psnr_db"] = psnr(fast, model.generate(PROMPT, **call)[0])
    return row


def bench_vae_tiling(model: PixArtSigmaModel, size: int, steps: int, device) -> dict:
    call = dict(seed=0, num_inference_steps=steps, guidance_scale=4.5, width=size, height=size,
                use_resolution_binning=False)
    row = {"size": size}
    for tiled in (False, True):
        seconds, peak = timed(device, lambda: model.generate(PROMPT, vae_tiling=tiled, **call), 1)
        row[f"{'tiled' if tiled else 'whole'}_s"], row[f"{'tiled' if tiled else 'whole'}_peak_gib"] = seconds, peak
    row["psnr_db"] = psnr(model.generate(PROMPT, vae_tiling=True, **call)[0], model.generate(PROMPT, **call)[0])
    return row


def ours_pipeline(pipe, device):
    """The baseline's modules in the dtypes our dtype=auto picks on this device (a copy when they differ)."""
    from pixart_sigma.checkpoints import vae_dtype
    from pixart_sigma.devices import resolve_dtype, text_encoder_dtype

    dtype = resolve_dtype("auto", device)
    text_dtype = text_encoder_dtype("auto", "auto", device, dtype)
    if pipe.transformer.dtype == dtype and pipe.text_encoder.dtype == text_dtype:
        return pipe
    ours = copy.deepcopy(pipe)
    ours.transformer.to(dtype)
    ours.vae.to(vae_dtype(dtype))
    ours.text_encoder.to(text_dtype)
    return ours


def same_dtype(pipe, device):
    """The baseline in the dtype ours picks (all parts, as `torch_dtype=` does): the same pipe when it already is."""
    from pixart_sigma.devices import resolve_dtype

    dtype = resolve_dtype("auto", device)
    return pipe if pipe.transformer.dtype == dtype else copy.deepcopy(pipe).to(dtype=dtype)


def weight_gib(pipe) -> float:
    return sum(t.numel() * t.element_size() for part in (pipe.transformer, pipe.text_encoder, pipe.vae)
               for t in part.parameters()) / 2**30


def table(rows: list[dict], columns: dict[str, str]) -> str:
    lines = ["| " + " | ".join(columns.values()) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = []
        for key in columns:
            value = row[key]
            cells.append(f"{value:.3f}" if isinstance(value, float) else str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=PRESETS, default="full" if torch.cuda.is_available() else "cpu-small")
    parser.add_argument("--dtype", default=None, help="the baseline's dtype (default: bfloat16 on GPU, float32 on CPU); "
                        "ours uses what dtype=auto picks on this device")
    parser.add_argument("--sizes", type=int, nargs="*", help="override the preset's resolutions")
    parser.add_argument("--batches", type=int, nargs="*", help="prompts per call for the batching rows (default: the "
                        "preset's; full: 1 4 8)")
    parser.add_argument("--no-extras", action="store_true", help="only the ours-against-diffusers rows")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=torch.cuda.is_available(),
                        help="also time compile=True (default: on a GPU; about a minute of compiling per size)")
    parser.add_argument("--step-cache", action=argparse.BooleanOptionalAction, default=None,
                        help="also time each step_cache at 20 steps (default: with --preset full and cpu-cache)")
    parser.add_argument("--step-cache-only", action="store_true", help="only the step_cache rows (with --preset "
                        "cpu-cache: the other rows would take an hour on 2 cores at full depth)")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args()
    preset = PRESETS[args.preset]
    if args.step_cache is None:
        args.step_cache = args.preset in ("full", "cpu-cache")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"

    start = time.perf_counter()
    pipe = build_pipeline(preset["dit_layers"], preset["t5_layers"], dtype, device)
    same_dtype_pipe = same_dtype(pipe, device)  # what a diffusers user gets with torch_dtype=<our dtype>
    mine = ours_pipeline(pipe, device)
    model = PixArtSigmaModel.from_pipeline(mine)  # the very same weights as the baseline, in our dtypes
    print(f"# {name}, preset {args.preset}, baseline {dtype}, ours {model.engine.dtype} (T5 "
          f"{mine.text_encoder.dtype}), weights {weight_gib(pipe):.2f} / {weight_gib(mine):.2f} GiB, built in "
          f"{time.perf_counter() - start:.1f} s", flush=True)

    sizes = args.sizes or preset["sizes"]
    report = {"device": name, "preset": args.preset, "dtype": str(dtype), "ours_dtype": str(model.engine.dtype),
              "rows": []}
    for size in [] if args.step_cache_only else sizes:
        report["rows"].append(bench_size(model, pipe, same_dtype_pipe, size, preset["steps"], preset["repeats"],
                                         device))
        print(json.dumps(report["rows"][-1]), flush=True)
    middle = 1024 if 1024 in sizes else sizes[0]
    if args.step_cache or args.step_cache_only:
        report["step_cache"] = bench_step_cache(model, middle, 20, preset["repeats"], device)
        print(json.dumps(report["step_cache"]), flush=True)
    if not args.no_extras and not args.step_cache_only:
        report["batching"] = bench_batching(model, middle, preset["steps"], preset["repeats"], device,
                                           args.batches or preset["batches"])
        print(json.dumps(report["batching"]), flush=True)
        if device.type == "cuda" and max(sizes) >= 2048:
            report["vae_tiling"] = bench_vae_tiling(model, max(sizes), preset["steps"], device)
            print(json.dumps(report["vae_tiling"]), flush=True)
    if args.compile and not args.step_cache_only:
        report["compile"] = [bench_compile(model, size, preset["steps"], preset["repeats"], device) for size in sizes]
        print(json.dumps(report["compile"]), flush=True)
    if not args.no_extras and not args.step_cache_only:  # last: sequential-offload leaves offloading hooks on the modules
        report["memory_modes"] = bench_memory_modes(mine, middle, preset["steps"], preset["repeats"], device)
        print(json.dumps(report["memory_modes"]), flush=True)
    report["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

    print()
    print(table(report["rows"], {"size": "size", "steps": "steps", "diffusers_s": "diffusers s",
                                 "diffusers_same_dtype_s": "diffusers s (our dtype)",
                                 "ours_cold_s": "ours s (cold cache)", "ours_warm_s": "ours s (warm cache)",
                                 "ours_new_prompt_s": "ours s (new prompt, negative cached)",
                                 "speedup": "speed-up (cold)", "speedup_same_dtype": "vs same dtype (cold)",
                                 "speedup_same_dtype_new_prompt": "vs same dtype (new prompt)",
                                 "speedup_same_dtype_warm": "vs same dtype (warm)",
                                 "ours_no_text_cache_s": "ours s without text K/V cache",
                                 "text_cache_speedup": "text K/V cache speed-up",
                                 "diffusers_passes": "transformer passes/image diffusers",
                                 "ours_passes": "transformer passes/image ours",
                                 "psnr_db": "PSNR vs diffusers dB", "psnr_same_dtype_db": "PSNR vs diffusers same dtype dB",
                                 "t5_ms": "T5 ms",
                                 "dit_step_ms": "DiT step ms", "vae_ms": "VAE ms",
                                 "diffusers_peak_gib": "peak GiB diffusers", "ours_peak_gib": "peak GiB ours",
                                 "ours_warm_peak_gib": "peak GiB ours (cached prompt)"}))
    if "step_cache" in report:
        print()
        print(table(report["step_cache"], {"step_cache": "step_cache (defaults)", "size": "size", "steps": "steps",
                                           "s": "s (prompt cached)", "speedup": "speed-up vs off",
                                           "passes": "transformer passes/image", "psnr_db": "PSNR vs off dB",
                                           "peak_gib": "peak GiB"}))
    if "batching" in report:
        print()
        print(table(report["batching"], {"size": "size", "batch": "prompts per call", "images_per_s": "images/s",
                                         "vs_batch_1": "vs 1 per call", "peak_gib": "peak GiB"}))
    if "memory_modes" in report:
        print()
        print(table(report["memory_modes"], {"mode": "memory", "size": "size", "new_prompt_s": "s (new prompt)",
                                             "new_prompt_peak_gib": "peak GiB (new prompt)",
                                             "cached_prompt_s": "s (cached prompt)",
                                             "cached_prompt_peak_gib": "peak GiB (cached prompt)",
                                             "same_pixels": "same pixels as resident"}))
    if "compile" in report:
        print()
        print(table(report["compile"], {"size": "size", "eager_s": "eager s", "first_image_s": "first image s (compiling)",
                                        "compiled_s": "compiled s", "speedup": "speed-up",
                                        "psnr_db": "PSNR vs eager dB", "compiled_peak_gib": "peak GiB"}))
    if "vae_tiling" in report:
        print()
        print(table([report["vae_tiling"]], {"size": "size", "whole_s": "whole s", "whole_peak_gib": "whole peak GiB",
                                             "tiled_s": "tiled s", "tiled_peak_gib": "tiled peak GiB",
                                             "psnr_db": "PSNR tiled vs whole dB"}))
    print(f"\npeak RSS of the process {report['peak_rss_gib']:.2f} GiB (GPU peaks are 0 on the CPU: not measured)")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
