"""`make_attention_fn` inside Flax's own attention modules, against their default outputs and
against the float64 reference.

Tolerance: float32 outputs of the same computation by two implementations, 2e-5 relative (CPU
float32 agrees to ~1e-7; GPUs may use TF32 matmuls in one of them: then ~3e-4 and the reference
tolerance applies). Masks here never empty a whole query row: Flax averages the values there
while jax-attn returns zeros (documented).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jax_attn import reference
from jax_attn.adapters.flax import make_attention_fn

SAME = 2e-5 if jax.default_backend() == "cpu" else reference.TOLERANCE["float32"]


def rand(seed, *shape):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def keep_mask(seed, shape):
    m = np.array(jax.random.bernoulli(jax.random.key(seed), 0.6, shape))
    m[..., 0] = True  # every query keeps a key
    return jnp.asarray(m)


def spy(fn, calls):
    import inspect

    def wrapped(*a, **k):
        calls.append(k)
        return fn(*a, **k)

    wrapped.__signature__ = inspect.signature(fn)  # linen filters kwargs by the signature
    return wrapped


@pytest.mark.fast_every(2)
@pytest.mark.fast_diagonal  # the fast run: the first two cases, one per backend
@pytest.mark.parametrize("backend", ["xla", "chunked"])
@pytest.mark.parametrize("case", ["self", "cross_mask", pytest.param("causal", marks=pytest.mark.slow),
                                  pytest.param("self_mask_per_query", marks=pytest.mark.slow)])
def test_nnx_multihead_attention(backend, case):
    x, c = rand(0, 2, 6, 16), rand(1, 2, 5, 12)
    cross = case == "cross_mask"
    kw = dict(in_kv_features=12) if cross else {}
    calls = []
    default = nnx.MultiHeadAttention(4, 16, decode=False, rngs=nnx.Rngs(0), **kw)
    ours = nnx.MultiHeadAttention(4, 16, decode=False, rngs=nnx.Rngs(0),
                                  attention_fn=spy(make_attention_fn(backend), calls), **kw)
    args, call_kw = ((x, c, c) if cross else (x,)), {}
    if case == "cross_mask":
        call_kw["mask"] = keep_mask(2, (2, 1, 6, 5))
    elif case == "self_mask_per_query":
        call_kw["mask"] = keep_mask(3, (2, 4, 6, 6))
    elif case == "causal":
        call_kw["is_causal"] = True
    out = ours(*args, **call_kw)
    assert calls, "attention_fn was not called"
    assert reference.relative_error(out, default(*args, **call_kw)) < SAME


def test_nnx_adapter_matches_float64_reference():
    """The adapter alone, in Flax's (b, s, n, d) layout and mask convention, vs the reference."""
    q, k, v = rand(0, 2, 6, 4, 8), rand(1, 2, 5, 4, 8), rand(2, 2, 5, 4, 8)
    mask, bias = keep_mask(3, (2, 1, 6, 5)), rand(4, 1, 4, 6, 5)
    out = make_attention_fn("xla")(q, k, v, bias=bias, mask=mask)
    t = lambda a: np.asarray(a, np.float64).transpose(0, 2, 1, 3)
    ref_mask = np.where(np.asarray(mask), np.asarray(bias, np.float64), -np.inf)
    ref = reference.attention(t(q), t(k), t(v), attn_mask=ref_mask)
    assert reference.relative_error(out, ref.transpose(0, 2, 1, 3)) < reference.TOLERANCE["float32"]


@pytest.mark.slow  # Linen's module, compiled; the fast run has the NNX adapter tests
@pytest.mark.parametrize("batch_shape", [(2,), (2, 3)])
def test_linen_multihead_dot_product_attention(batch_shape):
    x, c = rand(0, *batch_shape, 6, 16), rand(1, *batch_shape, 5, 12)
    mask = keep_mask(2, batch_shape + (1, 6, 5))
    calls = []
    default = nn.MultiHeadDotProductAttention(num_heads=4)
    ours = nn.MultiHeadDotProductAttention(num_heads=4, attention_fn=spy(make_attention_fn("xla"), calls))
    params = default.init(jax.random.key(0), x, c)
    out = ours.apply(params, x, c, mask=mask)
    assert calls
    assert reference.relative_error(out, default.apply(params, x, c, mask=mask)) < SAME
    jitted = jax.jit(lambda p, x, c: ours.apply(p, x, c, mask=mask))(params, x, c)
    assert reference.relative_error(jitted, out) < SAME


def test_unsupported_options_raise():
    x = rand(0, 2, 6, 16)
    dropping = nnx.MultiHeadAttention(4, 16, decode=False, dropout_rate=0.1, deterministic=False,
                                      rngs=nnx.Rngs(0), attention_fn=make_attention_fn("xla"))
    with pytest.raises(NotImplementedError, match="dropout"):
        dropping(x)
    sowing = nnx.MultiHeadAttention(4, 16, decode=False, rngs=nnx.Rngs(0),
                                    attention_fn=make_attention_fn("xla"))
    with pytest.raises(NotImplementedError, match="sow_weights"):
        sowing(x, sow_weights=True)
    with pytest.raises(ValueError, match="query"):
        make_attention_fn("xla")(x, x, x)


def test_old_module_name_is_the_same_module():
    import jax_attn.adapters.flax as new
    import jax_attn.flax_adapters as old
    assert old is new and old.make_attention_fn is make_attention_fn
