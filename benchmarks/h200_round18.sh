#!/usr/bin/env bash
# H200 round 18 (issue 16): where the short shapes' time goes. Calls (the results' call<N>/):
#
#   call 1  bash benchmarks/h200_round17.sh ring   (round 17's last step)
#   call 2  bash benchmarks/h200_round18.sh kernels
#   call 3  bash benchmarks/h200_round18.sh prepass
#   then, with the K pass in slices at 16 warps and x * (1 / scale):
#   call 4  bash benchmarks/h200_round18.sh final
#   then, with the row-sum tile a constant XLA keeps (ones in its first row only):
#   call 5  bash benchmarks/h200_round18.sh final2
#   call 6  bash benchmarks/h200_round18.sh again
#   then, with K's tile amax from token_stats' read (quantize_k_tiles; slower, since reverted,
#   so `tiles` now times the pre-pass above):
#   call 7  bash benchmarks/h200_round18.sh tiles
#
# (Calls 2-5 printed their summaries with a one-off script; `kernel_times.py --table` reads
# the same raw CSVs, kept in the results, to the same numbers; `prepass`'s Q sweep by rows per
# program ran in call 4. The steps share `ncu_time` and `smoke` since; the commands are the same.)
#
# kernels  every GPU kernel of one `sage` call (pre-pass, attention, epilogue) and of one cuDNN
#          call at the four timed shapes: Nsight Compute's gpu__time_duration per kernel
#          (kernels_<impl>_<shape>.csv; the image has no Nsight Systems, so no timeline).
# prepass  benchmarks/prepass_probe.py under Nsight Compute at three shapes: the INT8 row
#          kernel's variants (warps, x * (1 / scale), the 256-row K tile in 64-row sweeps),
#          each checked against the library's kernel (probe_<shape>.txt).
# final    the `sage` call's kernels again at 4608 and 2x10x4096x64 (the new pre-pass), Q's
#          rows-per-program sweep (probe at 4608), then default and pv16 timed beside cuDNN at
#          the four shapes (the README's table) with ptxas's registers.
# final2   the smoke's d = 40, 80 and 128 shapes against the simulation and float64, the call's
#          kernels at 4608 (no broadcast kernel left), default and pv16 timed again.
# tiles    the smoke's d = 40 and 128 shapes against the simulation and float64, then the call's
#          kernels at 4608 and 2x10x4096x64 (the session's last device seconds: no timing table).
# again    the switches last timed before the row sum left the softmax (rounds 7 and 11), with
#          today's kernel: `overlap` (intra-warpgroup overlap, 128-key blocks) and `free` (no
#          turns between the two warpgroups), beside the default, at the four shapes.
set -u
FINAL=${OUT:-out}
OUT=/tmp/round18
rm -rf "$OUT"
STEPS=${*:-kernels}
has() { [[ " $STEPS " == *" $1 "* ]]; }
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
mkdir -p "$OUT"
pack() { mkdir -p "$FINAL" && tar czf "$FINAL/round18-$(echo $STEPS | tr ' ' '-').tgz" -C "$OUT" .; }
source benchmarks/sage_steps.sh  # ncu_time, variants (smoke below is this round's own)
smoke() {  # smoke NAME SHAPES TIMEOUT: the default config (masked) against the simulation and float64
  timeout "$3" python3 benchmarks/sage_device.py --smoke-variant default --smoke-shapes "$2" \
    --out "$OUT/$1" > "$OUT/$1.txt" 2>&1
  grep -E "ok;|ok$|FAIL|ERROR" "$OUT/$1.txt" | cut -c1-250 | tail -n 6
  grep -B2 -A12 "Traceback" "$OUT/$1.txt" | tail -n 20
  pack
}
probe_steps() {  # the probe's variants that differ from the library kernel (none, when all match)
  grep -E "step|ERROR" "$1" | grep -v "step vs library 0, scale rel err 0.0e+00" | head -n 8
}
if has kernels; then
  for shape in "1 24 16384 128" "1 24 4608 128" "2 10 4096 64" "2 8 4096 40"; do
    tag=$(echo $shape | tr ' ' x)
    for impl in sage cudnn; do
      ncu_time "kernels_${impl}_$tag" "$OUT/kernels_${impl}_$tag.err" 100 \
        benchmarks/profile_forward.py $impl $shape
    done
  done
  pack
fi
if has final; then
  for shape in "1 24 4608 128" "2 10 4096 64"; do
    ncu_time "kernels_sage_$(echo $shape | tr ' ' x)" /dev/null 100 benchmarks/profile_forward.py sage $shape
  done
  ncu_time probe_q "$OUT/probe_q.txt" 100 benchmarks/prepass_probe.py 1 24 4608 128 \
    | grep -E "probe_q|call|q_|quantize"
  probe_steps "$OUT/probe_q.txt"
  pack
  variants final default,pv16 230
fi
if has final2; then
  smoke smoke 0,2,3 150
  ncu_time kernels_final2 /dev/null 100 benchmarks/profile_forward.py sage 1 24 4608 128
  pack
  variants final2 default,pv16 200
fi
has again && variants again default,overlap,free 250
if has tiles; then
  smoke smoke 0,3 100
  for shape in "1 24 4608 128" "2 10 4096 64"; do
    ncu_time "kernels_sage_$(echo $shape | tr ' ' x)" /dev/null 50 benchmarks/profile_forward.py sage $shape
    pack
  done
fi
if has prepass; then
  for shape in "1 24 4608 128" "1 24 16384 128" "2 10 4096 64"; do
    tag=$(echo $shape | tr ' ' x)
    ncu_time "probe_$tag" "$OUT/probe_$tag.txt" 150 benchmarks/prepass_probe.py $shape
    probe_steps "$OUT/probe_$tag.txt"
  done
  pack
fi
pack
