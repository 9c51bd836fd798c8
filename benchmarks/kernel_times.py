"""GPU time of every kernel inside one attention call, for Nsight Compute: what the 8-bit
backends' pre-pass costs inside the call (not timed alone, where dispatch dominates).

    ncu --clock-control none --metrics gpu__time_duration.sum --csv --print-units base \
        python benchmarks/kernel_times.py sage:1,24,16384,128 cudnn:1,24,16384,128 > raw.csv
    python benchmarks/kernel_times.py --table raw.csv

Each `impl:b,n,s,d` runs once, jitted, on (b, s, n, d) bf16 inputs made on the host; between
calls a tiny sort runs as a marker, so `--table` can split the kernel list into calls (a
call's compile launches no kernels of its own). A CSV without markers (one call of
profile_forward.py, or prepass_probe.py's variants) is one call; values in any of Nsight
Compute's time units are read as such (without `--print-units base` it scales them). `impl` as in
profile_forward.py: cudnn, mosaic, or a backend name (sage, sage16, pallas, fa4 ...); `sage+vx`:
`sage` with XLA's V pass instead of the Pallas one (`SageConfig.v_pallas=False`).
"""
import csv
import sys


def run(specs):
    import jax
    import jax.numpy as jnp
    import numpy as np

    import jax_attn

    marker = jax.jit(lambda x: jnp.sort(x))
    tiny = jnp.arange(8, 0, -1, dtype=jnp.float32)
    for spec in specs:
        impl, dims = spec.split(":")
        b, n, s, d = map(int, dims.split(","))
        x = jax.device_put(np.random.default_rng(0).standard_normal((b, s, n, d)).astype(jnp.bfloat16))
        if impl.endswith("+vx"):  # the 8-bit backend with XLA's V pass (SageConfig.v_pallas=False)
            from jax_attn.kernels import sage_attention as S
            from jax_attn.kernels.sage_forward import SageConfig
            cfg = SageConfig(pv_bits=16 if impl.startswith("sage16") else 8, v_pallas=False)
            fn = jax.jit(lambda q, k, v, cfg=cfg: S.sage_attention(q, k, v, layout="bsnd", config=cfg))
        elif impl == "cudnn":
            fn = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="cudnn"))
        else:
            fn = jax.jit(lambda q, k, v, impl=impl: jax_attn.attention_forward(
                q, k, v, layout="bsnd", backend=impl))
        jax.block_until_ready(marker(tiny))
        jax.block_until_ready(fn(x, x, x))
    jax.block_until_ready(marker(tiny))
    print("calls:", " ".join(specs), file=sys.stderr)


AUTOTUNER = ("stream_executor", "void stream_executor")
_US = {"ns": 1e-3, "nsecond": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3}


def table(path):
    """Per call (between markers; in the order of the specs run gave): each kernel's
    microseconds and the call's sum."""
    with open(path) as f:
        lines = [ln for ln in f if ln.startswith('"')]
    rows = [r for r in csv.DictReader(lines) if r.get("Metric Name") == "gpu__time_duration.sum"]
    marked = any("sort" in r["Kernel Name"].lower() for r in rows)
    calls = [] if marked else [[]]  # without markers the whole CSV is one call
    cur = None if marked else calls[0]
    for r in rows:
        name = r["Kernel Name"]
        us = float(r["Metric Value"].replace(",", "")) * _US.get(r.get("Metric Unit", "ns"), 1e-3)
        if marked and "sort" in name.lower():
            cur = []
            calls.append(cur)
        elif cur is not None:
            cur.append((name[:60], us))
    for i, call in enumerate(c for c in calls if c):  # a marker may launch several kernels
        # XLA's autotuner runs candidates (and its own stream_executor kernels) at the first
        # compile: the call's own kernels are those after its last autotuning kernel.
        tuned = [j for j, (name, _) in enumerate(call) if name.startswith(AUTOTUNER)]
        call = call[tuned[-1] + 1:] if tuned else call
        total = sum(us for _, us in call)
        print(f"call {i}: {total:.1f} us in {len(call)} kernels")
        for name, us in call:
            print(f"  {us:9.1f} us  {us / total:6.1%}  {name}")


if __name__ == "__main__":
    if sys.argv[1] == "--table":
        table(sys.argv[2])
    else:
        run(sys.argv[1:])
