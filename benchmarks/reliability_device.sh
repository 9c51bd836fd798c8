#!/usr/bin/env bash
# The reliability round on a GPU, in steps that each fit one device call (a cold Triton cache
# makes the first compile of each kernel slow: run `check` first, on a warm machine the rest):
#   bash benchmarks/reliability_device.sh check     # check: GPU backends, every dtype, Mosaic forced
#   bash benchmarks/reliability_device.sh timings   # benchmarks/reliability_gpu.py
#   bash benchmarks/reliability_device.sh tests     # the reliability and kernel tests on the GPU
# Logs and JSON go to $OUT; a short summary is printed last.
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/reliability}
mkdir -p "$OUT"
check() {  # check NAME ARGS...: one `jax_attn check` run, logged and summarized
  local name=$1; shift
  timeout 300 python -m jax_attn check --no-torch --quiet --json "$OUT/$name.json" "$@" > "$OUT/$name.txt" 2>&1
  echo "$name rc=$? $(grep -E 'passed or skipped' "$OUT/$name.txt")"
}
case "${1:-check}" in
  check)
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/gpu.txt"
    check check-gpu-bf16 --backends pallas,cudnn --dtype bfloat16
    check check-gpu-f16 --backends pallas,cudnn --dtype float16
    check check-gpu-f32 --backends pallas --dtype float32
    JAX_ATTN_PALLAS_KERNEL=mosaic check check-mosaic --backends pallas --dtype bfloat16
    grep -h FAIL "$OUT"/check-*.txt | head -20
    ;;
  timings)
    timeout 400 python benchmarks/reliability_gpu.py --json "$OUT/reliability.json" > "$OUT/reliability.txt" 2>&1
    echo "timings rc=$?"; tail -20 "$OUT/reliability.txt"
    ;;
  tests)
    timeout 550 python -m pytest -q -p no:cacheprovider tests/test_flash_bias_window.py \
      tests/test_reliability.py > "$OUT/pytest.txt" 2>&1
    echo "pytest rc=$?"; tail -5 "$OUT/pytest.txt"
    ;;
esac
