"""Time a training step of the demo model's transformer, in the ways tools/train_demo_model.py can train it,
side by side in one process on the same data: fp32 eager (the trainer before bf16) as the baseline,
bf16 autocast eager, fp32 compiled and bf16 compiled (the trainer's default).

A step is what the trainer does per step: render and caption a batch, encode the captions, predict the
noise, backpropagate, clip, AdamW and EMA. The variants take turns in rounds, so a slow spell on a
shared machine slows them all; each figure is the median of its rounds.

    python benchmarks/demo_training.py                  # the CPU, 2 threads, as the trainer runs
    python benchmarks/demo_training.py --rounds 5 --steps 40 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import train_demo_model as trainer  # noqa: E402
from pixart_sigma import demo_world  # noqa: E402
from pixart_sigma.testing import tiny_tokenizer  # noqa: E402

VARIANTS = {"fp32 eager": ("fp32", False), "bf16 eager": ("bf16", False),
            "fp32 compiled": ("fp32", True), "bf16 compiled": ("bf16", True)}
BASELINE = "fp32 eager"


class Run:
    """One variant: the trainer's transformer stage and its own data stream (the same seed for every variant)."""

    def __init__(self, precision: str, compile: bool, text_encoder, tokenizer, args):
        torch.manual_seed(0)
        self.rng = np.random.default_rng(0)
        self.training = trainer.TransformerTraining(args.device, args.lr, precision, compile)
        self.text_encoder, self.tokenizer, self.args = text_encoder, tokenizer, args

    def steps(self, count: int) -> float:
        """Seconds per step over `count` steps."""
        started = time.perf_counter()
        for _ in range(count):
            batch = trainer.transformer_batch(self.rng, self.args.batch_size, self.text_encoder, self.tokenizer,
                                              1.0, self.args.device)  # the latents' scale changes no work
            self.training.step(*batch).item()
        if self.args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return (time.perf_counter() - started) / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from: {', '.join(VARIANTS)}")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per variant per round")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (compiling happens here)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    names = [name.strip() for name in args.variants.split(",")]
    unknown = [name for name in names if name not in VARIANTS]
    if unknown:
        parser.error(f"--variants: unknown {unknown}; choose from {list(VARIANTS)}")
    torch.set_num_threads(args.threads)
    tokenizer = tiny_tokenizer(demo_world.VOCABULARY)
    text_encoder = trainer.build_text_encoder(len(tokenizer)).to(args.device).eval().requires_grad_(False)

    runs, warmup_s = {}, {}
    for name in names:
        runs[name] = Run(*VARIANTS[name], text_encoder, tokenizer, args)
        started = time.perf_counter()
        runs[name].steps(args.warmup)
        warmup_s[name] = time.perf_counter() - started
        print(f"{name}: {args.warmup} warm-up steps in {warmup_s[name]:.1f} s", flush=True)
    timings = {name: [] for name in names}
    for round_ in range(args.rounds):
        for name in names:
            timings[name].append(runs[name].steps(args.steps))
        print(f"round {round_ + 1}/{args.rounds}: " + ", ".join(f"{n} {t[-1]:.3f} s" for n, t in timings.items()),
              flush=True)

    base = statistics.median(timings[BASELINE]) if BASELINE in timings else None
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {args.threads} threads"
    print(f"\nDemo transformer training step, batch {args.batch_size}, {device}, torch {torch.__version__}; "
          f"median of {args.rounds} rounds of {args.steps} steps\n")
    print(f"| variant | s/step | speed-up over {BASELINE} | warm-up ({args.warmup} steps) |")
    print("|---|---|---|---|")
    rows = []
    for name in names:
        seconds = statistics.median(timings[name])
        ratio = base / seconds if base else None
        rows.append({"variant": name, "s_per_step": seconds, "speedup": ratio, "warmup_s": warmup_s[name],
                     "rounds": timings[name]})
        print(f"| {name} | {seconds:.3f} | {f'{ratio:.2f}x' if ratio else '-'} | {warmup_s[name]:.0f} s |")
    if args.json:
        args.json.write_text(json.dumps({"device": device, "batch_size": args.batch_size, "torch": torch.__version__,
                                         "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
