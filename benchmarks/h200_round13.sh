#!/usr/bin/env bash
# H200 round 13 (issue 16): the 8-bit pre-pass with the Pallas V pass as the default and the
# token-axis reductions (K's mean, V's channel amax) in two stages. One call, no FA4:
#
#   bash benchmarks/h200_round13.sh times sage example
#
# times    GPU time of every kernel inside one call (kernel_times.py): sage (the new pre-pass),
#          sage+vx (XLA's V transpose, as before), sage16, cuDNN at 16k and 4608 (d = 128) and
#          4096 (d = 64, 40).
# sage     sage_device.py's default, vxla (SageConfig.v_pallas=False) and pv16 at the four
#          shapes, each checked against its simulation, then timed beside cuDNN; twice, in
#          two processes (the runs' spread).
# example  the example DiT sampled with 8-bit attention against bf16 (PSNR, largest pixel
#          difference): the smoothing mean's summation order changed.
# The SM clock, power and throttle reasons are sampled throughout (nvidia-smi, clocks.csv).
set -u
FINAL=${OUT:-out}
ROUND=${ROUND:-13}  # round 14 runs these steps again on its own code (h200_round14.sh)
OUT=/tmp/round$ROUND
rm -rf "$OUT"
STEPS=${*:-times}
has() { [[ " $STEPS " == *" $1 "* ]]; }
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
mkdir -p "$OUT"
pack() { mkdir -p "$FINAL" && tar czf "$FINAL/round$ROUND-$(echo $STEPS | tr ' ' '-').tgz" -C "$OUT" .; }
nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw,power.limit,temperature.gpu,clocks_throttle_reasons.active \
  --format=csv -lms 250 > "$OUT/clocks.csv" 2>&1 &
SMI=$!
if has times; then
  mkdir -p "$OUT/times"
  specs=""
  for shape in 1,24,16384,128 1,24,4608,128 2,10,4096,64 2,8,4096,40; do
    specs="$specs sage:$shape sage+vx:$shape sage16:$shape cudnn:$shape"
  done
  XLA_FLAGS=--xla_gpu_autotune_level=0 timeout 150 ncu --clock-control none \
    --metrics gpu__time_duration.sum --csv --print-units base \
    python3 benchmarks/kernel_times.py $specs > "$OUT/times/raw.csv" 2> "$OUT/times/stderr.txt"
  python3 benchmarks/kernel_times.py --table "$OUT/times/raw.csv" | tee "$OUT/times/table.txt" \
    | grep -E "^call|kernel_mosaic|cudnn_gen"
  pack
fi
if has sage; then
  for run in 1 2; do
    timeout 200 python3 benchmarks/sage_device.py --variants --only default,vxla,pv16 \
      --shapes 0,1,2,3 --skip-prepass --budget 180 --out "$OUT/sage$run" > "$OUT/sage$run.txt" 2>&1
    sed -n '/=== variants/,$p' "$OUT/sage$run.txt" | grep -v "pre-pass ms"
    pack
  done
fi
if has example; then
  timeout 150 python3 examples/denoise_and_maps.py --attention-8bit --steps 4 --out /tmp/example \
    > "$OUT/example.txt" 2>&1
  grep -E "vs bf16|Error|error" "$OUT/example.txt" | tail -n 8
  pack
fi
kill $SMI 2>/dev/null
pack
