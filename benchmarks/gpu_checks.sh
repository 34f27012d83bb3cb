#!/usr/bin/env bash
# The checks only a GPU machine can make, in one call of about 12 minutes on an H200:
#   1. benchmarks/benchmark.py at full size (512, 1024, 2048 px): ours (dtype=auto) against diffusers,
#      drift, diffusers in the same dtype, the text K/V cache, each step_cache at 1024, prompts per call
#      (1, 4, 8), VAE tiling at 2048, every memory mode with its peak (5 min);
#   2. compile=True at 512 and 1024: compile time, first image, steady speed-up, drift (3 min);
#   3. the demo model's figures generated on cuda (dtype=auto: bfloat16), 80 held-out prompts (3 min);
#   4. the fast tests (-m "not slow") on a machine where device=auto means cuda.
# Results go to $OUT (or benchmarks/out). Wheels in .whl/ (for packages the machine lacks) are
# installed to /tmp/site first. Each step has its own time limit, so one hang costs only its share.
set -u
out=${OUT:-benchmarks/out}
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD/src PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_HOME=/tmp/hf-home
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"

timeout 300 python3 benchmarks/benchmark.py --no-compile --json "$out/benchmark.json" 2>&1 | grep -v Warning \
    | tee "$out/benchmark.log"
export TORCHINDUCTOR_CACHE_DIR=/tmp/pixart-compile-cache
timeout 200 python3 benchmarks/benchmark.py --sizes 512 1024 --compile --no-extras --json "$out/compile.json" 2>&1 \
    | grep -v Warning | tee "$out/compile.log"
timeout 220 python3 tools/evaluate_demo_model.py --device cuda --prompts 80 --negative-prompts 10 2>/dev/null \
    | tee "$out/demo-cuda.md"
# Several workers when pytest-xdist is there, 2 threads each, or they fight over the cores; the DashAI
# tests need the dashai package, which GPU images lack.
workers=$(python3 -c "import xdist" 2>/dev/null && echo "-n 8")
OMP_NUM_THREADS=2 timeout 120 python3 -m pytest -q -m "not slow" -p no:cacheprovider $workers -rfE --tb=short \
    --ignore tests/test_dashai.py 2>&1 | grep -v -i warning | tee "$out/pytest.log" | tail -30
