#!/usr/bin/env bash
# H200 round 12 (issue 16, and the bf16 forward): the compute warpgroups' turn taken after the
# softmax's row max (SageConfig / MosaicConfig.max_before_turn). It ran on a working tree with
# those switches, the `mbt*` sage variants and the `maxturn` tune set; no faster, they were
# removed before the next commit, so this script is the record of that run
# (results/2026-12-01-h200-round12/), not runnable since. One call, no FA4:
#
#   bash benchmarks/h200_round12.sh sage mosaic_checks mosaic_tune
#
# sage          sage_device.py's default, mbt (max_before_turn), mbt_vpallas (with the Pallas V
#               pass), pv16, pv16_mbt at 16k, 4608 (d = 128), 4096 (d = 64, 40): each checked
#               against its simulation, then timed beside cuDNN. The SM clock and power are
#               sampled meanwhile (nvidia-smi, clocks.csv).
# mosaic_checks mosaic_gpu.py's small checks (out, lse, dq/dk/dv against float64) with
#               max_before_turn (d <= 64 run the plain pipeline; d = 128's default overlaps).
# mosaic_tune   `--tune-set maxturn --fwd-only`: the bf16 forward with and without it.
set -u
FINAL=${OUT:-out}
OUT=/tmp/round12
rm -rf "$OUT"
STEPS=${*:-sage}
has() { [[ " $STEPS " == *" $1 "* ]]; }
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
mkdir -p "$OUT"
pack() { mkdir -p "$FINAL" && tar czf "$FINAL/round12-$(echo $STEPS | tr ' ' '-').tgz" -C "$OUT" .; }
nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,clocks_throttle_reasons.active \
  --format=csv -lms 250 > "$OUT/clocks.csv" 2>&1 &
SMI=$!
if has sage; then
  timeout 330 python3 benchmarks/sage_device.py --variants --only default,mbt,mbt_vpallas,pv16,pv16_mbt \
    --shapes 0,1,2,3 --skip-prepass --budget 300 --out "$OUT/sage" > "$OUT/sage.txt" 2>&1
  sed -n '/=== variants/,$p' "$OUT/sage.txt"
  pack
fi
if has mosaic_checks; then
  mkdir -p "$OUT/mosaic_checks"
  timeout 100 python3 benchmarks/mosaic_gpu.py --quick --small-config '{"max_before_turn": true}' \
    --out "$OUT/mosaic_checks" > "$OUT/mosaic_checks/checks.txt" 2>&1
  echo "mosaic_checks exit $?"
  grep -E "small (PASS|FAIL)" "$OUT/mosaic_checks/checks.txt" | cut -c60-140
  pack
fi
if has mosaic_tune; then
  mkdir -p "$OUT/mosaic_tune"
  timeout 150 python3 benchmarks/mosaic_gpu.py --quick --skip-small --fwd-only --tune \
    --tune-set maxturn --budget 130 --out "$OUT/mosaic_tune" > "$OUT/mosaic_tune/stdout.txt" 2>&1
  grep -E "mosaic_gpu tune" "$OUT/mosaic_tune/stdout.txt" | cut -c45-200
  pack
fi
kill $SMI 2>/dev/null
pack
