# Shared steps of the H200 round scripts (sourced by h200_round18.sh to h200_round21.sh,
# after each defines OUT and pack).
ncu_time() {  # ncu_time NAME ERR TIMEOUT SCRIPT ARGS...: each kernel's GPU time in one run of
  local name=$1 err=$2 t=$3  # SCRIPT (NAME.csv), then kernel_times.py's table of them
  shift 3
  timeout "$t" ncu --clock-control none --metrics gpu__time_duration.sum --csv \
    python3 "$@" > "$OUT/$name.csv" 2> "$err"
  echo "$name"; python3 benchmarks/kernel_times.py --table "$OUT/$name.csv"
}
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
profile() {  # profile NAME B N S D CONFIG: per-SASS-instruction warp samples of one kernel
  local dir="$OUT/$1" logits=$(( $3 * $4 * $4 ))
  mkdir -p "$dir"
  timeout 150 ncu --clock-control none --section SourceCounters --section WarpStateStats \
    --section InstructionStats --section SpeedOfLight -k regex:mosaic -c 1 -o "$dir/sage" \
    python3 benchmarks/profile_forward.py sage $2 $3 $4 $5 fwd "$6" > "$dir/ncu.txt" 2>&1
  tail -n 3 "$dir/ncu.txt"
  ncu -i "$dir/sage.ncu-rep" --page details --csv --print-details all > "$dir/details.csv" 2>&1
  ncu -i "$dir/sage.ncu-rep" --page source --csv --print-source sass > "$dir/source_sass.csv" 2>&1
  rm -f "$dir/sage.ncu-rep"
  python3 benchmarks/sass_hotspots.py "$dir/source_sass.csv" --logits $logits \
    > "$dir/hotspots.txt" 2>&1
  head -n 14 "$dir/hotspots.txt"
  gzip "$dir/source_sass.csv"
  pack
}
