"""What each step cache costs in meaning: the demo model's checker with and without it, on held-out prompts.

For every method and threshold/interval: full transformer steps per image (from the images' records), time
relative to no cache (same process, same prompts), PSNR against the uncached image, and each checker
attribute beside the uncached run's, with the difference in points (the bar: within 2 points).

    python tools/evaluate_step_cache.py                      # 360 held-out prompts, float32, 20 steps
    python tools/evaluate_step_cache.py --prompts 40 --runs "first-block:0.1" "taylorseer:2"

The demo model is small (64x64, 6 blocks): its times say little about a release model, where the
transformer dominates (benchmarks/benchmark.py --preset cpu-cache measures speed).
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np

from pixart_sigma import demo_world as world

ATTRIBUTES = ("background", "colour", "shape", "size", "position")
DEFAULT_RUNS = ("first-block:0.05", "first-block:0.1", "first-block:0.15", "first-block:0.2", "first-block:0.3",
                "taylorseer:2", "taylorseer:3", "taylorseer:4", "taylorseer-lite:2", "taylorseer-lite:3")
MAX_POINTS = 2.0  # the bar: every attribute within 2 points of the uncached run


def cache_settings(run: str) -> dict:
    """'first-block:0.1' -> step_cache and its threshold; 'taylorseer:3' -> step_cache and its interval."""
    method, _, value = run.partition(":")
    if method == "first-block":
        return {"step_cache": method, "step_cache_threshold": float(value)}
    if method in ("taylorseer", "taylorseer-lite"):
        return {"step_cache": method, "step_cache_interval": int(value)}
    raise SystemExit(f"--runs: {run!r} is not METHOD:VALUE (first-block:0.1 or taylorseer:3)")


def psnr(first, second) -> float:
    a, b = (np.asarray(image, dtype=np.float64) for image in (first, second))
    mse = float(((a - b) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=360, help="held-out prompts (half pairs, half wordings)")
    parser.add_argument("--runs", nargs="*", default=list(DEFAULT_RUNS), help="METHOD:VALUE, e.g. first-block:0.1")
    parser.add_argument("--dtype", default="float32", help="pinned: the checker's figures are measured in one dtype")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()

    prompts = world.evaluation_prompts(args.prompts)
    scenes = [scene for _, scene in prompts]
    common = {"dtype": args.dtype, "device": "cpu", "num_inference_steps": args.steps}
    world.generate_images(prompts[:2], **common)  # load and warm up before timing

    def run(settings: dict) -> tuple[list, float]:
        started = time.perf_counter()
        images = world.generate_images(prompts, **common, **settings)
        return images, time.perf_counter() - started

    baseline, baseline_seconds = run({})
    base_scores = world.score(scenes, baseline)
    rows = [{"run": "off", "full_steps": float(args.steps), "speed": 1.0, "psnr": math.inf, **base_scores}]
    for name in args.runs:
        images, seconds = run(cache_settings(name))
        scores = world.score(scenes, images)
        full = [json.loads(image.info["pixart_sigma"])["full_transformer_steps"] for image in images]
        rows.append({"run": name, "full_steps": float(np.mean(full)), "speed": baseline_seconds / seconds,
                     "psnr": float(np.median([psnr(a, b) for a, b in zip(baseline, images)])), **scores})
        print(f"{name}: done", flush=True)

    print(f"\n{len(prompts)} held-out prompts, {args.steps} steps of dpm-solver++, guidance 4.5, dtype {args.dtype}; "
          "points: the attribute's share minus the uncached run's\n")
    print("| step cache | full steps per image | speed (whole call, demo) | median PSNR vs off (dB) | "
          + " | ".join(ATTRIBUTES) + " | within 2 points |")
    print("|---|---|---|---|" + "---|" * len(ATTRIBUTES) + "---|")
    for row in rows:
        cells, worst = [], 0.0
        for attribute in ATTRIBUTES:
            points = 100 * (row[attribute] - base_scores[attribute])
            worst = max(worst, abs(points))
            cells.append(f"{row[attribute]:.1%}" + ("" if row["run"] == "off" else f" ({points:+.1f})"))
        verdict = "—" if row["run"] == "off" else ("yes" if worst <= MAX_POINTS else f"no ({worst:.1f})")
        psnr_text = "∞" if math.isinf(row["psnr"]) else f"{row['psnr']:.1f}"
        print(f"| {row['run']} | {row['full_steps']:.1f} | {row['speed']:.2f}× | {psnr_text} | "
              + " | ".join(cells) + f" | {verdict} |")
    if args.json:
        with open(args.json, "w") as file:
            json.dump(rows, file, indent=1)


if __name__ == "__main__":
    main()
