"""The Ray batch's overhead against the local batch: the demo model, the same prompt files, one process.

Runs the command itself, `pixart-sigma batch PROMPTS -o DIR [--ray --workers W]`, in this process,
taking turns, R rounds of: the local batch, then the batch on Ray for each W asked (a local Ray started
and shut down by each run, as the command does), each at two sizes of prompt file (S and L prompts).
Every Ray run's files are checked to be the local batch's, byte for byte. Reported, as medians:

- the whole command's wall time at each size, and its ratio to the local batch's;
- the cost of one more prompt, (wall(L) - wall(S)) / (L - S), and its ratio to the local batch's:
  what Ray adds or saves per prompt at scale;
- the fixed cost, wall(S) - S x that, and for Ray the part of it spent in ray.init and ray.shutdown.

The local runs happen in this process, after one untimed warm-up run: the model is loaded cold each
time, but Python and torch are imported already, as they are not for a command started anew (a few
seconds); Ray's workers are new processes and pay that inside Ray's fixed cost.

    python benchmarks/ray_benchmark.py                   # 8 and 32 prompts, 20 steps, 3 rounds, 1 and 2 workers
    python benchmarks/ray_benchmark.py --sizes 2,4 --steps 2 --rounds 1 --workers 1 --json out.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import ray  # noqa: E402
import torch  # noqa: E402

from pixart_sigma import unload_all  # noqa: E402
from pixart_sigma.cli import main as cli  # noqa: E402
from pixart_sigma.demo_world import FOREGROUND_COLOURS, POSITIONS, SHAPES  # noqa: E402


def prompts(count: int) -> list[str]:
    """Distinct prompts of the demo model's world."""
    made = [f"a {colour} {shape} at the {position}" for position in POSITIONS for colour in FOREGROUND_COLOURS
            for shape in SHAPES]
    if count > len(made):
        raise SystemExit(f"--sizes: at most {len(made)} prompts")
    return made[:count]


class Timed:
    """Seconds spent in ray.init and ray.shutdown during a run (the session's own cost)."""

    def __init__(self):
        self.seconds = {"init": 0.0, "shutdown": 0.0}

    def wrap(self, name: str, real):
        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return real(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - started

        return timed

    @contextlib.contextmanager
    def around_ray(self):
        real_init, real_shutdown = ray.init, ray.shutdown
        ray.init, ray.shutdown = self.wrap("init", real_init), self.wrap("shutdown", real_shutdown)
        try:
            yield self
        finally:
            ray.init, ray.shutdown = real_init, real_shutdown


def run(prompts_file: Path, out: Path, flags: list[str], workers: int | None) -> dict:
    """One run of the command; its wall time, and for Ray its session's start and stop."""
    ray_flags = ["--ray", "--workers", str(workers)] if workers else []
    unload_all()  # each run loads the model cold, as the command does in its own process (Ray's workers always do)
    timer = Timed()
    started = time.perf_counter()
    with timer.around_ray(), open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        code = cli(["batch", str(prompts_file), "-o", str(out), "-q", *flags, *ray_flags])
    wall = time.perf_counter() - started
    if code != 0:
        raise SystemExit(f"the run {ray_flags or 'local'} exited with {code}")
    return {"wall_s": wall, "init_s": timer.seconds["init"], "shutdown_s": timer.seconds["shutdown"]}


def files(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in folder.iterdir()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="8,32", help="two prompt counts, S,L (default: 8,32)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts (default: 1,2)")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args()
    small, large = sorted(int(size) for size in args.sizes.split(","))
    counts = [int(count) for count in args.workers.split(",")]
    flags = ["--model-name", "demo", "--num-inference-steps", str(args.steps), "--seed", "1"]
    paths = {"local": None, **{f"ray, {count} worker{'s' if count > 1 else ''}": count for count in counts}}
    runs: dict[str, dict[int, list[dict]]] = {name: {small: [], large: []} for name in paths}
    with tempfile.TemporaryDirectory(prefix="ray-benchmark-") as temporary:
        root = Path(temporary)
        for size in (small, large):
            (root / f"{size}.txt").write_text("\n".join(prompts(size)) + "\n", encoding="utf-8")
        run(root / f"{small}.txt", root / "warm-up", flags, None)  # untimed: the process's first model load and kernels
        for round_ in range(args.rounds):
            for size in (small, large):
                for name, workers in paths.items():
                    out = root / f"{round_}-{size}-{workers or 0}"
                    runs[name][size].append(run(root / f"{size}.txt", out, flags, workers))
                    if workers and files(out) != files(root / f"{round_}-{size}-0"):
                        raise SystemExit(f"{name}: the files differ from the local batch's")
                print(f"round {round_ + 1}, {size} prompts: " + ", ".join(
                    f"{name} {runs[name][size][-1]['wall_s']:.1f} s" for name in paths), file=sys.stderr, flush=True)

    def median(name: str, size: int, key: str) -> float:
        return statistics.median(row[key] for row in runs[name][size])

    rows = {}
    for name in paths:
        per_prompt = (median(name, large, "wall_s") - median(name, small, "wall_s")) / (large - small)
        rows[name] = {"wall_small_s": median(name, small, "wall_s"), "wall_large_s": median(name, large, "wall_s"),
                      "per_prompt_s": per_prompt, "fixed_s": median(name, small, "wall_s") - small * per_prompt,
                      "init_s": median(name, small, "init_s"), "shutdown_s": median(name, small, "shutdown_s")}
    base = rows["local"]
    print(f"\ndemo model, {args.steps} steps, 64x64, seed 1; median of {args.rounds} round(s); {os.cpu_count()} CPUs "
          f"({platform.processor() or platform.machine()}), torch {torch.__version__} ({torch.get_num_threads()} "
          f"threads), ray {ray.__version__}, Python {platform.python_version()}\n")
    print(f"| run | wall, {small} prompts | wall, {large} prompts | one more prompt | fixed cost | "
          "of which ray.init + shutdown |")
    print("|---|---|---|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {row['wall_small_s']:.1f} s ({row['wall_small_s'] / base['wall_small_s']:.2f}x) | "
              f"{row['wall_large_s']:.1f} s ({row['wall_large_s'] / base['wall_large_s']:.2f}x) | "
              f"{row['per_prompt_s']:.3f} s ({row['per_prompt_s'] / base['per_prompt_s']:.2f}x) | "
              f"{row['fixed_s']:.1f} s | {row['init_s'] + row['shutdown_s']:.1f} s |")
    if args.json:
        args.json.write_text(json.dumps({"sizes": [small, large], "steps": args.steps, "runs": runs, "rows": rows},
                                        indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
