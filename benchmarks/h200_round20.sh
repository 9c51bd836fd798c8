#!/usr/bin/env bash
# H200 round 20 (issue 16): where the `sage` kernel's time goes, by ablation. Calls (the
# results' call<N>/):
#
#   call 1  bash benchmarks/h200_round20.sh ablate profile
#
# ablate   benchmarks/sage_ablation.py at the four timed shapes: the kernel with its exp2, its
#          row max, its matmuls or its softmax taken away, pingpong off, and the row max as a
#          tree (checked against the default), cuDNN and the pre-pass alone beside them.
# profile  Nsight Compute's per-SASS-instruction warp samples of the default kernel at
#          1x24x16384x128 (benchmarks/sass_hotspots.py reads them), as round 11 did for the
#          configuration of that time.
set -u
FINAL=${OUT:-out}
OUT=/tmp/round20
rm -rf "$OUT"
STEPS=${*:-ablate}
has() { [[ " $STEPS " == *" $1 "* ]]; }
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
mkdir -p "$OUT"
pack() { mkdir -p "$FINAL" && tar czf "$FINAL/round20-$(echo $STEPS | tr ' ' '-').tgz" -C "$OUT" .; }
if has ablate; then
  timeout 360 python3 benchmarks/sage_ablation.py > "$OUT/ablate.txt" 2>&1
  grep -E "vs default|failed|Error" "$OUT/ablate.txt" | cut -c1-200 | head -n 20
  pack
fi
if has profile; then
  mkdir -p "$OUT/profile"
  timeout 150 ncu --clock-control none --section SourceCounters --section WarpStateStats \
    --section InstructionStats --section SpeedOfLight -k regex:mosaic -c 1 -o "$OUT/profile/sage" \
    python3 benchmarks/profile_forward.py sage 1 24 16384 128 > "$OUT/profile/ncu.txt" 2>&1
  tail -n 3 "$OUT/profile/ncu.txt"
  rep="$OUT/profile/sage.ncu-rep"
  ncu -i "$rep" --page details --csv --print-details all > "$OUT/profile/details.csv" 2>&1
  ncu -i "$rep" --page source --csv --print-source sass > "$OUT/profile/source_sass.csv" 2>&1
  rm -f "$rep"
  python3 benchmarks/sass_hotspots.py "$OUT/profile/source_sass.csv" --logits 6442450944 \
    > "$OUT/profile/hotspots.txt" 2>&1
  head -n 12 "$OUT/profile/hotspots.txt"
  gzip "$OUT/profile/source_sass.csv"
  pack
fi
pack
[ -f "$OUT/ablate.txt" ] && grep -E "^\|" "$OUT/ablate.txt"
true
