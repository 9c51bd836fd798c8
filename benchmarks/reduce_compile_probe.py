"""How long XLA takes to compile the `sage` pre-pass's token-axis reductions at 16k tokens.

    PYTHONPATH=. python benchmarks/reduce_compile_probe.py [b s n d]

On the H200 (rounds 7 and 8) one `input_reduce_fusion` of the 16k-token `sage` call took
2 min 40 s to compile. Each candidate compiles in its own process under a 45 s limit: K's
smoothing mean and V's channel amax as written (`quantization.smoothing_mean`,
`v_channel_scale`), and the same sums in two stages (tokens split into 128-row chunks).
"""
import subprocess
import sys
import time

CANDIDATES = ("mean", "mean_two_stage", "amax", "amax_two_stage")


def build(name, b, s, n, d):
    import jax
    import jax.numpy as jnp

    from jax_attn import quantization as Q

    def two_stage(x, reduce):  # (b, s, n, d) -> (b, n, d), tokens in chunks of 128
        x = x.astype(jnp.float32)
        pad = -s % 128
        x = jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0)))
        return reduce(reduce(x.reshape(b, (s + pad) // 128, 128, n, d), 2), 1)

    fns = {
        "mean": lambda k: Q.smoothing_mean(k, "bsnd"),
        "mean_two_stage": lambda k: two_stage(k, lambda x, a: jnp.sum(x, a)) / s,
        "amax": lambda v: Q.v_channel_scale(v.astype(jnp.float32), 1),
        "amax_two_stage": lambda v: two_stage(jnp.abs(v), lambda x, a: jnp.max(x, a)),
    }
    x = jax.ShapeDtypeStruct((b, s, n, d), jnp.bfloat16)
    t0 = time.time()
    jax.jit(fns[name]).lower(x).compile()
    return time.time() - t0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--one"]:
        print(f"{build(sys.argv[2], *map(int, sys.argv[3:7])):.1f}")
        sys.exit()
    shape = sys.argv[1:5] or ["1", "16384", "24", "128"]
    for name in CANDIDATES:
        try:
            out = subprocess.run([sys.executable, __file__, "--one", name, *shape], timeout=45,
                                 capture_output=True, text=True)
            res = out.stdout.strip().splitlines()[-1] + " s" if out.returncode == 0 else \
                "error: " + out.stderr.strip().splitlines()[-1][:200]
        except subprocess.TimeoutExpired:
            res = "over 45 s"
        print(f"{'x'.join(shape)} {name:16s} compile {res}", flush=True)
