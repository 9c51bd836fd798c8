#!/usr/bin/env bash
# H200 round 17 (issue 16). Calls made back to back on two machine starts (1-9, 10-11; the
# results README has each call's table; calls 3 and 4 were the mufu probe failing to compile,
# since fixed):
#
#   call 1  bash benchmarks/h200_round17.sh smoke wg3
#   call 2  bash benchmarks/h200_round17.sh pipes
#   call 5  bash benchmarks/h200_round17.sh mufu
#   call 6  bash benchmarks/h200_round17.sh bk
#   call 7  bash benchmarks/h200_round17.sh bk2
#   then, with 256-key blocks and MAGIC_I the default at d = 128:
#   call 8  bash benchmarks/h200_round17.sh smoke128 accuracy
#   call 9  bash benchmarks/h200_round17.sh final
#   calls 10, 11  bash benchmarks/h200_round17.sh d64
#   next    bash benchmarks/h200_round17.sh ring   (no machine was lent after call 11: it ran as
#           round 18's call 1, slower everywhere; SageConfig.compute_warpgroups and the `wg3*`
#           variants are gone since, so `smoke wg3` and `ring` no longer run)
#
# smoke   (call 1) the smoke shapes, masked, with three compute warpgroups (`wg3`), each against
#         its simulation and float64.
# wg3     (call 1) default, wg3 (Q K^T issued round robin), wg3_free, pv16 and pv16_wg3 at the
#         four shapes, timed beside cuDNN, with ptxas's registers and spills (registers_wg3.txt).
#         That call's turns (around Q K^T's issue only) were no faster anywhere and are gone,
#         with these two steps; SageConfig.compute_warpgroups=3 now holds the turn for P V and
#         the next Q K^T (`ring` below).
# pipes   (call 2) Nsight Compute's pipe utilisation of the `sage` kernel at 16k and 4608 tokens
#         and of cuDNN's at 16k (tensor, exp2 (xu), FMA, ALU, issue slots; the SpeedOfLight and
#         ComputeWorkloadAnalysis sections): which unit sets the pace.
# mufu    (call 5) benchmarks/mufu_probe.py: exp2 as f32, f16, f16x2 and bf16x2 PTX, its SASS
#         and its rate.
# bk, bk2 (calls 6, 7) at d = 128 (16k, 4608): default, bk256, bk256_magic, magic; then again
#         in a second process with pv16 (and pv16 at 256 keys, which exceeds shared memory).
# smoke128 the smoke's d = 80 and 128 shapes with the new default (masked, both layouts,
#         two-level on and off), against the simulation and float64.
# accuracy sage_device.py --accuracy (sage, sage16, their simulations and cuDNN against
#         float64, normal and outlier inputs, d = 64, 128, 2048 tokens).
# d64     at d = 64 and 40: default, rowsum_1level (O in one wgmma accumulator, l in fresh
#         columns), 1level_stages3 and stages3 (three K/V slots).
# ring    (next) three compute warpgroups again, now holding the tensor cores in turn
#         for their P V and next Q K^T (two softmaxes beside each warpgroup's matmuls): the
#         smoke's d = 40 and 128 shapes (masked) against the simulation and float64, then
#         default, wg3, wg3_free, pv16 and pv16_wg3 at the four shapes.
# final   default, default_bk128 (the round-16 default at d = 128) and pv16 at the four shapes,
#         then default and pv16 again in a second process: the README's table.
set -u
FINAL=${OUT:-out}
OUT=/tmp/round17
rm -rf "$OUT"
STEPS=${*:-smoke128 accuracy}
has() { [[ " $STEPS " == *" $1 "* ]]; }
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
mkdir -p "$OUT"
pack() { mkdir -p "$FINAL" && tar czf "$FINAL/round17-$(echo $STEPS | tr ' ' '-').tgz" -C "$OUT" .; }
# variants NAME ONLY TIMEOUT [BUDGET]: the four shapes, ptxas's report kept; or
# smoke NAME VARIANT TIMEOUT [SMOKE_SHAPES]; each prints its table (or verdicts) and packs.
variants() {
  MOSAIC_GPU_DUMP_PTXAS=1 timeout "$3" python3 benchmarks/sage_device.py --variants --only "$2" \
    --shapes 0,1,2,3 --skip-prepass --budget "${4:-$(( $3 - 30 ))}" --out "$OUT/$1" \
    > "$OUT/$1.txt" 2>&1
  python3 - "$OUT/$1.txt" > "$OUT/registers_$1.txt" <<'PY'
import sys
sys.path.insert(0, "benchmarks")
from kernel_registers import kernels
for name, regs, st, ld in kernels(open(sys.argv[1]).read()):
    print(f"{name:40s} {regs:4d} spill {st} / {ld}")
PY
  grep -c . "$OUT/registers_$1.txt"; grep -v "spill 0 / 0" "$OUT/registers_$1.txt" | head -n 8
  sed -n '/=== variants/,$p' "$OUT/$1.txt" | grep -v "pre-pass ms"
  grep -A20 "Traceback" "$OUT/$1.txt" | tail -n 25
  pack
}
smoke() {
  timeout "$3" python3 benchmarks/sage_device.py --smoke-variant "$2" --smoke-shapes "${4:-}" \
    --out "$OUT/$1" > "$OUT/$1.txt" 2>&1
  grep -E "ok$|FAIL|ERROR" "$OUT/$1.txt" | cut -c1-330 | tail -n 12
  grep -B2 -A12 "Traceback" "$OUT/$1.txt" | tail -n 30
  pack
}
has smoke128 && smoke smoke128 default 160 2,3
if has accuracy; then
  timeout 160 python3 benchmarks/sage_device.py --accuracy --out "$OUT/accuracy" > "$OUT/accuracy.txt" 2>&1
  grep -E "cos_min|ERROR" "$OUT/accuracy.txt" | grep -E "sage|ERROR" | head -n 16
  pack
fi
if has final; then
  variants final1 default,default_bk128,pv16 200 175
  variants final2 default,pv16 160 135
fi
pipes() {  # pipes NAME IMPL S KERNEL_REGEX
  local m=sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active
  m=$m,sm__inst_executed_pipe_xu.avg.pct_of_peak_sustained_active
  m=$m,sm__pipe_fma_cycles_active.avg.pct_of_peak_sustained_active
  m=$m,sm__pipe_alu_cycles_active.avg.pct_of_peak_sustained_active
  m=$m,smsp__issue_active.avg.pct_of_peak_sustained_active,gpc__cycles_elapsed.max
  m=$m,smsp__cycles_active.avg,sm__warps_active.avg.pct_of_peak_sustained_active
  timeout 150 ncu --clock-control none --section SpeedOfLight --section ComputeWorkloadAnalysis \
    --print-details all --metrics "$m" -k "regex:$4" --launch-count 1 \
    python3 benchmarks/profile_forward.py "$2" 1 24 "$3" 128 > "$OUT/pipes_$1.txt" 2>&1
  grep -E "gmma|pipe_xu|pipe_fma|pipe_alu|issue_active|cycles_elapsed|cycles_active|warps_active|Duration|Throughput|ERR" \
    "$OUT/pipes_$1.txt" | head -n 16
  pack
}
if has pipes; then
  pipes sage16k sage 16384 mosaic_gpu
  pipes sage4608 sage 4608 mosaic_gpu
  pipes cudnn16k cudnn 16384 "cudnn|sm90|flash|fmha"
fi
if has mufu; then  # is exp2 on f16x2 / bf16x2 pairs one MUFU issue, at twice the element rate?
  timeout 120 python3 benchmarks/mufu_probe.py > "$OUT/mufu.txt" 2>&1
  tail -n 8 "$OUT/mufu.txt"
  pack
fi
if has bk; then  # d = 128 only: 256-key blocks (half the O rescales per logit), with MAGIC_I
  timeout 200 python3 benchmarks/sage_device.py --variants --only default,bk256,bk256_magic,magic \
    --shapes 0,1 --skip-prepass --budget 170 --out "$OUT/bk" > "$OUT/bk.txt" 2>&1
  sed -n '/=== variants/,$p' "$OUT/bk.txt"; grep -A20 "Traceback" "$OUT/bk.txt" | tail -n 25
  pack
fi
if has ring; then  # three warpgroups holding the tensor cores in turn for P V + the next Q K^T
  smoke smoke_ring wg3 100 0,3
  variants ring default,wg3,wg3_free,pv16,pv16_wg3 240 210
fi
if has d64; then  # d = 64 and 40: one-level P V now that l has its own columns, three slots
  timeout 200 python3 benchmarks/sage_device.py --variants --only default,rowsum_1level,1level_stages3,stages3 \
    --shapes 2,3 --skip-prepass --budget 170 --out "$OUT/d64" > "$OUT/d64.txt" 2>&1
  sed -n '/=== variants/,$p' "$OUT/d64.txt" | grep -v "pre-pass ms"; grep -A20 "Traceback" "$OUT/d64.txt" | tail -n 25
  pack
fi
if has bk2; then  # the same in a second process, with sage16 (pv16) at 256-key blocks too
  timeout 220 python3 benchmarks/sage_device.py --variants --only default,bk256,bk256_magic,pv16 \
    --shapes 0,1 --skip-prepass --budget 190 --out "$OUT/bk2" > "$OUT/bk2.txt" 2>&1
  sed -n '/=== variants/,$p' "$OUT/bk2.txt" | grep -v "pre-pass ms"; grep -A20 "Traceback" "$OUT/bk2.txt" | tail -n 25
  pack
fi
pack
