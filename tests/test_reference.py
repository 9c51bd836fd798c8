"""The float64 reference's analytic gradients (`reference.attention_vjp`, with and without an lse
cotangent) against central finite differences of its own forward."""
import numpy as np
import pytest

from jax_attn import reference


@pytest.mark.parametrize("with_lse", [False, True])
def test_vjp_matches_finite_differences(with_lse):
    rng = np.random.default_rng(0)
    q, k, v = rng.standard_normal((1, 2, 3, 4)), rng.standard_normal((1, 1, 5, 4)), rng.standard_normal((1, 1, 5, 4))
    d_out, d_lse = rng.standard_normal((1, 2, 3, 4)), rng.standard_normal((1, 2, 3))
    lengths = np.array([4])

    def loss(q, k, v):
        out, lse = reference.attention(q, k, v, kv_lengths=lengths, is_causal=True, return_lse=True)
        return np.sum(out * d_out) + (np.sum(lse * d_lse) if with_lse else 0.0)

    grads = reference.attention_vjp(q, k, v, d_out, kv_lengths=lengths, is_causal=True,
                                    d_lse=d_lse if with_lse else None)[:3]
    args, eps = [q, k, v], 1e-6
    for i, analytic in enumerate(grads):
        numeric = np.zeros_like(args[i])
        for idx in np.ndindex(args[i].shape):
            plus, minus = [a.copy() for a in args], [a.copy() for a in args]
            plus[i][idx] += eps
            minus[i][idx] -= eps
            numeric[idx] = (loss(*plus) - loss(*minus)) / (2 * eps)
        np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-8)
