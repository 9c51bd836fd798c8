#!/usr/bin/env bash
# H200 round 20 (issue 16): where the `sage` kernel's time goes, by ablation. Calls (the
# results' call<N>/):
#
#   call 1  bash benchmarks/h200_round20.sh ablate profile
#   call 2  bash benchmarks/h200_round20.sh paired
#   call 3  bash benchmarks/h200_round20.sh why_paired
#   call 4  bash benchmarks/h200_round20.sh paired2
#   (paired_issue was slower in every form: reverted, its code kept as
#   results/2026-12-02-h200-round20/paired_issue.patch, so paired, why_paired and paired2 no
#   longer run as they did)
#   call 5  bash benchmarks/h200_round20.sh named
#   (named_sched was slower too: reverted, kept as results/2026-12-02-h200-round20/
#   named_sched.patch, so `named` no longer runs)
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
# named    SageConfig.named_sched (the schedule barrier as a named barrier): the smoke shapes
#          against the simulation and float64, then timed beside the default (and sage16 both
#          ways) at the four shapes.
# paired2  paired_issue with fewer registers in flight (P through shared memory at 128 keys;
#          64-key blocks), timed beside the default with ptxas's serialization notes.
# why_paired  paired_issue without spills (128-key blocks) with its softmax or its matmuls taken
#          away, beside the default's, at 16k and 4608 tokens; then its per-instruction profile
#          at 4608.
set -u
FINAL=${OUT:-out}
OUT=/tmp/round20
rm -rf "$OUT"
STEPS=${*:-ablate}
has() { [[ " $STEPS " == *" $1 "* ]]; }
if has paired || has paired2 || has why_paired || has named; then
  echo "paired, paired2 and why_paired need paired_issue.patch, named needs named_sched.patch"
  echo "(both in benchmarks/results/2026-12-02-h200-round20/)"
  exit 1
fi
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
mkdir -p "$OUT"
pack() { mkdir -p "$FINAL" && tar czf "$FINAL/round20-$(echo $STEPS | tr ' ' '-').tgz" -C "$OUT" .; }
source benchmarks/sage_steps.sh  # ncu_time, smoke, variants, profile
if has paired; then
  smoke smoke_paired paired 0,1,2,3 150
  variants paired default,paired,paired_bk128,paired_1level,paired_smem,pv16,pv16_paired 360
fi
if has paired2; then
  smoke smoke_paired2 paired_smem_bk128 3 60
  variants paired2 default,paired_smem_bk128,paired_bk64 240
  grep -E "C751|serialized" "$OUT/paired2.txt" | cut -c1-160 | sort | uniq -c
fi
if has named; then
  smoke smoke_named named_sched 0,1,2,3 150
  variants named default,named_sched,pv16,pv16_named_sched 240
fi
if has ablate; then
  timeout 360 python3 benchmarks/sage_ablation.py > "$OUT/ablate.txt" 2>&1
  grep -E "vs default|failed|Error" "$OUT/ablate.txt" | cut -c1-200 | head -n 20
  pack
fi
if has profile; then
  profile profile 1 24 16384 128 '{}'
fi
if has why_paired; then
  timeout 200 python3 benchmarks/sage_ablation.py --shapes 0,1 --variants \
    default,gemm_only,paired_bk128,gemm_only@paired_bk128,softmax_only@paired_bk128 \
    > "$OUT/why_paired.txt" 2>&1
  grep -E "vs default|failed|Error|^\|" "$OUT/why_paired.txt" | cut -c1-200
  pack
  profile profile_paired 1 24 4608 128 '{"paired_issue": true, "block_kv": 128}'
fi
pack
[ -f "$OUT/ablate.txt" ] && grep -E "^\|" "$OUT/ablate.txt"
true
