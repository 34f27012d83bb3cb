"""Score the three edits on the demo model with the shapes-world checker, and time image-to-image.

Sources are rendered scenes (demo_world.render: exact shapes, known layout), edited through the public
API (`PixArtSigmaModel.generate(prompt, image=..., ...)`) at 20 steps, guidance 4.5, float32:

- image-to-image: a one-shape scene, the prompt naming the same scene in another colour; per strength,
  how often the checker reads the prompt's colour, the source's position, and the mean distance from
  the source (8-bit levels);
- inpainting: a two-shape scene (demo_world.two_shape_prompts), the half holding the second shape
  masked, the prompt naming another colour there (strength 1); how often the checker reads the new colour
  in that half, the first shape kept, and the pixels beyond the mask's blur equal to the source's;
- outpainting: a one-shape scene grown by 32 pixels on the side away from its shape (a random side for a
  centred one), its own prompt; how often 90% of the new area is nearest the prompt's background colour,
  and the picture kept exact.

    python tools/evaluate_editing.py                         # 120 prompts per edit (docs/editing.md)
    python tools/evaluate_editing.py --prompts 10 --json out.json
    python tools/evaluate_editing.py --grid docs/editing.png # the doc's picture, then stop
    python tools/evaluate_editing.py --speed --rounds 5      # image-to-image time against text-to-image
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from pixart_sigma import PixArtSigmaModel  # noqa: E402
from pixart_sigma import demo_world as world  # noqa: E402

STRENGTHS = (0.05, 0.3, 0.6, 1.0)
SIDES = {"left": (32, 0, 0, 0), "top": (0, 32, 0, 0), "right": (0, 0, 32, 0), "bottom": (0, 0, 0, 32)}
HALVES = {"left": (0, 0, 32, 64), "right": (32, 0, 64, 64), "top": (0, 0, 64, 32), "bottom": (0, 32, 64, 64)}
OPPOSITE = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}
MASK_BLUR = 4
BACKGROUND_SHARE = 0.9  # of the new area's pixels nearest the background's colour


def recoloured(scene: world.Scene, index: int, rng: np.random.Generator) -> world.Scene:
    """The scene with shape `index` in another training colour (not the background's, not the other shape's)."""
    item = scene.shapes[index]
    taken = {scene.background} | {shape.colour for shape in scene.shapes}
    colours = [c for c in world.FOREGROUND_COLOURS if c not in taken and (c, item.shape) in world.TRAIN_PAIRS]
    shapes = list(scene.shapes)
    shapes[index] = replace(item, colour=colours[int(rng.integers(len(colours)))])
    return replace(scene, shapes=tuple(shapes))


def one_shape_scenes(count: int) -> list[world.Scene]:
    return world.rendered_scenes(count, seed=11)


def distance(first: Image.Image, second: Image.Image) -> float:
    return float(np.abs(np.asarray(first).astype(int) - np.asarray(second).astype(int)).mean())


def image_to_image(model: PixArtSigmaModel, count: int) -> dict:
    rng = np.random.default_rng(1)
    results = {strength: {"colour": 0, "position": 0, "distance": []} for strength in STRENGTHS}
    for k, scene in enumerate(one_shape_scenes(count)):
        target = recoloured(scene, 0, rng)
        source, prompt = world.render(scene), world.caption(target, rng)
        for strength in STRENGTHS:
            edited = model.generate(prompt, image=source, strength=strength, seed=k)[0]
            reading = world.read(edited)
            row = results[strength]
            row["colour"] += reading.colour == target.shapes[0].colour
            row["position"] += reading.position == scene.shapes[0].position
            row["distance"].append(distance(edited, source))
    return {str(strength): {"colour": row["colour"] / count, "position": row["position"] / count,
                            "distance": statistics.mean(row["distance"])} for strength, row in results.items()}


def half_mask(position: str) -> Image.Image:
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, HALVES[position])
    return mask


def beyond_blur(position: str) -> np.ndarray:
    """The pixels farther than MASK_BLUR from the masked half."""
    keep = np.ones((64, 64), bool)
    left, top, right, bottom = HALVES[position]
    keep[max(0, top - MASK_BLUR):bottom + MASK_BLUR, max(0, left - MASK_BLUR):right + MASK_BLUR] = False
    return keep


def inpainting(model: PixArtSigmaModel, count: int) -> dict:
    rng = np.random.default_rng(2)
    new_colour = first_kept = exact = 0
    for k, (_, scene) in enumerate(world.two_shape_prompts(count, seed=3)):
        target = recoloured(scene, 1, rng)
        source, position = world.render(scene), scene.shapes[1].position
        painted = model.generate(world.caption(target, rng), image=source, mask=half_mask(position), strength=1.0,
                                 mask_blur=MASK_BLUR, seed=k)[0]
        shapes = world.read_shapes(painted)
        new_colour += any(s.colour == target.shapes[1].colour and s.position == position for s in shapes)
        first_kept += any(s.colour == scene.shapes[0].colour and s.position == scene.shapes[0].position for s in shapes)
        keep = beyond_blur(position)
        exact += np.array_equal(np.asarray(painted)[keep], np.asarray(source)[keep])
    return {"new_colour": new_colour / count, "first_kept": first_kept / count, "exact_beyond_blur": exact / count}


def outpainting(model: PixArtSigmaModel, count: int) -> dict:
    rng = np.random.default_rng(3)
    palette = np.array([world.PALETTE[name] for name in world.PALETTE])
    names = list(world.PALETTE)
    background = exact = 0
    for k, scene in enumerate(one_shape_scenes(count)):
        # Grown away from the shape, where the picture shows background (a shape at the edge grows with it).
        side = OPPOSITE.get(scene.shapes[0].position) or list(SIDES)[int(rng.integers(len(SIDES)))]
        left, top, right, bottom = SIDES[side]
        source = world.render(scene)
        grown = model.generate(world.caption(scene, rng), image=source, expand=list(SIDES[side]), strength=1.0,
                               seed=k)[0]
        array = np.asarray(grown).astype(int)
        inner = np.zeros(array.shape[:2], bool)
        inner[top:top + 64, left:left + 64] = True
        exact += np.array_equal(array[inner].reshape(64, 64, 3), np.asarray(source).astype(int))
        new_pixels = array[~inner].reshape(-1, 1, 3)
        nearest = np.abs(new_pixels - palette[None]).sum(axis=2).argmin(axis=1)
        background += np.mean(nearest == names.index(scene.background)) >= BACKGROUND_SHARE
    return {"background": background / count, "exact": exact / count}


def speed(model: PixArtSigmaModel, rounds: int) -> dict:
    """Medians of alternating runs: text-to-image, then image-to-image at each strength (same prompt, seed)."""
    scene = one_shape_scenes(1)[0]
    prompt, source = world.caption(scene, np.random.default_rng(0)), world.render(scene)
    strengths = (0.25, 0.5, 1.0)
    times: dict[str, list[float]] = {"text": []} | {str(s): [] for s in strengths}
    model.generate(prompt, seed=0)  # warm: weights, kernels, the prompt's embeddings
    model.generate(prompt, image=source, strength=0.5, seed=0)
    for _ in range(rounds):
        start = time.perf_counter()
        model.generate(prompt, seed=0)
        times["text"].append(time.perf_counter() - start)
        for strength in strengths:
            start = time.perf_counter()
            model.generate(prompt, image=source, strength=strength, seed=0)
            times[str(strength)].append(time.perf_counter() - start)
    text = statistics.median(times["text"])
    return {"text_seconds": text, "rounds": rounds,
            "ratio": {str(s): statistics.median(times[str(s)]) / text for s in strengths}}


def write_grid(model: PixArtSigmaModel, path: str) -> None:
    """Rows: image-to-image, inpainting, outpainting; columns: source, mask (white: repainted), result (2x)."""
    rng = np.random.default_rng(5)
    scene = one_shape_scenes(1)[0]
    source = world.render(scene)
    redrawn = model.generate(world.caption(recoloured(scene, 0, rng), rng), image=source, strength=0.6, seed=0)[0]
    _, two = world.two_shape_prompts(1, seed=3)[0]
    two_source, position = world.render(two), two.shapes[1].position
    painted = model.generate(world.caption(recoloured(two, 1, rng), rng), image=two_source, mask=half_mask(position),
                             strength=1.0, seed=0)[0]
    left = next(item for item in one_shape_scenes(40) if item.shapes[0].position == "left")  # grown away from it
    grown_source = world.render(left)
    grown = model.generate(world.caption(left, rng), image=grown_source, expand=[0, 0, 32, 0], strength=1.0,
                           seed=0)[0]
    no_mask = Image.new("L", (64, 64), 0)
    grown_mask = Image.new("L", (96, 64), 255)
    grown_mask.paste(0, (0, 0, 64, 64))
    rows = [(source, no_mask, redrawn), (two_source, half_mask(position), painted), (grown_source, grown_mask, grown)]
    cell = 128
    grid = Image.new("RGB", (cell * 4 + 40, cell * 3 + 40), (160, 160, 160))  # grey: a mask's white shows
    for r, row in enumerate(rows):
        x = 10
        for picture in row:
            scaled = picture.convert("RGB").resize((picture.width * 2, picture.height * 2), Image.NEAREST)
            grid.paste(scaled, (x, 10 + r * (cell + 10)))
            x += scaled.width + 10
    grid.save(path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=120, help="scenes per edit")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--grid", help="write the doc's picture grid here, then stop")
    parser.add_argument("--speed", action="store_true", help="time image-to-image against text-to-image, then stop")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    model = PixArtSigmaModel(model_name="demo", device=args.device, dtype=args.dtype, num_inference_steps=20)
    if args.grid:
        write_grid(model, args.grid)
        return 0
    if args.speed:
        results = {"speed": speed(model, args.rounds)}
        print(f"text-to-image {results['speed']['text_seconds']:.3f} s; image-to-image / text-to-image: "
              + ", ".join(f"strength {s}: {r:.2f}" for s, r in results["speed"]["ratio"].items()))
    else:
        started = time.perf_counter()
        results = {"prompts": args.prompts, "image_to_image": image_to_image(model, args.prompts),
                   "inpainting": inpainting(model, args.prompts), "outpainting": outpainting(model, args.prompts)}
        results["seconds"] = time.perf_counter() - started
        print("| strength | prompt's colour read | source's position kept | mean distance (levels) |\n|---|---|---|---|")
        for strength, row in results["image_to_image"].items():
            print(f"| {strength} | {row['colour']:.0%} | {row['position']:.0%} | {row['distance']:.1f} |")
        paint, grow = results["inpainting"], results["outpainting"]
        print(f"\ninpainting: new colour read {paint['new_colour']:.0%}, first shape kept {paint['first_kept']:.0%}, "
              f"exact beyond the blur {paint['exact_beyond_blur']:.0%}")
        print(f"outpainting: new area the background's colour {grow['background']:.0%}, picture exact "
              f"{grow['exact']:.0%}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
