"""Score the demo model with the shapes-world checker and print the README's figures (markdown).

Everything goes through the public API (`PixArtSigmaModel(...).generate(prompt)`), at the default
settings unless a row says otherwise: 20 steps of DPM-Solver++, guidance 4.5, the native 64x64.

    python tools/evaluate_demo_model.py                    # the bundled demo, 360 held-out prompts
    python tools/evaluate_demo_model.py --model-name DIR --prompts 40
    python tools/evaluate_demo_model.py --grid docs/demo-grid.png  # the doc's picture, then stop
    python tools/evaluate_demo_model.py --device cuda --dtype float32  # the same on a GPU
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from PIL import Image

from pixart_sigma import demo_world as world
from pixart_sigma.checkpoints import load_pipeline, resolve_checkpoint
from pixart_sigma.settings import DTYPES, SCHEDULERS
from train_demo_model import vae_round_trip  # tools/, beside this script

ATTRIBUTES = ("background", "colour", "shape", "size", "position")


def row(label: str, scores: dict, count: int) -> str:
    cells = " | ".join(f"{scores[a]:.0%}" if a in scores else "–" for a in ATTRIBUTES)
    return f"| {label} | {count} | {cells} |"


def header(first: str) -> str:
    return f"| {first} | prompts | " + " | ".join(ATTRIBUTES) + " |\n|---|---|" + "---|" * len(ATTRIBUTES)


def write_grid(path: str, models: list) -> None:
    """Three rows of 8 pictures (128 px each) per model, one model below the other: the first 16
    held-out prompts, then the first 8 two-shape prompts."""
    prompts = world.evaluation_prompts(16) + world.two_shape_prompts(8)
    grid = Image.new("RGB", (8 * 64, 3 * 64 * len(models)))
    for row, model in enumerate(models):
        for k, image in enumerate(world.generate_images(prompts, **model)):
            grid.paste(image, (64 * (k % 8), 64 * (3 * row + k // 8)))
    grid.resize((grid.width * 2, grid.height * 2), Image.NEAREST).save(path)
    print("grid prompts, row by row: " + " · ".join(f"{k + 1}. {p}" for k, (p, _) in enumerate(prompts)))


def checker_on_renders(count: int) -> dict:
    scenes = world.rendered_scenes(count, seed=123)
    return world.score(scenes, [world.render(scene) for scene in scenes])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-name", default="demo")
    parser.add_argument("--prompts", type=int, default=360, help="held-out prompts (half pairs, half wordings; 120 read colour within about 3 points either way)")
    parser.add_argument("--negative-prompts", type=int, default=30, help="colourless prompts per colour")
    parser.add_argument("--grid", help="write a PNG grid here (the first 16 held-out prompts, then the first 8 "
                                       "two-shape prompts) and stop")
    parser.add_argument("--grid-above", nargs="*", default=[], metavar="MODEL",
                        help="with --grid: draw these models' rows above (e.g. an earlier checkpoint)")
    parser.add_argument("--device", default="cpu", help="where the pictures are generated (the README's figures: cpu)")
    parser.add_argument("--dtype", default="auto", choices=DTYPES, help="auto: bfloat16 where the CPU or GPU has it natively, else float32 (float16 on older GPUs)")
    parser.add_argument("--two-shape-prompts", type=int, default=200, help="prompts naming two shapes")
    parser.add_argument("--negative-trials", type=int, default=40, help="colourless prompts for the paired negative-prompt check (each drawn 6 or 7 times)")
    parser.add_argument("--only-held-out", action="store_true",
                        help="only the held-out, two-shape, guidance and paired negative-prompt figures (skip the "
                             "per-sampler and per-colour tables)")
    args = parser.parse_args()
    started = time.time()
    model = {"model_name": args.model_name, "device": args.device, "dtype": args.dtype}
    print(f"generating on {args.device} in dtype={args.dtype}\n")

    if args.grid:
        write_grid(args.grid, [dict(model, model_name=name) for name in args.grid_above] + [model])
        return
    print(header("checker on rendered pictures"))
    print(row("renderer's own pictures (all attributes named)", checker_on_renders(1000), 1000))
    vae = load_pipeline(resolve_checkpoint(args.model_name), torch.float32).vae
    round_trip = vae_round_trip(vae, 1000, seed=123)
    print(row("the same, decoded by the VAE from their exact latents", round_trip, 1000))
    print("| shape right per shape after the VAE | | " + ", ".join(f"{k} {v:.0%}" for k, v in round_trip["per_shape"].items()) + " | | | | |")
    two = world.two_shape_prompts(300, seed=123)
    print(f"| the checker on rendered two-shape pictures | 300 | "
          f"{world.two_shape_score([s for _, s in two], [world.render(s) for _, s in two]):.0%} | | | | |")

    prompts = world.evaluation_prompts(args.prompts)
    scenes = [scene for _, scene in prompts]
    print()
    print(header("held-out prompts"))
    for guidance in (4.5, 1.0):
        images = world.generate_images(prompts, guidance_scale=guidance, **model)
        tag = f"guidance {guidance}"
        print(row(f"{tag}, held-out colour-shape pairs", world.score(scenes[0::2], images[0::2]), len(scenes[0::2])))
        print(row(f"{tag}, held-out wordings", world.score(scenes[1::2], images[1::2]), len(scenes[1::2])))
        print(row(f"**{tag}, all**", world.score(scenes, images), len(scenes)))
        if guidance == 4.5:
            per_shape = world.shape_score_per_shape(scenes, images)
            print(f"| {tag}, shape right per shape | | " + ", ".join(f"{k} {v:.0%}" for k, v in per_shape.items()) + " | | | | |")
            guided = images
        else:
            # Paired, prompt by prompt (same seed): pictures right on every named attribute at 4.5 but
            # not at 1.0, and the reverse.
            better, worse = world.paired_wins(scenes, guided, images)
            print(f"| paired: right on every named attribute at 4.5 but not 1.0 / the reverse | {len(scenes)} | "
                  f"{better} / {worse} | | | | |")

    two = world.two_shape_prompts(args.two_shape_prompts)
    images = world.generate_images(two, **model)
    print(f"| two shapes, both drawn in their colour, shape and place | {len(two)} | "
          f"{world.two_shape_score([s for _, s in two], images):.0%} | | | | |")
    trial = world.colourless_prompts(args.negative_trials, seed=7)
    pairs, plain_matches, negative_matches = world.negative_prompt_trial(trial, **model)
    print(f"| negative prompt naming a colour, paired: pictures in that colour without / with it | {pairs} | "
          f"{plain_matches} / {negative_matches} | | | | |")
    if args.only_held_out:
        print(f"\nevaluated in {(time.time() - started) / 60:.1f} min")
        return

    seen = world.evaluation_prompts(len(prompts) // 2, seed=1, held_out=False)
    images = world.generate_images(seen, **model)
    print(row("guidance 4.5, training pairs and wordings (for comparison)", world.score([s for _, s in seen], images), len(seen)))

    subset = prompts[: max(len(prompts) // 2, 1)]
    print()
    print(header("sampler (guidance 4.5)"))
    for scheduler in SCHEDULERS:
        images = world.generate_images(subset, scheduler=scheduler, **model)
        print(row(scheduler, world.score([s for _, s in subset], images), len(subset)))

    print()
    print("| colour | prompts | share without negative prompt | share with `negative_prompt=\"<colour>\"` |")
    print("|---|---|---|---|")
    for colour in world.FOREGROUND_COLOURS:
        colourless = world.colourless_prompts(args.negative_prompts, seed=7, colour=colour)
        plain = world.generate_images(colourless, **model)
        negative = world.generate_images(colourless, negative_prompt=colour, **model)
        print(f"| {colour} | {len(colourless)} | {world.colour_share(plain, colour):.0%} | "
              f"{world.colour_share(negative, colour):.0%} |")

    first, second = (world.generate_images(prompts[:4], **model) for _ in range(2))
    same = all(a.tobytes() == b.tobytes() for a, b in zip(first, second))
    print(f"\nsame seed, same picture: {same}; evaluated in {(time.time() - started) / 60:.1f} min")


if __name__ == "__main__":
    main()
