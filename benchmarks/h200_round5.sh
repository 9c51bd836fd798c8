#!/usr/bin/env bash
# The next H200 visit's measurements, two calls back to back (one H200; FA4 for `profile`):
#
#   call 1, carry .fa4a:  bash benchmarks/fa4_install.sh stage && bash benchmarks/h200_round5.sh sage16 example
#   call 2, carry .fa4b:  bash benchmarks/h200_round5.sh profile
#
# sage16   the 16-bit P V variant (`sage16`, SageConfig(pv_bits=16), V read untransposed) and
#          two of its configs against the FP8 default: each checked against its simulation and
#          float64, then timed with both pre-passes and cuDNN in the same run (4608 and 16k
#          tokens at d = 128, 4096 at d = 64); then packed prompts (segment ids) through both
#          against float64 and the simulation (`sage_device.py --segments`).
# example  the example DiT sampled in bf16 with bf16, `sage` and `sage16` attention: PSNR and
#          largest pixel difference of the 8-bit PNGs against the bf16 one (issue 16).
# profile  Nsight Compute on one 16k-token d = 128 forward of our Mosaic kernel and of FA4
#          (speed of light and warp stall reasons): what keeps ours 7-9% behind FA4's.
#
# The second visit (same two-call pattern: `... && bash benchmarks/h200_round5.sh prepass`,
# then `bash benchmarks/h200_round5.sh stalls fa4seg`):
# prepass  sage and sage16 with the Pallas pre-pass (Q and K in one pass each), the jnp and the
#          Pallas pre-pass alone, cuDNN, at 16k and 4608 tokens (d = 128) and 4096 (d = 64).
# stalls   the stall reasons of that profile in detail (per-reason cycles, local-memory traffic,
#          registers) for ours and FA4's, and ptxas's register/spill report of our kernel.
# fa4seg   fa4 with segment ids (mask_mod) against float64, and timed (fa4_device.py --segments).
# prepass_tune  the pre-pass's parts, jnp vs Pallas, and the Pallas row kernel's block sizes
#          beside a copy of Q (sage_prepass_tune.py).
set -u
OUT=${OUT:-out}
STEPS=${*:-sage16 profile}
has() { [[ " $STEPS " == *" $1 "* ]]; }
export PYTHONUNBUFFERED=1
if has profile || has stalls || has fa4seg; then source benchmarks/fa4_install.sh install
else export PYTHONPATH=$PWD; fi
mkdir -p "$OUT"
if has sage16; then
  mkdir -p "$OUT/sage16"
  timeout 300 python3 benchmarks/sage_device.py --variants --only default,pv16,pv16_overlap,pv16_stages3 \
    --shapes 1,2,0 --budget 260 --out "$OUT/sage16" > "$OUT/sage16/stdout.txt" 2>&1
  rm -f "$OUT/sage16/log.txt"  # the same lines as stdout.txt
  sed -n '/=== variants/,$p' "$OUT/sage16/stdout.txt"
  timeout 100 python3 benchmarks/sage_device.py --segments --out /tmp/segments > "$OUT/sage16/segments.txt" 2>&1
  cp /tmp/segments/sage.json "$OUT/sage16/segments.json"
  grep -E "^segments" "$OUT/sage16/segments.txt"
fi
if has example; then
  timeout 120 python3 examples/denoise_and_maps.py --attention-8bit --steps 4 --out /tmp/example \
    > "$OUT/example.txt" 2>&1
  grep -E "vs bf16|Error|error" "$OUT/example.txt" | tail -n 8
fi
if has profile; then
  mkdir -p "$OUT/profile"
  for impl in mosaic fa4; do
    timeout 150 ncu --clock-control none --section SpeedOfLight --section WarpStateStats \
      -k regex:"attention|flash|mosaic|kernel" --launch-skip 0 --launch-count 1 \
      python3 benchmarks/profile_forward.py "$impl" 1 40 16384 128 > "$OUT/profile/$impl.txt" 2>&1
    tail -n 40 "$OUT/profile/$impl.txt"
  done
fi
if has prepass; then
  mkdir -p "$OUT/prepass"
  timeout 300 python3 benchmarks/sage_device.py --variants --only default,pv16 --shapes 0,1,2 \
    --budget 270 --out "$OUT/prepass" > "$OUT/prepass/stdout.txt" 2>&1
  rm -f "$OUT/prepass/log.txt"
  sed -n '/=== variants/,$p' "$OUT/prepass/stdout.txt"
fi
if has fa4seg; then
  mkdir -p "$OUT/fa4seg"
  timeout 200 python3 benchmarks/fa4_device.py --segments --out "$OUT/fa4seg" > "$OUT/fa4seg/stdout.txt" 2>&1
  tail -n 25 "$OUT/fa4seg/stdout.txt"
fi
if has stalls; then
  mkdir -p "$OUT/stalls"
  MOSAIC_GPU_DUMP_PTXAS=1 timeout 90 python3 benchmarks/profile_forward.py mosaic 1 40 16384 128 \
    2>&1 | grep -iE "registers|spill|stack" | sort | uniq -c > "$OUT/stalls/ptxas.txt"
  cat "$OUT/stalls/ptxas.txt"
  for impl in mosaic fa4; do
    timeout 150 ncu --clock-control none --section WarpStateStats --section MemoryWorkloadAnalysis \
      --section LaunchStats --print-details all \
      --metrics l1tex__t_sectors_pipe_lsu_mem_local_op_ld.sum,l1tex__t_sectors_pipe_lsu_mem_local_op_st.sum,l1tex__t_sectors_pipe_lsu_mem_global_op_ld.sum,smsp__inst_executed.sum,smsp__inst_executed_op_shared_ld.sum \
      -k regex:"attention|flash|mosaic|kernel" --launch-skip 0 --launch-count 1 \
      python3 benchmarks/profile_forward.py "$impl" 1 40 16384 128 > "$OUT/stalls/$impl.txt" 2>&1
    grep -iE "stall|local|registers|inst_executed|Duration" "$OUT/stalls/$impl.txt" | head -n 40
  done
fi
if has prepass_tune; then
  timeout 150 python3 benchmarks/sage_prepass_tune.py --out "$OUT/prepass_tune" > "$OUT/prepass_tune.txt" 2>&1
  sed -n '/=== sage pre-pass/,$p' "$OUT/prepass_tune.txt"
fi
