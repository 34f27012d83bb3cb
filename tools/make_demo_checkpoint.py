"""Rebuild the bundled demo checkpoint (src/pixart_sigma/checkpoints_data/demo).

Until the trained demo model lands, this is a tiny PixArt-Sigma pipeline with fixed random
weights: the real architecture and file layout (so `model_name="demo"` runs the whole code path
offline in seconds), drawing structured noise, not pictures. Deterministic: same files every run.
"""

import argparse
import shutil
from pathlib import Path

from pixart_sigma.testing import save_tiny_pipeline

TARGET = Path(__file__).resolve().parents[1] / "src" / "pixart_sigma" / "checkpoints_data" / "demo"

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output", type=Path, default=TARGET)
    args = parser.parse_args()
    shutil.rmtree(args.output, ignore_errors=True)
    save_tiny_pipeline(args.output, seed=0, sample_size=8)
    size = sum(p.stat().st_size for p in args.output.rglob("*") if p.is_file())
    print(f"wrote {args.output} ({size / 1e3:.0f} kB)")
