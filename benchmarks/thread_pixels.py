"""How much a CPU's thread count changes the pixels: the demo model at several thread counts, per dtype.

Each thread count runs in a fresh process (torch's intra-op pool is sized once per process), makes the
same images (prompts x seeds) and saves their raw pixels; the parent compares every count with the
first and prints, per dtype: how many values differ and by how many 8-bit levels at most. The numbers
are this CPU's: its kernels (AMX, AVX512-BF16, AVX2) decide the rounding, so another CPU can differ.

    python benchmarks/thread_pixels.py                            # 1, 2, 3, 4, 8 threads; float32, bfloat16
    python benchmarks/thread_pixels.py --threads 1,3 --dtypes float32 --images 2 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a large red circle on a blue background", "a small green square on a white background",
           "a yellow triangle on a black background", "a blue circle on a yellow background"]


def draw(threads: int, dtype: str, images: int, steps: int, out: Path) -> None:
    """In a child process: set the thread count first, then make the images and save their pixels."""
    import torch

    torch.set_num_threads(threads)
    sys.path.insert(0, str(ROOT / "src"))
    from pixart_sigma import PixArtSigmaModel

    model = PixArtSigmaModel(model_name="demo", device="cpu", dtype=dtype, num_inference_steps=steps)
    pixels = [np.asarray(model.generate(PROMPTS[k % len(PROMPTS)], seed=k)[0]) for k in range(images)]
    np.save(out, np.stack(pixels))


def compare(reference: np.ndarray, other: np.ndarray) -> dict:
    difference = np.abs(reference.astype(int) - other.astype(int))
    return {"values": int(difference.size), "differing": int((difference > 0).sum()),
            "max_levels": int(difference.max())}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", default="1,2,3,4,8", help="comma-separated thread counts; the first is the reference")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--child", nargs=4, metavar=("THREADS", "DTYPE", "IMAGES", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        threads, dtype, images, out = args.child
        draw(int(threads), dtype, int(images), args.steps, Path(out))
        return 0
    counts = [int(t) for t in args.threads.split(",")]
    results = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "images": args.images,
               "steps": args.steps, "reference_threads": counts[0], "dtypes": {}}
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    with tempfile.TemporaryDirectory() as folder:
        for dtype in args.dtypes.split(","):
            arrays = {}
            for threads in counts:
                out = Path(folder) / f"{dtype}-{threads}.npy"
                subprocess.run([sys.executable, __file__, "--steps", str(args.steps), "--child", str(threads),
                                dtype, str(args.images), str(out)], check=True, env=env)
                arrays[threads] = np.load(out)
            rows = {threads: compare(arrays[counts[0]], arrays[threads]) for threads in counts[1:]}
            results["dtypes"][dtype] = rows
            for threads, row in rows.items():
                share = 100 * row["differing"] / row["values"]
                print(f"{dtype:9} {counts[0]} vs {threads} threads: {row['differing']:>7} of {row['values']} values "
                      f"differ ({share:.2f}%), by up to {row['max_levels']} levels", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
