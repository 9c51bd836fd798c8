"""Packed sequences (segment ids) under `sequence_parallel` and `shard_local`, against float64.

Ulysses all-gathers the ids to the sequence its heads span, the ring sends the key ids round with
their keys, the hybrid does both; `shard_local` splits them with the batch (and the queries). The
segments are contiguous runs that straddle the device boundaries, plus a query segment with no
key (an empty row: zeros, lse -inf) and a key segment with no query that holds NaN (it must reach
nothing). Helpers and tolerances are test_parallel's; 333 tokens divide by no device count, so
the padding path runs too.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from test_parallel import TOL, check, make, mesh

import jax_attn
from jax_attn import parallel, reference

EMPTY_ID, LONELY_ID = 70, 90


def packed(rng, b, s, runs=5):
    """int32 `(b, s)`: `runs` contiguous segments of random lengths per sample."""
    cuts = np.sort(rng.choice(np.arange(1, s), (b, runs - 1), replace=True), -1)
    return np.stack([np.searchsorted(c, np.arange(s), side="right") for c in cuts]).astype(np.int32)


def with_segments(rng, q, k, v, kw, cross=False):
    """Adds segment ids to `kw`, an empty query row and a lonely NaN key (bnsd or bsnd inputs)."""
    layout = kw["layout"]
    seq = 2 if layout == "bnsd" else 1
    b, sq, skv = q.shape[0], q.shape[seq], k.shape[seq]
    q_ids = packed(rng, b, sq)
    kv_ids = packed(rng, b, skv) if cross else q_ids.copy()
    q_ids[0, sq // 2] = EMPTY_ID
    kv_ids[-1, skv // 3] = LONELY_ID
    nan_at = (-1, slice(None), skv // 3) if layout == "bnsd" else (-1, skv // 3)
    k, v = k.at[nan_at].set(jnp.nan), v.at[nan_at].set(jnp.nan)
    return k, v, dict(kw, q_segment_ids=jnp.asarray(q_ids), kv_segment_ids=jnp.asarray(kv_ids))


def nan_free_check(q, k, v, kw, backend, context, **check_kw):
    """`check`, with the reference fed the lonely key as zeros (it sees nothing either way; the
    float64 reference multiplies by zero probabilities, which NaN would poison)."""
    import test_parallel
    expected = test_parallel.expected

    def clean(q, k_, v_, kw_, d_out):
        return expected(q, jnp.nan_to_num(k_), jnp.nan_to_num(v_), kw_, d_out)

    test_parallel.expected = clean
    try:
        check(q, k, v, kw, backend, context, **check_kw)
    finally:
        test_parallel.expected = expected


def contexts():
    return {
        "ulysses": lambda: parallel.sequence_parallel(mesh(4), "sp", "ulysses"),
        "ring": lambda: parallel.sequence_parallel(mesh(4), "sp", "ring"),
        "hybrid": lambda: parallel.sequence_parallel(mesh(2, 2, names=("r", "u")), "u", ring_axis="r"),
    }


CASES = {
    "self, causal": dict(make=dict(causal=True), cross=False),
    "self, kv_lengths, bsnd": dict(make=dict(lengths=[300, 41], layout="bsnd"), cross=False),
    "cross, key mask, GQA": dict(make=dict(sq=200, skv=333, mask="key", n=8, n_kv=2), cross=True),
    "self, full mask": dict(make=dict(mask="full"), cross=False),
}


@pytest.mark.fast_every(3)
@pytest.mark.parametrize("method", ["ulysses", "ring", "hybrid"])
@pytest.mark.parametrize("case", list(CASES))
def test_segments_under_sequence_parallel(method, case):
    rng = np.random.default_rng([21, list(CASES).index(case), ["ulysses", "ring", "hybrid"].index(method)])
    q, k, v, kw = make(rng, **CASES[case]["make"])
    k, v, kw = with_segments(rng, q, k, v, kw, CASES[case]["cross"])
    nan_free_check(q, k, v, kw, "naive", contexts()[method]())


@pytest.mark.parametrize("method", ["ring", "hybrid"])
def test_segments_with_the_recompute_backward_and_bias_gradient(method):
    """`chunked` inside the ring: its blocks are recomputed and pulled back through their lse."""
    rng = np.random.default_rng(22)
    q, k, v, kw = make(rng, sq=150, skv=150, mask="bias", causal=True)
    k, v, kw = with_segments(rng, q, k, v, kw)
    nan_free_check(q, k, v, kw, "chunked", contexts()[method](), bias_grad=True)


@pytest.mark.slow
def test_segments_with_the_triton_kernel_in_the_ring():
    """`pallas` (interpret mode): the forward's tile skipping and the stats backward take the ids."""
    rng = np.random.default_rng(23)
    q, k, v, kw = make(rng, n=2, n_kv=2, sq=64, skv=64, causal=True)
    k, v, kw = with_segments(rng, q, k, v, kw)
    nan_free_check(q, k, v, kw, "pallas", parallel.sequence_parallel(mesh(2), "sp", "ring"))


def test_segments_with_shard_local():
    """Batch and heads split; then queries split too (cross-attention to whole keys)."""
    rng = np.random.default_rng(24)
    m = mesh(2, 2, names=("data", "sp"))
    q, k, v, kw = make(rng, sq=101, skv=77, mask="key")
    k, v, kw = with_segments(rng, q, k, v, kw, cross=True)
    nan_free_check(q, k, v, kw, "naive", parallel.shard_local(m, batch_axis="data", head_axis="sp"))
    nan_free_check(q, k, v, kw, "naive", parallel.shard_local(m, batch_axis="data", query_axis="sp"))


@pytest.mark.parametrize("method", ["ulysses", "ring", "hybrid"])
def test_segments_inside_a_users_shard_map(method):
    """The caller's own shard_map: the ids are local blocks like q, k, v; forward and gradients."""
    hybrid = method == "hybrid"
    m = mesh(2, 2, names=("r", "u")) if hybrid else mesh(4)
    axis = ("r", "u") if hybrid else "sp"  # the hybrid's sequence is laid ring major
    rng = np.random.default_rng(25)
    q, k, v, _ = make(rng, sq=128, skv=128)
    ids = jnp.asarray(packed(rng, 2, 128))
    d_out = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)

    def body(q, k, v, ids, d_out):
        def loss(q, k, v):
            context = (parallel.sequence_parallel(None, "u", ring_axis="r") if hybrid
                       else parallel.sequence_parallel(None, "sp", method))
            with context:
                out = jax_attn.attention_forward(q, k, v, is_causal=True, backend="naive",
                                                 q_segment_ids=ids, kv_segment_ids=ids)
            return jnp.sum(out * d_out), out
        grads, out = jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
        return (out, *grads)

    seq = P(None, None, axis, None)
    f = jax.jit(parallel._shard_map(body, m, (seq, seq, seq, P(None, axis), seq), (seq,) * 4))
    out, *grads = f(q, k, v, ids, d_out)
    ids64 = dict(q_segment_ids=np.asarray(ids), kv_segment_ids=np.asarray(ids))
    assert reference.relative_error(out, reference.attention(q, k, v, is_causal=True, **ids64)) <= TOL
    want = reference.attention_vjp(q, k, v, d_out, None, None, True, **ids64)
    for name, g, r in zip("qkv", grads, want):
        assert reference.relative_error(g, r) <= 2 * TOL, f"d{name}"


def test_wide_ids_inside_a_users_shard_map_raise():
    """64-bit ids would be renumbered on each device separately: refused, naming the arguments."""
    enable_x64 = getattr(jax, "enable_x64", None)
    if enable_x64 is None:
        from jax.experimental import enable_x64
    m = mesh(2)
    rng = np.random.default_rng(27)
    q, k, v, _ = make(rng, sq=64, skv=64)

    def body(q, k, v, ids):
        with parallel.sequence_parallel(None, "sp", "ring"):
            return jax_attn.attention_forward(q, k, v, backend="naive", q_segment_ids=ids, kv_segment_ids=ids)

    seq = P(None, None, "sp", None)
    with enable_x64(True):
        ids = jnp.asarray(np.repeat([7, 2**40], 32)[None].repeat(2, 0), jnp.int64)
        f = jax.jit(parallel._shard_map(body, m, (seq, seq, seq, P(None, "sp")), seq))
        with pytest.raises(TypeError, match="q_segment_ids.*renumber"):
            f(q, k, v, ids)


def test_segments_match_the_single_device_result():
    """The same call on one device and on four, bf16 through the ring: the ids change nothing else."""
    rng = np.random.default_rng(26)
    q, k, v, kw = make(rng, sq=256, skv=256, causal=True)
    k, v, kw = with_segments(rng, q, k, v, kw)
    q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
    one = jax_attn.attention_forward(q, k, v, backend="naive", **kw)
    with parallel.sequence_parallel(mesh(4), "sp", "ring"):
        four = jax.jit(lambda q, k, v: jax_attn.attention_forward(q, k, v, backend="naive", **kw))(q, k, v)
    assert not np.isnan(np.asarray(four, np.float32)).any()
    err = reference.relative_error(np.asarray(four, np.float64), np.asarray(one, np.float64))
    assert err <= reference.TOLERANCE["bfloat16"]
