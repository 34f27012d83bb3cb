"""bfloat16 against float32 matmul rates on this CPU: the figures docs/performance.md and RESULTS.md quote.

    python3 benchmarks/matmul_rates.py            # inside the venv: 4096² square and the demo trainer's 2048×128×512
Prints GFLOP/s per shape and dtype (median of --repeats after a warm-up) and the bf16/fp32 ratio.
"""

import argparse
import statistics
import time

import torch

SHAPES = {"4096x4096x4096": (4096, 4096, 4096), "2048x128x512 (demo trainer)": (2048, 128, 512)}


def rate(m: int, k: int, n: int, dtype: torch.dtype, repeats: int) -> float:
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    calls = max(1, int(2e9 // (2 * m * k * n)))  # about 2 GFLOP per timing
    torch.matmul(a, b)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            torch.matmul(a, b)
        times.append((time.perf_counter() - start) / calls)
    return 2 * m * k * n / statistics.median(times) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()}")
    for name, (m, k, n) in SHAPES.items():
        fp32 = rate(m, k, n, torch.float32, args.repeats)
        bf16 = rate(m, k, n, torch.bfloat16, args.repeats)
        print(f"{name}: float32 {fp32:.0f} GFLOP/s, bfloat16 {bf16:.0f} GFLOP/s, {bf16 / fp32:.2f}x")


if __name__ == "__main__":
    main()
