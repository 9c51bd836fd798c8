#!/usr/bin/env bash
# H200 round 15 (issue 16): exp2 on the FMA pipe for a share of P's column tiles
# (SageConfig.exp2_poly, quantization.poly_exp2). It ran at commit c04b360; no faster, the
# switch was removed in the next commit, so this script is the record of that run
# (results/2026-12-01-h200-round15/), not runnable since. One call, no FA4:
#
#   bash benchmarks/h200_round15.sh
#
# sage_device.py's default, poly4 and poly2 (every 4th / 2nd 8-key column tile by the
# polynomial), pv16 and pv16_poly4 at 16k, 4608 (d = 128) and 4096 (d = 64, 40): each checked
# against its simulation (which computes the same polynomial), then timed beside cuDNN; then
# default and poly4 again in a second process (the runs' spread).
set -u
FINAL=${OUT:-out}
OUT=/tmp/round15
rm -rf "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
mkdir -p "$OUT"
pack() { mkdir -p "$FINAL" && tar czf "$FINAL/round15.tgz" -C "$OUT" .; }
run=1
for only in default,poly4,poly2,pv16,pv16_poly4 poly4,default; do
  timeout 240 python3 benchmarks/sage_device.py --variants --only "$only" --shapes 0,1,2,3 \
    --skip-prepass --budget 220 --out "$OUT/sage$run" > "$OUT/sage_run$run.txt" 2>&1
  sed -n '/=== variants/,$p' "$OUT/sage_run$run.txt" | grep -v "pre-pass ms"
  pack
  run=$((run + 1))
done
