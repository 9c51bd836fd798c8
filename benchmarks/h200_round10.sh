#!/usr/bin/env bash
# H200 round 10: one call, no FA4. Ran at commit 602ff0f; the switches it times
# (skip_rescale, rescale_threshold) were slower everywhere and removed in the next commit, so
# this script is the record of that run (results/2026-12-01-h200-round10/), not runnable after.
#
#   bash benchmarks/h200_round10.sh rescale_checks rescale_tune sage_skip
#
# rescale_checks  mosaic_gpu.py's small checks (out, lse, dq/dk/dv against float64; masks,
#                 kv_lengths, GQA, d = 40-256, fp16) with MosaicConfig(skip_rescale=True,
#                 rescale_threshold=8): O's rescale behind a per-thread branch (row_rescale) and
#                 the lazy running max, on the GPU for the first time.
# rescale_tune    `--tune-set rescale --fwd-only`, twice (one timing each per process): the
#                 forward with the plain rescale, the skipped one, and skipped + lazy max, cuDNN
#                 in the same run; d = 40/64/128.
# sage_skip       sage_device.py's variants default, skip, pv16, pv16_skip (SageConfig.skip_rescale)
#                 at 16k and 4608 tokens (d = 128) and 4096 (d = 64): each checked against its
#                 simulation on head 0, then timed beside cuDNN.
set -u
FINAL=${OUT:-out}
OUT=/tmp/round10
rm -rf "$OUT"
STEPS=${*:-rescale_checks}
has() { [[ " $STEPS " == *" $1 "* ]]; }
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
mkdir -p "$OUT"
pack() {
  mkdir -p "$FINAL" && tar czf "$FINAL/round10.tgz" -C "$OUT" .
}
CFG='{"skip_rescale": true, "rescale_threshold": 8.0}'
if has rescale_checks; then
  mkdir -p "$OUT/rescale_checks"
  timeout 100 python3 benchmarks/mosaic_gpu.py --quick --small-config "$CFG" \
    --out "$OUT/rescale_checks" > "$OUT/rescale_checks/checks.txt" 2>&1
  echo "rescale_checks exit $?"
  grep -E "small (PASS|FAIL)" "$OUT/rescale_checks/checks.txt" | cut -c60-140
  pack
fi
if has rescale_tune; then
  for run in 1 2; do
    mkdir -p "$OUT/rescale_tune$run"
    timeout 75 python3 benchmarks/mosaic_gpu.py --quick --skip-small --fwd-only --tune \
      --tune-set rescale --budget 60 --out "$OUT/rescale_tune$run" \
      > "$OUT/rescale_tune$run/stdout.txt" 2>&1
    grep -E "mosaic_gpu tune" "$OUT/rescale_tune$run/stdout.txt" | cut -c45-200
    pack
  done
fi
if has sage_skip; then
  timeout 260 python3 benchmarks/sage_device.py --variants --only default,skip,pv16,pv16_skip \
    --shapes 0,1,2 --skip-prepass --budget 230 --out "$OUT/sage_skip" > "$OUT/sage_skip.txt" 2>&1
  sed -n '/=== variants/,$p' "$OUT/sage_skip.txt"
  pack
fi
pack
