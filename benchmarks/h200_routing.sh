#!/usr/bin/env bash
# The shipped H200 routing table, in one device command (about 5-6 minutes on one H200):
#
#   bash benchmarks/h200_routing.sh
#
# measures every JAX backend `auto` may pick on the bench's diffusion shapes, forward (inference)
# and forward+backward (training), in bfloat16 and float16, and writes the orders under
# "NVIDIA H200" into a copy of jax_attn/data/routing.json in $OUT (the H100's table and the sm90
# fallback are kept as they are). Then, on the development machine:
#
#   cp <returned files>/routing.json jax_attn/data/routing.json          # and commit it
#   mkdir -p benchmarks/results/<date>-h200-routing && cp <returned files>/tune* there
#
# Why both half dtypes: routing buckets are per dtype, and the H100 table holds bfloat16 only, so
# float16 calls (common in SD 1.x/2.x pipelines) would otherwise get the generic GPU rule (cudnn
# first), which the H100 run showed wrong for inference at d <= 64 and for 77-key cross-attention.
# float32 is left out: cuDNN cannot serve it, diffusion models do not run attention in it on GPUs,
# and it would double the time. Rows the --budget cuts leave their buckets out (the log says
# which); rerunning with `--dtype float16` alone adds float16 to the H200 table written here.
set -euo pipefail
OUT=${OUT:-/tmp/h200-routing}
mkdir -p "$OUT"
cp jax_attn/data/routing.json "$OUT/routing.json"
python -m jax_attn tune --expect-device "NVIDIA H200" --dtype bfloat16,float16 --budget 420 \
    --write-shipped "$OUT/routing.json" --json "$OUT/tune.json" 2>&1 | tee "$OUT/tune-log.txt"
