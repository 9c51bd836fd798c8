#!/usr/bin/env bash
# H200 round 14 (issue 16): the 8-bit pre-pass with K's smoothing mean and V's channel amax
# from one Pallas pass (sage_prepass.token_stats) instead of two XLA reductions, the Pallas V pass
# the default (round 13). One call, no FA4:
#
#   bash benchmarks/h200_round14.sh times sage example
#
# times    GPU time of every kernel inside one call (kernel_times.py): sage (token_stats),
#          sage+vx (XLA's V transpose and V amax), sage16 (token_stats of K alone), cuDNN at
#          16k and 4608 (d = 128) and 4096 (d = 64, 40).
# sage     sage_device.py's default, vxla (SageConfig.v_pallas=False) and pv16 at the four
#          shapes, each checked against its simulation, then timed beside cuDNN; twice, in
#          two processes (the runs' spread).
# example  the example DiT sampled with 8-bit attention against bf16 (PSNR, largest pixel
#          difference): the smoothing mean is summed in another order.
# The SM clock, power and throttle reasons are sampled throughout (nvidia-smi, clocks.csv).
# The steps are round 13's (h200_round13.sh); only the code under them changed.
ROUND=14 exec bash "$(dirname "$0")/h200_round13.sh" "$@"
