"""Score a LoRA trained on the demo model to teach the reserved shape (see tools/make_demo_lora_data.py).

Held-out prompts naming a large diamond (its colour, the background, half of them its position, half in
wordings no training set uses): how often the checker reads a diamond, with the LoRA at each scale and
without it. Then ordinary held-out prompts (demo_world.evaluation_prompts) with the LoRA at scale 1 and
without: every attribute, so that what the LoRA costs the rest is seen. CPU, float32, the defaults
(20 steps, guidance 4.5), prompt k at seed k.

    python tools/evaluate_demo_lora.py LORA.safetensors [--count 120] [--scales 0,0.5,1]
"""

from __future__ import annotations

import argparse
import time

from pixart_sigma import PixArtSigmaModel, demo_world


def images(model, prompts, loras):
    return [model.generate(prompt=p, seed=k, loras=loras)[0] for k, (p, _) in enumerate(prompts)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("lora")
    parser.add_argument("--count", type=int, default=120)
    parser.add_argument("--scales", default="0,0.5,1")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    model = PixArtSigmaModel(model_name="demo", device="cpu", dtype="float32")
    started = time.monotonic()
    diamond_prompts = demo_world.lora_evaluation_prompts(args.count, args.seed)
    scenes = [scene for _, scene in diamond_prompts]
    print(f"held-out diamond prompts ({args.count}), e.g. {diamond_prompts[0][0]!r}")
    for scale in [float(s) for s in args.scales.split(",")]:
        loras = [{"name": args.lora, "scale": scale}] if scale else []
        scores = demo_world.score(scenes, images(model, diamond_prompts, loras))
        print(f"  scale {scale:g}: " + ", ".join(f"{k} {v:.1%}" for k, v in scores.items()))
    ordinary = demo_world.evaluation_prompts(args.count, args.seed + 1000)
    scenes = [scene for _, scene in ordinary]
    print(f"ordinary held-out prompts ({args.count})")
    for label, loras in (("base", []), ("LoRA at 1", [{"name": args.lora, "scale": 1.0}])):
        scores = demo_world.score(scenes, images(model, ordinary, loras))
        print(f"  {label}: " + ", ".join(f"{k} {v:.1%}" for k, v in scores.items()))
    print(f"{time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
