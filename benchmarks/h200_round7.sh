#!/usr/bin/env bash
# H200 round 7 (issues 15 and 16). Three calls back to back, no FA4:
#
#   call 1:  bash benchmarks/h200_round7.sh fused_checks
#   call 2:  bash benchmarks/h200_round7.sh fused_tune
#   call 3:  bash benchmarks/h200_round7.sh free
#
# Second visit, after the split variant failed to lower under jax 0.11 (a static warpgroup index
# became a literal operand of the accumulator's run_state; fixed by traced indices):
#
#   call 1:  bash benchmarks/h200_round7.sh split_checks split_tune
#   call 2:  bash benchmarks/h200_round7.sh lossy_tune
#
# fused_checks the one-kernel backward (MosaicConfig.bwd_fused, and with bwd_dq_split) through
#              mosaic_gpu.py's small checks: forward, lse and dq/dk/dv against the float64
#              reference with GQA, kv_lengths, masks, d = 40/64/128, bf16 and fp16.
# fused_tune   `mosaic_gpu.py --tune --tune-set fused`: fused vs two kernels vs cuDNN, forward
#              and forward+backward, gradients against float32 XLA on two heads in every row.
# split_checks the small checks with {"bwd_fused": true, "bwd_dq_split": true} (5 of them).
# split_tune   `--tune-set split`: the split fused backward against the two kernels, d = 128.
# lossy_tune   `python -m jax_attn tune --lossy`, inference, bf16, into a copy of the shipped
#              routing.json: the H200's `auto+8bit` orders with the per-tile K scale default.
# free         round 6's unfinished step: the 8-bit kernel variants (turn-taking off, per-tile K
#              scales, P V in 16-bit, and their pairs) against the default, checked, then timed;
#              and the Pallas FP8 V pass beside XLA's.
#
# Each step ends by archiving what is done into $OUT (at most 8 files come back, and a call cut
# at its limit still returns it).
set -u
FINAL=${OUT:-out}
OUT=/tmp/round7
rm -rf "$OUT"
STEPS=${*:-fused_checks}
has() { [[ " $STEPS " == *" $1 "* ]]; }
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
mkdir -p "$OUT"
pack() {
  mkdir -p "$FINAL" && tar czf "$FINAL/round7-$(echo $STEPS | tr ' ' '-').tgz" -C "$OUT" .
}
checks() {  # checks NAME CONFIG TIMEOUT [--quick-small]: mosaic_gpu.py's small checks
  timeout "$3" python3 benchmarks/mosaic_gpu.py --quick ${4:-} --small-config "$2" \
    --out "$OUT/$1" > "$OUT/$1.txt" 2>&1
  grep -E "small (PASS|FAIL)" "$OUT/$1.txt" | cut -c1-220
}
tune_set() {  # tune_set NAME SET TIMEOUT BUDGET: mosaic_gpu.py --tune --tune-set SET alone
  mkdir -p "$OUT/$1"
  timeout "$3" python3 benchmarks/mosaic_gpu.py --quick --skip-small --tune --tune-set "$2" \
    --budget "$4" --out "$OUT/$1" > "$OUT/$1/stdout.txt" 2>&1
  grep -E "^\|" "$OUT/$1/stdout.txt" | tail -n 14
}
SPLIT='{"bwd_fused": true, "bwd_dq_split": true}'
if has fused_checks; then
  mkdir -p "$OUT/fused_checks"
  checks fused_checks/bwd_fusedtrue '{"bwd_fused": true}' 200
  checks fused_checks/bwd_fusedtruebwd_dq_splittrue "$SPLIT" 200 --quick-small  # d = 128 only
  pack
fi
if has fused_tune; then tune_set fused_tune fused 330 290; pack; fi
if has split_checks; then
  mkdir -p "$OUT/split_checks"
  checks split_checks/split "$SPLIT" 120 --quick-small
  pack
fi
if has split_tune; then tune_set split_tune split 200 170; pack; fi
if has lossy_tune; then
  mkdir -p "$OUT/lossy_tune"
  cp jax_attn/data/routing.json "$OUT/lossy_tune/routing.json"
  timeout 420 python3 -m jax_attn tune --lossy --modes inference --expect-device "NVIDIA H200" \
    --dtype bfloat16 --budget 330 --quiet --write-shipped "$OUT/lossy_tune/routing.json" \
    --json "$OUT/lossy_tune/tune.json" > "$OUT/lossy_tune/tune-log.txt" 2>&1
  tail -n 30 "$OUT/lossy_tune/tune-log.txt" | cut -c1-200
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
pack
