"""Write the demo LoRA's training pictures: large diamonds (a reserved shape word the demo model never saw)
and ordinary scenes, as PNG files with same-name .txt captions (the layout `pixart-sigma train-lora` reads).

    python tools/make_demo_lora_data.py DATA [--diamonds 300] [--others 150] [--seed 0]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pixart_sigma import demo_world


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--diamonds", type=int, default=300)
    parser.add_argument("--others", type=int, default=150)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.folder.mkdir(parents=True, exist_ok=True)
    for index, (text, scene) in enumerate(demo_world.lora_training_set(args.diamonds, args.others, args.seed)):
        stem = args.folder / f"{index:05d}"
        demo_world.render(scene).save(stem.with_suffix(".png"))
        stem.with_suffix(".txt").write_text(text + "\n")
    print(f"{args.diamonds + args.others} pictures with captions in {args.folder}")


if __name__ == "__main__":
    main()
