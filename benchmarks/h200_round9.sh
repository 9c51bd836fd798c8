#!/usr/bin/env bash
# H200 round 9: one visit, three calls back to back (FA4's wheels travel in two folders,
# benchmarks/fa4_install.sh; tokamax's in .whl):
#
#   call 1, carry .fa4a:         bash benchmarks/fa4_install.sh stage && bash benchmarks/h200_round9.sh named_checks named_tune
#   call 2, carry .fa4b .whl:    bash benchmarks/h200_round9.sh peers
#   call 3:                      bash benchmarks/h200_round9.sh reduce_probe registers
#
# As it ran: calls 1 and 2 as above (call 2's tokamax rows failed: tokamax parsed the bench's
# arguments as its absl flags); call 3 instead re-ran the bench at once with the flags parsed
# first by hand (tokamax then failed on JAX 0.11.2's plgpu.kernel, which no longer takes
# out_shape=), then reduce_probe; `registers` did not run. Both are mended in
# jax_attn/bench/tokamax_compat.py, and the simulation's INT8 dot is now a float32 one. A second
# visit, two calls:
#
#   call 4, carry .fa4a:         bash benchmarks/fa4_install.sh stage && bash benchmarks/h200_round9.sh sim_probe named_profile
#   call 5, carry .fa4b .whl:    bash benchmarks/h200_round9.sh peers
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
# peers         `python -m jax_attn bench --shapes diffusion` with FA4 and tokamax installed:
#               every row of issue 15 in one run (ours, auto, cuDNN through JAX and torch, FA4
#               through JAX and torch, tokamax's Hopper kernel), forward and forward+backward.
# reduce_probe  benchmarks/reduce_compile_probe.py: which program of the 16k-token `sage` check
#               (the user's call or the simulation it is checked against) holds the fusion that
#               compiled for 2 min 40 s in rounds 7 and 8; the slow modules' HLO kept.
# sim_probe     reduce_compile_probe.py on the user's call and the simulation (op by op and
#               jitted) after the simulation's INT8 Q K^T became a float32 dot.
# named_profile Nsight Compute (round 5's sections) of the d = 128 forward at 16k tokens with
#               mbarrier and with named-barrier turns: does the long-scoreboard stall go?
# registers     benchmarks/kernel_registers.py: ptxas's registers and spills of every Mosaic
#               kernel at its defaults (does the 8-bit kernel spill?).
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
  timeout 200 python3 benchmarks/mosaic_gpu.py --quick --small-config '{"named_turns": true}' \
    --out "$OUT/named_checks" \
    > "$OUT/named_checks/checks.txt" 2>&1
  echo "named_checks exit $?"
  grep -E "small (PASS|FAIL)" "$OUT/named_checks/checks.txt" | cut -c60-200
  pack
fi
if has named_tune; then
  mkdir -p "$OUT/named_tune"
  timeout 270 python3 benchmarks/mosaic_gpu.py --quick --skip-small --fwd-only --tune \
    --tune-set named --budget 230 --out "$OUT/named_tune" > "$OUT/named_tune/stdout.txt" 2>&1
  grep -E "^\|" "$OUT/named_tune/stdout.txt" | tail -n 14
  pack
fi
if has peers; then
  source benchmarks/fa4_install.sh install
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/site || echo "tokamax install failed"
  python3 -c "import jax, torch, triton; print('jax', jax.__version__, 'torch', torch.__version__, \
'triton', triton.__version__); import flash_attn.cute; print('fa4 importable'); import tokamax; \
print('tokamax', tokamax.__version__)"
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  mkdir -p "$OUT/peers"
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.6 timeout 470 python3 -m jax_attn bench --shapes diffusion \
    --backends pallas,fa4,cudnn,auto,torch-cudnn,torch-fa4,tokamax --budget 400 --quiet \
    --json "$OUT/peers/bench.json" --csv "$OUT/peers/bench.csv" --plot "$OUT/peers/bench.png" \
    > "$OUT/peers/stdout.txt" 2>&1
  echo "bench exit $?"; grep -iE "Traceback|Error:" "$OUT/peers/stdout.txt" | head -n 5
  tail -n 45 "$OUT/peers/stdout.txt" | cut -c1-220
  pack
fi
if has reduce_probe; then
  timeout 260 python3 benchmarks/reduce_compile_probe.py --limit 45 --out "$OUT/reduce_probe" \
    > "$OUT/reduce_probe.txt" 2>&1
  cat "$OUT/reduce_probe.txt"
  pack
fi
if has sim_probe; then
  timeout 200 python3 benchmarks/reduce_compile_probe.py --only user,sim,sim_jit --limit 60 \
    --out "$OUT/sim_probe" > "$OUT/sim_probe.txt" 2>&1
  cat "$OUT/sim_probe.txt"
  pack
fi
if has named_profile; then
  mkdir -p "$OUT/named_profile"
  for v in 'mbarrier|{}' 'named|{"named_turns": true}'; do
    timeout 150 ncu --clock-control none --section SpeedOfLight --section WarpStateStats \
      --section LaunchStats --print-details all \
      --metrics smsp__inst_executed.sum,smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio,smsp__average_warps_issue_stalled_barrier_per_issue_active.ratio \
      -k regex:"attention|flash|mosaic|kernel" --launch-skip 0 --launch-count 1 \
      python3 benchmarks/profile_forward.py mosaic 1 40 16384 128 fwd "${v#*|}" \
      > "$OUT/named_profile/${v%%|*}.txt" 2>&1
    echo "== ${v%%|*}"
    grep -iE "Duration|long_scoreboard|stalled_barrier|inst_executed.sum|Registers Per" \
      "$OUT/named_profile/${v%%|*}.txt" | head -n 12
  done
  pack
fi
if has registers; then
  timeout 150 python3 benchmarks/kernel_registers.py --out "$OUT/registers" \
    > "$OUT/registers.txt" 2>&1
  tail -n 20 "$OUT/registers.txt"
  pack
fi
pack
