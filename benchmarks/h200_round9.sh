#!/usr/bin/env bash
# H200 round 9 (prepared at the end of round 8, not yet run). Calls back to back, no FA4:
#
#   call 1:  bash benchmarks/h200_round9.sh named_checks named_tune
#   call 2:  bash benchmarks/h200_round9.sh registers reduce_probe
#   call 3, carry .whl:  bash benchmarks/h200_round9.sh tokamax_bench
#
# .whl (ignored; 3.7 MB, downloaded here as the device README says, py3.12): tokamax 0.0.12 and
# what the image lacks of its needs: einshape, pydantic 2.14.4 (+ pydantic-core, annotated-types,
# typing-inspection, typing-extensions >= 4.16), qwix, typeguard 2.13.3, immutabledict,
# tensorboardx.
#
# named_checks  mosaic_gpu.py's small checks with {"named_turns": true}: where the head dim's
#               default has the overlap (d = 128) the forward's turns run on hardware named
#               barriers (MosaicConfig.named_turns), checked against float64 on the GPU for the
#               first time. Under `timeout`: a wrong barrier protocol hangs rather than fails.
# named_tune    `--tune-set named --fwd-only`: named against mbarrier turns, d = 40/64/128.
# registers     benchmarks/kernel_registers.py: ptxas's registers and spills of every Mosaic
#               kernel at its defaults (does the 8-bit kernel spill?).
# reduce_probe  benchmarks/reduce_compile_probe.py: which token-axis reduction of the `sage`
#               pre-pass compiles for minutes at 16k tokens.
# tokamax_bench `python -m jax_attn bench --shapes diffusion` with tokamax installed: its Hopper
#               kernel as a peer row beside ours, cuDNN and auto (no torch rows: they are in
#               round 4), forward and forward+backward.
set -u
FINAL=${OUT:-out}
OUT=/tmp/round9
rm -rf "$OUT"
STEPS=${*:-named_checks}
has() { [[ " $STEPS " == *" $1 "* ]]; }
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
mkdir -p "$OUT"
pack() {
  mkdir -p "$FINAL" && tar czf "$FINAL/round9-$(echo $STEPS | tr ' ' '-').tgz" -C "$OUT" .
}
if has named_checks; then
  mkdir -p "$OUT/named_checks"
  timeout 240 python3 benchmarks/mosaic_gpu.py --quick --small-config '{"named_turns": true}' \
    --out "$OUT/named_checks" \
    > "$OUT/named_checks/checks.txt" 2>&1
  echo "named_checks exit $?"
  grep -E "small (PASS|FAIL)" "$OUT/named_checks/checks.txt" | cut -c60-200
  pack
fi
if has named_tune; then
  mkdir -p "$OUT/named_tune"
  timeout 330 python3 benchmarks/mosaic_gpu.py --quick --skip-small --fwd-only --tune \
    --tune-set named --budget 290 --out "$OUT/named_tune" > "$OUT/named_tune/stdout.txt" 2>&1
  grep -E "^\|" "$OUT/named_tune/stdout.txt" | tail -n 14
  pack
fi
if has registers; then
  timeout 300 python3 benchmarks/kernel_registers.py --out "$OUT/registers" \
    > "$OUT/registers.txt" 2>&1
  tail -n 20 "$OUT/registers.txt"
  pack
fi
if has tokamax_bench; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=$PWD:/tmp/site || echo "tokamax install failed"
  mkdir -p "$OUT/tokamax_bench"
  timeout 540 python3 -m jax_attn bench --shapes diffusion --no-torch --budget 480 \
    --backends pallas,cudnn,auto,tokamax --json "$OUT/tokamax_bench/bench.json" \
    > "$OUT/tokamax_bench/stdout.txt" 2>&1
  tail -n 40 "$OUT/tokamax_bench/stdout.txt"
  pack
fi
if has reduce_probe; then
  timeout 220 python3 benchmarks/reduce_compile_probe.py > "$OUT/reduce_probe.txt" 2>&1
  cat "$OUT/reduce_probe.txt"
  pack
fi
pack
