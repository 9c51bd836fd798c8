"""`chunked` keeps memory linear in sequence length, forward and backward.

Proof by measurement: a child process runs a 32768 x 32768 attention (forward and gradients)
whose float32 score matrix alone would take 4 GiB, under a 1.5 GiB budget for its peak memory.
"""
import os
import subprocess
import sys
import textwrap

import pytest

SEQ = 32768
BUDGET_BYTES = 1.5 * 2 ** 30

CHILD = textwrap.dedent(f"""
    import jax, jax.numpy as jnp
    import jax_attn
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    q, k, v = (jax.random.normal(kk, (1, 1, {SEQ}, 16), jnp.float32) for kk in (k1, k2, k3))
    loss = lambda q, k, v: jnp.sum(jax_attn.attention_forward(q, k, v, backend="chunked") ** 2)
    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
    assert all(bool(jnp.isfinite(g).all()) for g in grads)
    # VmHWM: this program's own peak. (ru_maxrss would also count the forking parent's size.)
    hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0]
    print(int(hwm.split()[1]) * 1024)
""")


@pytest.mark.slow
def test_chunked_runs_a_sequence_whose_scores_do_not_fit_the_budget():
    score_bytes = SEQ * SEQ * 4
    assert score_bytes > 2 * BUDGET_BYTES
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    res = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, env=env,
                         cwd=os.path.dirname(os.path.dirname(__file__)), timeout=900)
    assert res.returncode == 0, res.stderr[-2000:]
    peak = int(res.stdout.strip().splitlines()[-1])
    assert peak < BUDGET_BYTES, f"peak RSS {peak / 2**30:.2f} GiB over the {BUDGET_BYTES / 2**30:.1f} GiB budget"
