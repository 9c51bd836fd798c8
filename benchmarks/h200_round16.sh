#!/usr/bin/env bash
# H200 round 16 (issue 16): P's row sum on the tensor cores (SageConfig.rowsum_mma: 8 rows of
# ones TMA'd below each V^T tile, so the P V wgmma's 8 extra accumulator columns hold the row
# sum and the softmax drops its per-logit add). Two visits; the results README has both:
#
#   bash benchmarks/h200_round16.sh smoke sage repeat
#
# smoke   the smoke shapes (d = 40, 64, 80, 128, masked, both layouts, two-level on and off)
#         with `rowsum`, each against its simulation.
# sage    sage_device.py's default, rowsum, rowsum_2level and pv16 at 16k and 4608 (d = 128),
#         4096 (d = 64, 40): checked against the simulation and float64, then timed beside cuDNN.
# repeat  default, rowsum and rowsum_2level again in a second process (the runs' spread).
# Visit 3, with rowsum the default (`bash benchmarks/h200_round16.sh smoke3 accuracy example`):
# smoke3   the smoke shapes, masked, with rowsum and with no_rowsum, each case also against
#          float64 (kernel and simulation): the row sum's gap to the simulation against what
#          it costs in accuracy.
# accuracy sage_device.py --accuracy (sage, sage16, their simulations and cuDNN against
#          float64, normal and outlier inputs, d = 64, 128, 2048 tokens).
# example  the example DiT sampled with 8-bit attention against bf16 (PSNR, largest pixel
#          difference).
# Visit 4 (`bash benchmarks/h200_round16.sh smoke128 magic`):
# smoke128 the smoke's d = 128 shape (masked, both layouts, two-level on and off) with rowsum
#          and no_rowsum, against the simulation and float64 (visit 3 ran out of time there).
# magic    default, magic (SageConfig.magic_acc: S's int32 accumulator starts at the exponent
#          trick's offset), pv16 and pv16_magic at the four shapes, checked, then timed.
# Visit 5, with magic_acc on at d <= 64 (`bash benchmarks/h200_round16.sh final`):
# final    the defaults of `sage` and `sage16` (pv16) and no_magic, then default and pv16
#          again in a second process: the README's table.
#
# Visit 1 ran an earlier state of the code (results/.../round16/visit1/): the ones in the same
# running accumulator at d = 128 too (wrong there, see SageConfig.rowsum_mma), and a lazy
# rescale (O rescaled only where a row's max grew by more than 2^t, behind a warp-vote branch,
# FlashAttention-4's trick), which was 10% slower at 16k and was removed. Its variants
# (lazy4, rowsum_lazy4, pv16_lazy8) no longer exist.
set -u
FINAL=${OUT:-out}
OUT=/tmp/round16
rm -rf "$OUT"
STEPS=${*:-smoke sage}
has() { [[ " $STEPS " == *" $1 "* ]]; }
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
mkdir -p "$OUT"
pack() { mkdir -p "$FINAL" && tar czf "$FINAL/round16-$(echo $STEPS | tr ' ' '-').tgz" -C "$OUT" .; }
# One sage_device.py run: variants NAME ONLY TIMEOUT [BUDGET] (the four shapes), or
# smoke NAME VARIANT TIMEOUT [SMOKE_SHAPES]; each prints its table (or verdicts) and packs.
variants() {
  timeout "$3" python3 benchmarks/sage_device.py --variants --only "$2" --shapes 0,1,2,3 \
    --skip-prepass --budget "${4:-$(( $3 - 30 ))}" --out "$OUT/$1" > "$OUT/$1.txt" 2>&1
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
has smoke && smoke smoke rowsum 100
has sage && variants sage1 default,rowsum,rowsum_2level,pv16 240 210
has repeat && variants sage2 default,rowsum,rowsum_2level 200 170
if has smoke3; then
  smoke smoke_rowsum rowsum 110
  smoke smoke_no_rowsum no_rowsum 110
fi
if has accuracy; then
  timeout 150 python3 benchmarks/sage_device.py --accuracy --out "$OUT/accuracy" > "$OUT/accuracy.txt" 2>&1
  grep -E "cos_min|ERROR" "$OUT/accuracy.txt" | grep -E "sage|ERROR" | head -n 16
  pack
fi
if has example; then
  timeout 150 python3 examples/denoise_and_maps.py --attention-8bit --steps 4 --out /tmp/example \
    > "$OUT/example.txt" 2>&1
  grep -E "vs bf16|Error|error" "$OUT/example.txt" | tail -n 8
  pack
fi
if has smoke128; then
  smoke smoke128_rowsum rowsum 80 3
  smoke smoke128_no_rowsum no_rowsum 80 3
fi
has magic && variants sage_magic default,magic,pv16,pv16_magic 200 170
if has final; then
  variants final1 default,no_magic,pv16 150 130
  variants final2 default,pv16 150 130
fi
pack
