#!/usr/bin/env bash
# Round 4 on two H200s (device kind nvidia-h200-x2), two calls back to back (FA4's wheels travel
# in two folders, benchmarks/fa4_install.sh):
#
#   call 1, carry .fa4a:  bash benchmarks/fa4_install.sh stage
#   call 2, carry .fa4b:  bash benchmarks/h200x2_round4.sh
#
# Call 2: (1) the ring's correctness on both GPUs (benchmarks/parallel_gpu.py, no timings; its
# "plain, out only" case runs cuDNN's block backward from the global statistics), then side by
# side (2) GPU 0: `jax_attn bench` on the diffusion shapes, our backends against cuDNN (JAX and
# torch) and FA4 (JAX route and torch); (3) GPU 1: `jax_attn tune`, the
# H200 routing table re-measured with the overlapped Mosaic forward (bf16; written into a copy
# of routing.json). At most 8 files come back: each step keeps its JSON/CSV/plot, logs are
# printed (their ends) instead of kept.
set -u
OUT=${OUT:-out}
source benchmarks/fa4_install.sh install
export PYTHONUNBUFFERED=1
python3 -c "import jax, torch, triton; print('jax', jax.__version__, 'torch', torch.__version__, \
'triton', triton.__version__); import flash_attn.cute; print('fa4 importable')"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
mkdir -p "$OUT/ring" "$OUT/bench" "$OUT/routing"

timeout 120 python3 benchmarks/parallel_gpu.py --methods ring --budget 0 --out /tmp/ring \
  > /tmp/ring.log 2>&1
grep -E "check|correctness" /tmp/ring.log | tail -n 10; cp /tmp/ring/parallel_gpu.json "$OUT/ring/" 2>/dev/null

CUDA_VISIBLE_DEVICES=0 XLA_PYTHON_CLIENT_MEM_FRACTION=0.6 timeout 400 python3 -m jax_attn bench \
  --shapes diffusion --backends pallas,fa4,cudnn,auto,torch-cudnn,torch-fa4 \
  --budget 330 --quiet --json "$OUT/bench/bench.json" --csv "$OUT/bench/bench.csv" \
  --plot "$OUT/bench/bench.png" > /tmp/bench.log 2>&1 &
cp jax_attn/data/routing.json "$OUT/routing/routing.json"
CUDA_VISIBLE_DEVICES=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.6 timeout 400 python3 -m jax_attn tune \
  --expect-device "NVIDIA H200" --dtype bfloat16 --budget 330 \
  --write-shipped "$OUT/routing/routing.json" --json "$OUT/routing/tune.json" > /tmp/tune.log 2>&1
wait
echo "== tune"; grep -iE "Traceback|Error" /tmp/tune.log | head -n 5; tail -n 25 /tmp/tune.log | cut -c1-220
echo "== bench"; grep -iE "Traceback|Error:" /tmp/bench.log | head -n 5; tail -n 45 /tmp/bench.log | cut -c1-220
