#!/usr/bin/env bash
# H200 round 6: what limits each kernel, per shape (issues 15 and 16). Two calls back to back:
#
#   call 1, carry .fa4a:  bash benchmarks/fa4_install.sh stage && bash benchmarks/h200_round6.sh sage_times sage_profile variants bwd_profile
#   call 2, carry .fa4b:  bash benchmarks/h200_round6.sh d40_profile fa4tests
#
# sage_times   GPU time of every kernel inside one `sage`/`sage16` call (pre-pass kernels and
#              the attention kernel, ncu's gpu__time_duration, kernel_times.py), cuDNN beside.
# sage_profile Nsight Compute sections (speed of light, pipe utilization, warp states,
#              instruction mix) of the 8-bit kernel and of our bf16 kernel, 16k tokens d = 128.
# variants     the 8-bit kernel with 256-key blocks at d = 128 against the default (128).
# bwd_profile  the same sections for our backward kernels (dQ, dK/dV) and cuDNN's backward,
#              16k tokens d = 128, where our forward+backward trails cuDNN.
# d40_profile  the same for the d = 40 forward: ours (run at 48), FA4's and cuDNN's.
# fa4tests     the fa4 segment-id GPU tests not yet run there (one-segment; float16 cases).
#
# Each step ends by archiving what is done into $OUT (round6-STEPS.tgz: at most 8 files come
# back, and a call cut at its limit still returns it). Second visit, one call (no FA4):
# `bash benchmarks/h200_round6.sh free bwd4608`. That visit also ran a step `narrow` (commit 3160eff, since reverted): the d = 40 forward
# reading q, k, v in place with TMA filling columns 40-47, checked with
# `mosaic_gpu.py --aligned-small --shapes 4`; Mosaic GPU refused it (see the results README).
# free         the 8-bit kernels without turn-taking (SageConfig.pingpong=False), with 256-key
#              blocks, against the defaults (4608 d = 128, 4096 d = 64; checked, then timed).
#              Only default and bk256 ran before the budget ended; the next visit runs the rest
#              and the per-tile K scales (`ktile`, SageConfig.k_scale_per_tile), and times the
#              Pallas FP8 V pass (`prepass_pallas_v`) beside XLA's, 16k tokens last:
#              `bash benchmarks/h200_round6.sh free` alone.
# bwd4608      Nsight sections of our backward kernels and cuDNN's, 1x24x4608x128.
set -u
FINAL=${OUT:-out}
OUT=/tmp/round6  # everything lands here, then one archive goes to $OUT (8 files come back at most)
rm -rf "$OUT"
STEPS=${*:-sage_times}
has() { [[ " $STEPS " == *" $1 "* ]]; }
export PYTHONUNBUFFERED=1
if has d40_profile || has fa4tests; then source benchmarks/fa4_install.sh install
else export PYTHONPATH=$PWD; fi
mkdir -p "$OUT"
pack() {  # after every step: what is done so far comes back even if a later step runs out of time
  mkdir -p "$FINAL" && tar czf "$FINAL/round6-$(echo $STEPS | tr ' ' '-').tgz" -C "$OUT" .
}
SECTIONS="--section SpeedOfLight --section ComputeWorkloadAnalysis --section WarpStateStats --section InstructionStats --print-details all"
prof() {  # prof NAME FILTER COUNT ARGS...: ncu sections of COUNT kernels matching FILTER
  local name=$1 filter=$2 count=$3; shift 3
  timeout 150 ncu --clock-control none $SECTIONS --metrics sass__inst_executed_per_opcode \
    --print-metric-instances values -k regex:"$filter" --launch-count "$count" \
    python3 benchmarks/profile_forward.py "$@" > "$OUT/$name.txt" 2>&1
  grep -E "^  [a-z_]+.*\(|Duration|Issue Slots Busy|Executed Ipc A|Warp Cycles Per Issued|sass__inst_executed_per_opcode" \
    "$OUT/$name.txt" | cut -c1-200 | head -n 24
}
if has sage_times; then
  mkdir -p "$OUT/sage_times"
  specs=""
  for shape in 1,24,16384,128 1,24,4608,128 2,10,4096,64; do
    specs="$specs sage:$shape sage16:$shape cudnn:$shape"
  done
  XLA_FLAGS=--xla_gpu_autotune_level=0 timeout 200 ncu --clock-control none --metrics gpu__time_duration.sum --csv --print-units base \
    python3 benchmarks/kernel_times.py $specs > "$OUT/sage_times/raw.csv" 2> "$OUT/sage_times/stderr.txt"
  python3 benchmarks/kernel_times.py --table "$OUT/sage_times/raw.csv" | tee "$OUT/sage_times/table.txt"
  pack
fi
if has sage_profile; then
  mkdir -p "$OUT/sage_profile"
  for impl in sage sage16 mosaic; do
    prof "sage_profile/$impl" mosaic 1 "$impl" 1 24 16384 128
  done
  pack
fi
if has variants; then
  mkdir -p "$OUT/variants"
  timeout 200 python3 benchmarks/sage_device.py --variants --only default,bk256,bk256_2level \
    --shapes 0,1 --budget 180 --out "$OUT/variants" > "$OUT/variants/stdout.txt" 2>&1
  rm -f "$OUT/variants/log.txt"
  sed -n '/=== variants/,$p' "$OUT/variants/stdout.txt"
  pack
fi
if has free; then
  mkdir -p "$OUT/free"
  timeout 540 python3 benchmarks/sage_device.py --variants \
    --only default,free,ktile,free_ktile,pv16,pv16_free,pv16_ktile \
    --shapes 1,2,0 --budget 500 --out "$OUT/free" > "$OUT/free/stdout.txt" 2>&1
  rm -f "$OUT/free/log.txt"
  grep -E " ms|MISMATCH|ERROR" "$OUT/free/stdout.txt" | grep -v prepass | cut -c1-160
  pack
fi
if has bwd4608; then
  mkdir -p "$OUT/bwd4608"
  prof bwd4608/mosaic mosaic 3 mosaic 1 24 4608 128 bwd
  prof bwd4608/cudnn "sdpa|cudnn|flash|fmha" 3 cudnn 1 24 4608 128 bwd
  pack
fi
if has bwd_profile; then
  mkdir -p "$OUT/bwd_profile"
  prof bwd_profile/mosaic mosaic 3 mosaic 1 24 16384 128 bwd
  prof bwd_profile/cudnn "sdpa|cudnn|flash|fmha" 4 cudnn 1 24 16384 128 bwd
  pack
fi
if has d40_profile; then
  mkdir -p "$OUT/d40_profile"
  prof d40_profile/mosaic mosaic 1 mosaic 2 8 4096 40
  prof d40_profile/fa4 flash 1 fa4 2 8 4096 40
  prof d40_profile/cudnn "sdpa|cudnn|flash|fmha" 1 cudnn 2 8 4096 40
  pack
fi
if has fa4tests; then
  timeout 200 python3 -m pytest -q -rA tests/test_fa4.py -k "segments_match_reference_on_gpu and (one-segment or not bfloat16)" \
    > "$OUT/fa4tests.txt" 2>&1
  grep -E "PASSED|FAILED|passed|failed|error" "$OUT/fa4tests.txt" | tail -n 25
fi
pack
