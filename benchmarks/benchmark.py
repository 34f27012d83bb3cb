"""Our `generate` beside diffusers' PixArtSigmaPipeline, same weights, same process.

Builds the release architecture with random weights (DiT-XL/2 611 M, T5-XXL encoder 4.76 B,
SDXL VAE) -- the same compute as the real checkpoint -- and times, per resolution:
end to end (ours with a cold and a warm prompt cache, diffusers), T5 encode, one DiT step
(CFG batch), VAE decode, and peak GPU memory. Prints a Markdown table; --json writes rows.

    python benchmarks/benchmark.py                       # GPU: 512, 1024, 2048 at 20 steps (2 min on an H200)
    python benchmarks/benchmark.py --preset cpu-small    # CPU: 2-layer DiT and T5 at full width, 256 px
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from pixart_sigma import PixArtSigmaModel  # noqa: E402
from pixart_sigma.testing import PIXART_SCHEDULER_CONFIG, tiny_tokenizer  # noqa: E402

PROMPT = "a photo of a red fox sitting in the snow at sunset, highly detailed"
PRESETS = {
    "full": dict(dit_layers=28, t5_layers=24, sizes=[512, 1024, 2048], steps=20, repeats=3),
    "cpu-small": dict(dit_layers=2, t5_layers=2, sizes=[256], steps=4, repeats=2),
    "smoke": dict(dit_layers=1, t5_layers=1, sizes=[64], steps=2, repeats=1),  # the test suite's check that it runs
}


def build_pipeline(dit_layers: int, t5_layers: int, dtype: torch.dtype, device: torch.device):
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel
    from transformers import T5Config, T5EncoderModel

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


def bench_size(model: PixArtSigmaModel, pipe, size: int, steps: int, repeats: int, device) -> dict:
    engine = model.engine
    call = dict(seed=0, num_inference_steps=steps, guidance_scale=4.5, width=size, height=size,
                use_resolution_binning=False)

    def ours_cold():
        engine.text.clear()
        model.generate(PROMPT, **call)

    def theirs():
        pipe(PROMPT, num_inference_steps=steps, guidance_scale=4.5, width=size, height=size,
             generator=torch.Generator("cpu").manual_seed(0), use_resolution_binning=False, clean_caption=False)

    row = {"size": size, "steps": steps}
    row["diffusers_s"], row["diffusers_peak_gib"] = timed(device, theirs, repeats)
    row["ours_cold_s"], row["ours_peak_gib"] = timed(device, ours_cold, repeats)
    row["ours_warm_s"], _ = timed(device, lambda: model.generate(PROMPT, **call), repeats)

    with torch.inference_mode():
        row["t5_ms"] = timed(device, lambda: engine.encode(PROMPT, 300, use_cache=False), repeats)[0] * 1e3
        text, negative = engine.encode(PROMPT, 300), engine.encode("", 300)
        embeds = torch.cat([negative.embeds, text.embeds])
        mask = torch.cat([negative.mask, text.mask])
        latents = torch.randn(2, 4, size // 8, size // 8, device=device, dtype=engine.dtype)
        timestep = torch.tensor([500, 500], device=device)
        row["dit_step_ms"] = timed(device, lambda: pipe.transformer(
            latents, encoder_hidden_states=embeds, encoder_attention_mask=mask, timestep=timestep,
            added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False), repeats)[0] * 1e3
        row["vae_ms"] = timed(device, lambda: engine.decode(latents[:1]), repeats)[0] * 1e3
    row["speedup"] = row["diffusers_s"] / row["ours_cold_s"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=PRESETS, default="full" if torch.cuda.is_available() else "cpu-small")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on GPU, float32 on CPU")
    parser.add_argument("--sizes", type=int, nargs="*", help="override the preset's resolutions")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args()
    preset = PRESETS[args.preset]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"

    start = time.perf_counter()
    pipe = build_pipeline(preset["dit_layers"], preset["t5_layers"], dtype, device)
    model = PixArtSigmaModel.from_pipeline(pipe)  # the very same modules as the baseline
    print(f"# {name}, preset {args.preset}, {dtype}, built in {time.perf_counter() - start:.1f} s", flush=True)

    rows = []
    for size in args.sizes or preset["sizes"]:
        rows.append(bench_size(model, pipe, size, preset["steps"], preset["repeats"], device))
        print(json.dumps(rows[-1]), flush=True)

    print(f"\n| size | steps | diffusers s | ours s (cold cache) | ours s (warm cache) | speed-up | T5 ms | "
          f"DiT step ms | VAE ms | peak GiB diffusers / ours |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['size']}² | {r['steps']} | {r['diffusers_s']:.3f} | {r['ours_cold_s']:.3f} | {r['ours_warm_s']:.3f} | "
              f"{r['speedup']:.2f}x | {r['t5_ms']:.1f} | {r['dit_step_ms']:.1f} | {r['vae_ms']:.1f} | "
              f"{r['diffusers_peak_gib']:.1f} / {r['ours_peak_gib']:.1f} |")
    if args.json:
        args.json.write_text(json.dumps({"device": name, "preset": args.preset, "dtype": str(dtype), "rows": rows},
                                        indent=2))
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
