"""What coarser K scales cost the 8-bit scheme in accuracy (CPU; the jnp simulation against
float64): one INT8 scale per key (the default) against one per 64 or 128 keys, the granularity
that would let the kernel fold the K scale into its exp2 FMA (two instructions per logit fewer,
benchmarks/results/2026-11-30-h200-round6/README.md). Worst head of two, 1024 tokens, the test
suite's input families (standard normal; heavy-tailed Q with a large per-channel K offset).

    python benchmarks/sage_scale_granularity.py
"""
import pathlib
import sys

import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))
from test_sage import family  # noqa: E402  (the families the accuracy tests use)

from jax_attn import quantization as Q  # noqa: E402
from jax_attn import reference  # noqa: E402

print("inputs   d    P V     keys per K scale: cosine (worst head) / relative L1")
for fam in ("normal", "outlier"):
    for d in (64, 128):
        q, k, v = family(fam, (1, 2, 1024, d), (1, 2, 1024, d))
        ref = reference.attention(q, k, v)
        for pv16 in (False, True):
            cells = []
            for k_rows in (1, 64, 128):
                out, _ = Q.sage_reference(*(jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)),
                                          block_k=128, k_rows=k_rows, pv16=pv16, fused_softmax=True)
                a = Q.accuracy(np.asarray(out, np.float64), ref)
                cells.append(f"{k_rows:>3}: {a['cos_min']:.6f} / {a['rel_l1_max']:.4f}")
            print(f"{fam:8} {d:<4} {'16-bit' if pv16 else 'FP8':7} " + "   ".join(cells), flush=True)
