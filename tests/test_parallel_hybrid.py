"""Ulysses x ring over two mesh axes (`sequence_parallel(mesh, "u", ring_axis="r")`) and the ring's
backward from global statistics, against the float64 reference, forward and gradients.

4 simulated CPU devices as a 2 x 2 mesh ("r", "u"), and 8 as 2 x 4 and 4 x 2; the helpers
(`make`, `check`, `mesh`) and tolerances are test_parallel's. Lengths such as 333 divide by no
device count, so the padding path runs too.
"""
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from test_parallel import CASES as PARALLEL_CASES
from test_parallel import check, make, mesh

import jax_attn
from jax_attn import parallel, reference

TOL = reference.TOLERANCE["float32"]

# test_parallel's cases without `cross_text`: the set this module has run, in the same order
# (so with the same seeds).
CASES = {name: case for name, case in PARALLEL_CASES.items() if name != "cross_text"}


def hybrid(shape=(2, 2), **kw):
    return parallel.sequence_parallel(mesh(*shape, names=("r", "u")), "u", ring_axis="r", **kw)


@pytest.mark.fast_every(4)
@pytest.mark.parametrize("case", list(CASES))
def test_hybrid_matches_reference(case):
    rng = np.random.default_rng([11, list(CASES).index(case)])
    q, k, v, kw = make(rng, **CASES[case])
    check(q, k, v, kw, "naive", hybrid())


@pytest.mark.slow
@pytest.mark.parametrize("shape,case", [((2, 4), "causal"), ((4, 2), "gqa"), ((4, 2), "full_mask")])
def test_hybrid_on_8_devices(shape, case):
    """Both ways round: a longer ring than Ulysses group, and the reverse."""
    rng = np.random.default_rng([12, list(CASES).index(case)])
    q, k, v, kw = make(rng, **CASES[case])
    check(q, k, v, kw, "naive", hybrid(shape))


def test_hybrid_bias_gradient_with_chunked():
    """A backend with its own VJP inside the ring (the recompute backward), per-key bias gradient."""
    rng = np.random.default_rng(13)
    q, k, v, kw = make(rng, sq=150, skv=150, mask="bias", causal=True)
    check(q, k, v, kw, "chunked", hybrid(), bias_grad=True)


def test_hybrid_with_batch_axis():
    rng = np.random.default_rng(14)
    q, k, v, kw = make(rng, n=8, n_kv=4, sq=101, skv=101, mask="full", lengths=[90, 101], causal=True)
    m = mesh(2, 2, 2, names=("data", "r", "u"))
    check(q, k, v, kw, "naive", parallel.sequence_parallel(m, "u", ring_axis="r", batch_axis="data"))


def test_hybrid_heads_need_divide_by_the_ulysses_axis_only():
    """6 heads on a 2 x 2 mesh: Ulysses alone over 4 devices refuses, the hybrid serves."""
    rng = np.random.default_rng(15)
    q, k, v, kw = make(rng, n=6, n_kv=6, sq=64, skv=64, causal=True)
    check(q, k, v, kw, "naive", hybrid())
    m = mesh(4, names=("sp",))
    with parallel.sequence_parallel(m, "sp", "ulysses"), pytest.raises(ValueError, match="method='ring'"):
        jax_attn.attention_forward(q, k, v, backend="naive")


def test_hybrid_inside_a_users_shard_map():
    m = mesh(2, 2, names=("r", "u"))
    rng = np.random.default_rng(16)
    q, k, v, kw = make(rng, sq=128, skv=128, lengths=[128, 70], causal=True)
    lengths = kw["kv_lengths"]

    def body(q, k, v, lengths):
        with parallel.sequence_parallel(None, "u", ring_axis="r"):
            return jax_attn.attention_forward(q, k, v, kv_lengths=lengths, is_causal=True, backend="naive")

    seq = P(None, None, ("r", "u"), None)  # ring major, as the hybrid lays the sequence
    f = jax.jit(parallel._shard_map(body, m, (seq, seq, seq, P()), seq))
    ref = reference.attention(q, k, v, kv_lengths=np.asarray(lengths), is_causal=True)
    assert reference.relative_error(f(q, k, v, lengths), ref) <= TOL


def test_hybrid_errors():
    m = mesh(2, 2, names=("r", "u"))
    with pytest.raises(ValueError, match="needs ring_axis"):
        parallel.sequence_parallel(m, "u", method="hybrid")
    with pytest.raises(ValueError, match="ring_axis adds a ring to Ulysses"):
        parallel.sequence_parallel(m, "u", method="ring", ring_axis="r")
    with pytest.raises(ValueError, match="named twice"):
        parallel.sequence_parallel(m, "u", ring_axis="u")
    with pytest.raises(ValueError, match="not an axis"):
        parallel.sequence_parallel(m, "u", ring_axis="x")
    with parallel.sequence_parallel(m, "u", ring_axis="r"):
        assert parallel.current_plan().method == "hybrid"


def test_a_ring_of_one_device_is_plain_ulysses():
    """A 1 x 2 mesh (ring axis of size 1): right results, and no ring steps in the program."""
    rng = np.random.default_rng(17)
    q, k, v, kw = make(rng, n=4, n_kv=4, sq=64, skv=64, causal=True, lengths=[64, 30])
    check(q, k, v, kw, "naive", hybrid((1, 2)))
    with hybrid((1, 2)):
        loss = lambda q, k, v: jax_attn.attention_forward(q, k, v, backend="naive", **kw).sum()  # noqa: E731
        jaxpr = str(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v))
    assert "all_to_all" in jaxpr and "ppermute" not in jaxpr
