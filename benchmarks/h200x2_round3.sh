#!/usr/bin/env bash
# Measurements of round 3 on two H200s (device kind nvidia-h200-x2), one visit under 10 minutes.
#
#   bash benchmarks/h200x2_round3.sh [STEP ...]      (default: parallel train packed sage)
#
# parallel  both GPUs first: benchmarks/parallel_gpu.py (correctness with segment ids, then
#           Ulysses and ring scaling at 32k tokens; the ring's backward from global statistics)
# train     GPU 1, beside the next two: end-to-end training steps (TRAIN_ARGS, default the
#           16k-token DiT; TRAIN_ARGS="--models unet" for the SDXL-sized UNet)
# packed    GPU 0: benchmarks/packed_gpu.py (a packed batch against its prompts, Triton kernels)
# sage      GPU 0, after packed: benchmarks/sage_peers.py (SAGE_STEPS, default accuracy,timing)
#
# Run from the repository root with $OUT set; carry `.whl` (the sageattention 1.0.6 wheel) for
# `sage`. At most 8 files come back from a run: each step keeps its table and JSON, and its log's
# end is printed instead of kept.
set -u
OUT=${OUT:-out}
STEPS=${*:-parallel train packed sage}
has() { [[ " $STEPS " == *" $1 "* ]]; }
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
python3 -c "import jax, jaxlib, torch, triton; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, \
'torch', torch.__version__, 'triton', triton.__version__)"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
for s in parallel train packed sage; do mkdir -p "$OUT/$s"; done

has parallel && timeout 190 python3 benchmarks/parallel_gpu.py --methods ulysses,ring --budget 150 \
  --out "$OUT"/parallel > "$OUT"/parallel/log.txt 2>&1

has train && CUDA_VISIBLE_DEVICES=1 timeout "${TRAIN_TIMEOUT:-380}" python3 benchmarks/end_to_end.py \
  --steps train ${TRAIN_ARGS:---dit-tokens 16384} --budget-s 300 --out "$OUT"/train > "$OUT"/train/log.txt 2>&1 &
(
  has packed && CUDA_VISIBLE_DEVICES=0 timeout 200 python3 benchmarks/packed_gpu.py --backends pallas \
    --budget 160 --out "$OUT"/packed > "$OUT"/packed/log.txt 2>&1
  has sage && CUDA_VISIBLE_DEVICES=0 XLA_PYTHON_CLIENT_MEM_FRACTION=0.5 timeout 150 python3 \
    benchmarks/sage_peers.py --steps "${SAGE_STEPS:-accuracy,timing}" --budget 120 --out "$OUT"/sage \
    > "$OUT"/sage/log.txt 2>&1
)
wait
for s in parallel train packed sage; do
  [ -s "$OUT/$s/log.txt" ] || continue
  echo "== $s"; grep -iE "Traceback|Error:" "$OUT/$s/log.txt" | head -n 8; tail -n 12 "$OUT/$s/log.txt"
  rm -f "$OUT/$s/log.txt"
done
