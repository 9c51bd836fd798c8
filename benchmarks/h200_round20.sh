#!/usr/bin/env bash
# H200 round 20 (issue 16): where the `sage` kernel's time goes, by ablation. Calls (the
# results' call<N>/):
#
#   call 1  bash benchmarks/h200_round20.sh ablate profile
#   call 2  bash benchmarks/h200_round20.sh paired
#
# ablate   benchmarks/sage_ablation.py at the four timed shapes: the kernel with its exp2, its
#          row max, its matmuls or its softmax taken away, pingpong off, and the row max as a
#          tree (checked against the default), cuDNN and the pre-pass alone beside them.
# profile  Nsight Compute's per-SASS-instruction warp samples of the default kernel at
#          1x24x16384x128 (benchmarks/sass_hotspots.py reads them), as round 11 did for the
#          configuration of that time.
# paired   SageConfig.paired_issue (P V and the next Q K^T in one turn, waited for together):
#          the smoke shapes against the simulation and float64, then the default, paired and
#          its lighter forms, and sage16 both ways, timed at the four shapes beside cuDNN
#          (pre-pass included), with ptxas's registers and spills.
set -u
FINAL=${OUT:-out}
OUT=/tmp/round20
rm -rf "$OUT"
STEPS=${*:-ablate}
has() { [[ " $STEPS " == *" $1 "* ]]; }
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
mkdir -p "$OUT"
pack() { mkdir -p "$FINAL" && tar czf "$FINAL/round20-$(echo $STEPS | tr ' ' '-').tgz" -C "$OUT" .; }
smoke() {  # smoke NAME VARIANT SHAPES TIMEOUT: masked calls against the simulation and float64
  timeout "$4" python3 benchmarks/sage_device.py --smoke-variant "$2" --smoke-shapes "$3" \
    --out "$OUT/$1" > "$OUT/$1.txt" 2>&1
  grep -E "ok;|ok$|OK|FAIL|ERROR" "$OUT/$1.txt" | cut -c1-200 | tail -n 8
  grep -B2 -A12 "Traceback" "$OUT/$1.txt" | tail -n 20
  pack
}
variants() {  # variants NAME ONLY TIMEOUT: the four shapes, ptxas's report kept
  MOSAIC_GPU_DUMP_PTXAS=1 timeout "$3" python3 benchmarks/sage_device.py --variants --only "$2" \
    --shapes 0,1,2,3 --skip-prepass --budget $(( $3 - 30 )) --out "$OUT/$1" > "$OUT/$1.txt" 2>&1
  python3 - "$OUT/$1.txt" > "$OUT/registers_$1.txt" <<'PY'
import sys
sys.path.insert(0, "benchmarks")
from kernel_registers import kernels
for name, regs, st, ld in kernels(open(sys.argv[1]).read()):
    print(f"{name:40s} {regs:4d} spill {st} / {ld}")
PY
  grep -v "spill 0 / 0" "$OUT/registers_$1.txt" | head -n 8
  sed -n '/=== variants/,$p' "$OUT/$1.txt" | grep -v "pre-pass ms"
  grep -A20 "Traceback" "$OUT/$1.txt" | tail -n 25
  pack
}
if has paired; then
  smoke smoke_paired paired 0,1,2,3 150
  variants paired default,paired,paired_bk128,paired_1level,paired_smem,pv16,pv16_paired 360
fi
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
