#!/usr/bin/env bash
# H200 round 21 (issue 16): Q quantized inside the `sage` kernel (SageConfig.q_in_kernel, no
# faster, reverted); a persistent grid (SageConfig.persistent, since the default).
# Calls (the results' call<N>/):
#
#   call 1  bash benchmarks/h200_round21.sh qfuse
#   call 2  bash benchmarks/h200_round21.sh kernels
#   call 3  bash benchmarks/h200_round21.sh kernels_short profile
#   (q_in_kernel was no faster: reverted, its code kept as results/2026-12-02-h200-round21/
#   q_in_kernel.patch, so qfuse, kernels and kernels_short no longer run as they did)
#   call 4  bash benchmarks/h200_round21.sh persist
#   call 5  bash benchmarks/h200_round21.sh persist_kernels
#   calls 6, 7  by hand: OUT=... source benchmarks/sage_steps.sh; variants persist2 (persist3)
#           persistent,default 170 (before persistent became the default)
#   (persistent is the default since: persist and persist_kernels now time it against
#   grid_per_tile, the one-CTA-per-tile grid the default ran in calls 4-7)
#
# qfuse    the smoke shapes against the simulation and float64 with the default (which now
#          quantizes Q in the kernel where the CTAs' rows are whole: shapes 1, 3, 4, 5), then
#          the default, q_prepass (Q by the pre-pass's pass, the old default) and sage16 both
#          ways at the four timed shapes beside cuDNN, with ptxas's registers and spills.
# kernels  Nsight Compute's time of every kernel of one call, q_in_kernel on and off, at the
#          four timed shapes (what the kernel's prologue costs against the pass it replaces).
# kernels_short  the same at the three shorter shapes, each run tried twice (Nsight Compute
#          failed on some in call 2).
# persist  SageConfig.persistent (one CTA per SM looping over query tiles): the smoke shapes
#          against the simulation and float64, then the default, persistent and sage16 both
#          ways at the four timed shapes beside cuDNN, with ptxas's registers and spills.
# persist_kernels  Nsight Compute's time of every kernel of one call, persistent and not, at
#          the four timed shapes.
# profile  Nsight Compute's per-SASS-instruction warp samples of the default at 1x24x4608x128
#          (in call 3 the default quantized Q in the kernel: where its prologue's time went).
set -u
FINAL=${OUT:-out}
OUT=/tmp/round21
rm -rf "$OUT"
STEPS=${*:-qfuse}
has() { [[ " $STEPS " == *" $1 "* ]]; }
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
mkdir -p "$OUT"
pack() { mkdir -p "$FINAL" && tar czf "$FINAL/round21-$(echo $STEPS | tr ' ' '-').tgz" -C "$OUT" .; }
source benchmarks/sage_steps.sh  # ncu_time, smoke, variants
if has qfuse || has kernels || has kernels_short; then
  echo "qfuse, kernels and kernels_short need q_in_kernel.patch (results/2026-12-02-h200-round21/)"
  exit 1
fi
if has persist; then
  smoke smoke_persist persistent 1,3,0,2 150
  variants persist grid_per_tile,persistent,pv16_grid_per_tile,pv16_persistent 270
fi
if has persist_kernels; then
  for shape in "1 24 4608 128" "2 10 4096 64" "2 8 4096 40" "1 24 16384 128"; do
    tag=$(echo $shape | tr ' ' x)
    for cfg in default persistent; do  # default: the one-CTA-per-tile grid, as in call 5
      json='{"persistent": false}'; [ $cfg = persistent ] && json='{}'
      ncu_time "kernels_${cfg}_$tag" "$OUT/kernels_${cfg}_$tag.err" 60 \
        benchmarks/profile_forward.py sage $shape fwd "$json"
    done
  done
  pack
fi
if has qfuse; then
  smoke smoke_qfuse default 1,3,4,5,0 200
  variants qfuse default,q_prepass,pv16,pv16_q_prepass 300
fi
if has kernels; then
  for shape in "1 24 16384 128" "1 24 4608 128" "2 10 4096 64" "2 8 4096 40"; do
    tag=$(echo $shape | tr ' ' x)
    ncu_time "kernels_fused_$tag" /dev/null 60 benchmarks/profile_forward.py sage $shape fwd '{}'
    ncu_time "kernels_prepass_$tag" /dev/null 60 benchmarks/profile_forward.py sage $shape fwd \
      '{"q_in_kernel": false}'
  done
  pack
fi
if has kernels_short; then
  for shape in "1 24 4608 128" "2 10 4096 64" "2 8 4096 40"; do
    tag=$(echo $shape | tr ' ' x)
    for cfg in fused prepass; do
      json='{}'; [ $cfg = prepass ] && json='{"q_in_kernel": false}'
      for try in 1 2; do
        ncu_time "kernels_${cfg}_$tag" "$OUT/kernels_${cfg}_$tag.err" 100 \
          benchmarks/profile_forward.py sage $shape fwd "$json" | tee "$OUT/t.txt"
        grep -q "kernel_mosaic" "$OUT/t.txt" && break
      done
    done
  done
  pack
fi
if has profile; then
  profile profile_fused 1 24 4608 128 '{}'
fi
