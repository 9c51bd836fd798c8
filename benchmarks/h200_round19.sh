#!/usr/bin/env bash
# H200 round 19 (issue 16): the `sage` pre-pass in two launches (`sage_prepass.token_parts`,
# then `quantize_all` for Q, K and V at once, each program finishing the stats itself) instead
# of five kernels and XLA's finishing kernels. Calls (the results' call<N>/):
#
#   call 1  bash benchmarks/h200_round19.sh check
#   call 2  bash benchmarks/h200_round19.sh table
#   (the one-launch pre-pass was slower in wall time: reverted, its code kept as
#   results/2026-12-02-h200-round19/one_launch_prepass.patch, so `check` and `table` no longer
#   run as they did; then the kernel writes the caller's head dim, SageConfig.narrow_output)
#   call 3  bash benchmarks/h200_round19.sh narrow
#   call 4  bash benchmarks/h200_round19.sh narrow2
#   call 5  variants default,pv16 at shapes 1-3 with XLA_FLAGS=--xla_gpu_enable_command_buffer=
#           (run by hand: sage_device.py --variants --skip-prepass; call5/nocb.txt)
#   call 6  bash benchmarks/h200_round19.sh overlap
#   call 7  bash benchmarks/h200_round19.sh injit   (q = k = v in the loop: see the README)
#   call 8  bash benchmarks/h200_round19.sh injit
#
# check  the smoke shapes (d = 40, 64, 80, 128, masked, both layouts) of `sage` and `sage16`
#        against the simulation and float64 on the GPU; one_launch_probe.py under Nsight Compute
#        at three shapes (quantize_all at 4, 8 and 16 warps beside the separate passes, each
#        checked against the others); every kernel of one `sage` call at the three short shapes.
# table  default, split_prepass (the separate passes), pv16 and pv16_split_prepass timed beside
#        cuDNN at the four shapes (the README's table), with ptxas's registers.
# narrow the smoke's d = 40, 80 and 128 shapes (`sage`, and `sage16` at d = 40) against the
#        simulation and float64; the call's kernels at d = 40; default, wide_output (dp columns
#        sliced by XLA) and pv16 timed beside cuDNN at the four shapes.
# narrow2  default and pv16 timed again (the table's second process).
# overlap  do the pre-pass's kernels run side by side? The default pre-pass alone, wall clock,
#          with XLA's command buffers on and off, at 4608, 2x10x4096x64 and 2x8x4096x40; then
#          its kernels under Nsight Compute with warm caches (--cache-control none), whose sum
#          a serial run would take.
# injit    `sage` and cuDNN timed one jitted call at a time and 20 calls inside one jitted
#          program (benchmarks/in_jit_timing.py) at 4608, 2x10x4096x64 and 2x8x4096x40.
set -u
FINAL=${OUT:-out}
OUT=/tmp/round19
rm -rf "$OUT"
STEPS=${*:-check}
has() { [[ " $STEPS " == *" $1 "* ]]; }
if has check || has table; then  # calls 1-2 ran the one-launch pre-pass, since reverted
  echo "check and table need one_launch_prepass.patch (results/2026-12-02-h200-round19/) applied"
  exit 1
fi
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
mkdir -p "$OUT"
pack() { mkdir -p "$FINAL" && tar czf "$FINAL/round19-$(echo $STEPS | tr ' ' '-').tgz" -C "$OUT" .; }
source benchmarks/sage_steps.sh  # ncu_time, smoke, variants
if has check; then
  smoke smoke default 0,1,2,3 150
  smoke smoke_pv16 pv16 0,3 90
  for shape in "1 24 4608 128" "2 10 4096 64" "2 8 4096 40"; do
    tag=$(echo $shape | tr ' ' x)
    ncu_time "probe_$tag" "$OUT/probe_$tag.txt" 60 benchmarks/one_launch_probe.py $shape \
      | grep -E "call|quantize|token"
    grep -E "^w|ERROR" "$OUT/probe_$tag.txt" | head -n 4
    ncu_time "kernels_sage_$tag" /dev/null 60 benchmarks/profile_forward.py sage $shape
    pack
  done
fi
has table && variants table default,split_prepass,pv16,pv16_split_prepass 300
if has narrow; then
  smoke smoke default 0,2,3 130
  smoke smoke_pv16 pv16 0 60
  ncu_time kernels_sage_2x8x4096x40 /dev/null 60 benchmarks/profile_forward.py sage 2 8 4096 40
  pack
  variants narrow default,wide_output,pv16 280
fi
has narrow2 && variants narrow2 default,pv16 230
prepass_wall() {  # prepass_wall NAME XLA_FLAGS: the pre-passes alone and `sage` (default), wall clock
  XLA_FLAGS="$2" timeout 150 python3 benchmarks/sage_device.py --variants --only default --shapes 1,2,3 \
    --budget 120 --out "$OUT/$1" > "$OUT/$1.txt" 2>&1
  grep -E "prepass_pallas_v:|cudnn:|default:" "$OUT/$1.txt"
}
if has overlap; then
  prepass_wall cb_on ""
  prepass_wall cb_off --xla_gpu_enable_command_buffer=
  pack
  for shape in "1 24 4608 128" "2 10 4096 64"; do
    tag=$(echo $shape | tr ' ' x)
    timeout 60 ncu --clock-control none --cache-control none --metrics gpu__time_duration.sum \
      --csv python3 benchmarks/profile_forward.py sage $shape > "$OUT/warm_$tag.csv" 2> /dev/null
    echo "warm_$tag"; python3 benchmarks/kernel_times.py --table "$OUT/warm_$tag.csv"
  done
fi
if has injit; then
  timeout 270 python3 benchmarks/in_jit_timing.py --backends sage,cudnn > "$OUT/injit.txt" 2>&1
  grep -E "call|ERROR" "$OUT/injit.txt"
fi
pack
