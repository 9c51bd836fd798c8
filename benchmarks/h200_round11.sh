#!/usr/bin/env bash
# H200 round 11 (issue 16): where the 8-bit kernel's time goes, per SASS instruction, and the
# Pallas V pass timed inside the call. No FA4. Two calls, back to back:
#
#   bash benchmarks/h200_round11.sh variants
#   bash benchmarks/h200_round11.sh times profile sass
#
# variants  sage_device.py's default, vpallas (SageConfig.v_pallas: the FP8 V^T by the Pallas
#           pass; since round 13 the default, and the variant is `vxla`, its opposite),
#           bk256 and overlap (re-timed since the per-block K scales), pv16; 16k, 4608
#           (d = 128), 4096 (d = 64 and 40): each checked against its simulation, then timed
#           beside cuDNN.
# times     GPU time of every kernel inside one call (kernel_times.py): sage, sage+vp (now
#           sage+vx, XLA's V pass, since the Pallas one is the default), sage16,
#           cuDNN at 16k and 4608 (d = 128) and 4096 (d = 64).
# profile   Nsight Compute of the sage kernel alone at 1x24x16384x128: per-opcode counts with
#           names (--page details --csv) and per-SASS-instruction executions and stall samples
#           (--page source --print-source sass).
# sass      the kernel's PTX and SASS as Mosaic GPU dumps them (1x24x4608x128).
set -u
FINAL=${OUT:-out}
OUT=/tmp/round11
rm -rf "$OUT"
STEPS=${*:-variants}
has() { [[ " $STEPS " == *" $1 "* ]]; }
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
mkdir -p "$OUT"
pack() { mkdir -p "$FINAL" && tar czf "$FINAL/round11-$(echo $STEPS | tr ' ' '-').tgz" -C "$OUT" .; }
if has variants; then
  timeout 400 python3 benchmarks/sage_device.py --variants --only default,vpallas,bk256,overlap,pv16 \
    --shapes 0,1,2,3 --skip-prepass --budget 360 --out "$OUT/variants" > "$OUT/variants.txt" 2>&1
  sed -n '/=== variants/,$p' "$OUT/variants.txt"
  pack
fi
if has times; then
  mkdir -p "$OUT/times"
  specs=""
  for shape in 1,24,16384,128 1,24,4608,128 2,10,4096,64; do
    specs="$specs sage:$shape sage+vp:$shape sage16:$shape cudnn:$shape"
  done
  XLA_FLAGS=--xla_gpu_autotune_level=0 timeout 150 ncu --clock-control none \
    --metrics gpu__time_duration.sum --csv --print-units base \
    python3 benchmarks/kernel_times.py $specs > "$OUT/times/raw.csv" 2> "$OUT/times/stderr.txt"
  python3 benchmarks/kernel_times.py --table "$OUT/times/raw.csv" | tee "$OUT/times/table.txt"
  pack
fi
if has profile; then
  mkdir -p "$OUT/profile"
  timeout 200 ncu --clock-control none --section SourceCounters --section WarpStateStats \
    --section InstructionStats --section SpeedOfLight -k regex:mosaic -c 1 -o "$OUT/profile/sage" \
    python3 benchmarks/profile_forward.py sage 1 24 16384 128 > "$OUT/profile/ncu.txt" 2>&1
  tail -n 3 "$OUT/profile/ncu.txt"
  rep="$OUT/profile/sage.ncu-rep"
  ncu -i "$rep" --page details --csv --print-details all > "$OUT/profile/details.csv" 2>&1
  ncu -i "$rep" --page source --csv --print-source sass > "$OUT/profile/source_sass.csv" 2>&1
  ncu -i "$rep" --page raw --csv --metrics sass__inst_executed_per_opcode \
    --print-metric-instances details > "$OUT/profile/opcodes.csv" 2>&1
  wc -c "$OUT"/profile/*.csv
  grep -i "error" "$OUT"/profile/*.csv | head -n 5
  pack
fi
if has sass; then
  mkdir -p "$OUT/sass"
  MOSAIC_GPU_DUMP_PTX=1 MOSAIC_GPU_DUMP_PTXAS=1 MOSAIC_GPU_DUMP_SASS=1 timeout 120 \
    python3 benchmarks/profile_forward.py sage 1 24 4608 128 > "$OUT/sass/dump.txt" 2>&1
  wc -l "$OUT/sass/dump.txt"; grep -iE "spill|Used [0-9]+ registers|nvdisasm|error" "$OUT/sass/dump.txt" | head
  gzip "$OUT/sass/dump.txt"
  pack
fi
pack
