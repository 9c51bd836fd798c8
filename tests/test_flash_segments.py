"""Packed sequences (segment ids) in the Triton flash-attention kernels, in interpret mode.

Query i of sample b sees key j only where `q_segment_ids[b, i] == kv_segment_ids[b, j]`, on top
of causal, window, kv_lengths and biases. Every result is checked against the float64 NumPy
reference below, whose mask is built here from the ids (so it shares nothing with the kernel's
tile skipping): forward, lse, and the gradients of q, k, v (and of a bias) under a cotangent on
both `out` and `lse`. Blocks are 16 so that small shapes cross several tiles, skipped and not.
Block skipping itself is checked three ways: `segment_tiles` (which tiles may hold a pair of one
segment) against brute force, `segment_spans` (the loop bounds the kernels take from it) against
those tiles, and by NaN-poisoning blocks a kernel must not visit.
"""
from __future__ import annotations

import math
import os

os.environ.setdefault("JAX_ATTN_INTERPRET", "1")  # before the backend looks (conftest does too)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from jax_attn import reference  # noqa: E402  (TOLERANCE and relative_error only)
from jax_attn.kernels import configs, flash_backward  # noqa: E402
from jax_attn.kernels.flash_attention import flash_attention, segment_tiles  # noqa: E402
from jax_attn.kernels.flash_call import segment_spans  # noqa: E402

SLOW = pytest.mark.slow
BLOCK = 16
SMALL = configs.Config(configs.FwdConfig(16, 16, 4, 2), configs.BwdConfig(16, 16, 16, 16, 4, 2))


# --- float64 reference ------------------------------------------------------------------------

def ref_all(q, k, v, do, dlse, keep, bias, scale):
    """float64 `(out, lse, dq, dk, dv, ds)` of `sum(out * do) + sum(lse * dlse)`, bnsd inputs.

    `keep (b, 1|n, sq, skv)`: visible pairs; `bias`: additive, broadcastable, or None. `ds` is
    the full gradient of the logits, so of any additive bias. Rows with no key: out 0, lse -inf,
    no gradient."""
    q, k, v, do, dlse = (np.asarray(x, np.float64) for x in (q, k, v, do, dlse))
    g = q.shape[1] // k.shape[1]
    kr, vr = np.repeat(k, g, axis=1), np.repeat(v, g, axis=1)
    s = np.einsum("bnqd,bnkd->bnqk", q, kr) * scale
    if bias is not None:
        s = s + np.asarray(bias, np.float64)
    keep = np.broadcast_to(keep, s.shape)
    s = np.where(keep, s, -np.inf)
    m = s.max(-1, keepdims=True)
    m = np.where(np.isneginf(m), 0.0, m)
    e = np.where(keep, np.exp(s - m), 0.0)
    l = e.sum(-1, keepdims=True)
    p = e / np.where(l > 0, l, 1.0)
    out = np.einsum("bnqk,bnkd->bnqd", p, vr)
    lse = np.where(l[..., 0] > 0, np.log(np.where(l[..., 0] > 0, l[..., 0], 1.0)) + m[..., 0],
                   -np.inf)
    dp = np.einsum("bnqd,bnkd->bnqk", do, vr)
    delta = (do * out).sum(-1, keepdims=True)
    ds = p * (dp - delta + dlse[..., None])  # d lse / d s = p
    dq = np.einsum("bnqk,bnkd->bnqd", ds, kr) * scale
    b, n_kv, skv, d = k.shape
    dk = (np.einsum("bnqk,bnqd->bnkd", ds, q) * scale).reshape(b, n_kv, g, skv, d).sum(2)
    dv = np.einsum("bnqk,bnqd->bnkd", p, do).reshape(b, n_kv, g, skv, -1).sum(2)
    return out, lse, dq, dk, dv, ds


def keep_mask(q_ids, kv_ids, sq, skv, is_causal=False, window=None, kv_lengths=None):
    """`(b, 1, sq, skv)` bool: same segment, and every other rule, written out directly."""
    q_ids, kv_ids = np.asarray(q_ids), np.asarray(kv_ids)
    keep = q_ids[:, :, None] == kv_ids[:, None, :]
    i, j = np.arange(sq)[:, None], np.arange(skv)[None, :]
    if is_causal:
        keep = keep & (j <= i)
    if window is not None:
        left, right = window
        keep = keep & (j >= i - left) & (j <= i + right)
    if kv_lengths is not None:
        keep = keep & (j[None] < np.asarray(kv_lengths)[:, None, None])
    return keep[:, None]


def packed(lengths, total):
    """Segment ids of prompts of `lengths` packed in order; the rest of `total`, padding, gets
    the next id (so ids stay sorted and the padding's blocks meet no earlier prompt's)."""
    ids = np.concatenate([np.full(n, i) for i, n in enumerate(lengths)])
    return np.concatenate([ids, np.full(total - len(ids), len(lengths))]).astype(np.int32)


# --- kernel runs ------------------------------------------------------------------------------

def run(q, k, v, do, dlse, q_ids, kv_ids, bias=None, layout="bnsd", **kw):
    """Kernel `(out, lse, dq, dk, dv, dbias)` in bnsd; q, k, v, do given in bnsd."""
    to = (lambda x: x) if layout == "bnsd" else (lambda x: jnp.swapaxes(x, 1, 2))
    args = [to(jnp.asarray(x)) for x in (q, k, v)]
    do = to(jnp.asarray(do))

    def loss(q, k, v, bias):
        out, lse = flash_attention(q, k, v, bias=bias, q_segment_ids=jnp.asarray(q_ids),
                                   kv_segment_ids=jnp.asarray(kv_ids), layout=layout,
                                   return_lse=True, config=SMALL, interpret=True, **kw)
        total = jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32)) + jnp.sum(lse * dlse)
        return total, (out, lse)

    argnums = (0, 1, 2) if bias is None else (0, 1, 2, 3)
    bias = None if bias is None else jnp.asarray(bias)
    grads, (out, lse) = jax.grad(loss, argnums, has_aux=True)(*args, bias)
    dq, dk, dv, *dbias = grads
    back = (lambda x: x) if layout == "bnsd" else (lambda x: jnp.swapaxes(x, 1, 2))
    res = [back(out), lse, back(dq), back(dk), back(dv)] + dbias + [None] * (1 - len(dbias))
    return [None if x is None else np.asarray(x, np.float64) for x in res]


def inputs(b, n, n_kv, sq, skv, d, dtype, seed):
    rng = np.random.default_rng(seed)
    cast = lambda x: np.asarray(jnp.asarray(x, dtype).astype(jnp.float32))  # noqa: E731
    q, do = (cast(rng.standard_normal((b, n, sq, d))) for _ in range(2))
    k, v = (cast(rng.standard_normal((b, n_kv, skv, d))) for _ in range(2))
    dlse = rng.standard_normal((b, n, sq)).astype(np.float32)
    return q, k, v, do, dlse


def check(q_ids, kv_ids, n=2, n_kv=1, d=16, dtype="float32", seed=0, is_causal=False,
          window=None, kv_lengths=None, bias_shape=None, layout="bnsd"):
    """Kernel vs reference on random inputs; returns the kernel's results."""
    b, sq = np.shape(q_ids)
    skv = np.shape(kv_ids)[1]
    q, k, v, do, dlse = inputs(b, n, n_kv, sq, skv, d, dtype, seed)
    bias = None
    if bias_shape is not None:
        bias = np.random.default_rng(seed + 1).standard_normal(bias_shape).astype(np.float32)
    kw = dict(is_causal=is_causal, window=window)
    if kv_lengths is not None:
        kw["kv_lengths"] = jnp.asarray(kv_lengths, jnp.int32)
    dt = jnp.dtype(dtype)
    got = run(*(jnp.asarray(x, dt) for x in (q, k, v, do)), dlse, q_ids, kv_ids, bias=bias,
              layout=layout, **kw)
    keep = keep_mask(q_ids, kv_ids, sq, skv, is_causal, window, kv_lengths)
    want = ref_all(q, k, v, do, dlse, keep, bias, 1 / math.sqrt(d))
    want = list(want[:5]) + [None if bias is None else sum_to(want[5], bias.shape)]
    tol = reference.TOLERANCE[dtype]
    for name, x, r in zip(("out", "lse", "dq", "dk", "dv", "dbias"), got, want):
        if r is None:
            continue
        err = reference.relative_error(x, r)
        assert err <= tol, f"{name}: relative error {err} > {tol}"
    return got


def sum_to(ds, shape):
    axes = tuple(a for a in range(4) if shape[a] == 1)
    return ds.sum(axes, keepdims=True)


@pytest.fixture
def whole_dkdv(monkeypatch):
    """Run the dK/dV kernel with one program per key block (small shapes otherwise split its
    query loop over programs), so both paths see segment ids."""
    monkeypatch.setattr(flash_backward, "_dkdv_splits", lambda *args: 1)


# --- results against the reference ------------------------------------------------------------

def test_packed_causal_gqa():
    """Three prompts packed (7, 20, 13 tokens) plus 8 padding tokens, causal, GQA 4:2."""
    ids = np.stack([packed([7, 20, 13], 48), packed([30, 18], 48)])
    check(ids, ids, n=4, n_kv=2, is_causal=True)


@pytest.mark.parametrize("case", [
    pytest.param(dict(kv_lengths=[40, 23], layout="bsnd"), id="kv_lengths-bsnd"),
    pytest.param(dict(is_causal=True, window=(9, 3), kv_lengths=[33, 40]), id="causal-window"),
    pytest.param(dict(dtype="bfloat16", is_causal=True), id="bfloat16"),
    pytest.param(dict(dtype="float16", n=4, n_kv=2, d=24), id="float16-gqa-d24"),
    pytest.param(dict(bias_shape=(2, 2, 37, 40), is_causal=True), id="full-bias-grad"),
    pytest.param(dict(bias_shape=(2, 1, 1, 40), kv_lengths=[40, 11]), id="key-bias-grad"),
])
@SLOW
def test_unsorted_ids(case):
    """Random ids from a small alphabet, in no order: tiles mostly overlap in range but mask
    pair by pair. sq (37) != skv (40), both with tails."""
    rng = np.random.default_rng(1)
    q_ids = rng.integers(0, 3, (2, 37)).astype(np.int32)
    kv_ids = rng.integers(0, 3, (2, 40)).astype(np.int32)
    check(q_ids, kv_ids, **case)


@SLOW
def test_whole_dkdv_path(whole_dkdv):
    """The dK/dV kernel with one program per key block, causal, kv_lengths, GQA."""
    ids = np.stack([packed([5, 16, 19], 40), packed([40], 40)])
    check(ids, ids, n=4, n_kv=2, is_causal=True, kv_lengths=[36, 40])


def test_rows_with_no_matching_key():
    """Query ids 7 and 8 have no key: zeros, lse -inf, and zero gradients (the full bias's
    included); the keys of id 3, which no query shares, get zero dk and dv. In 16-blocks, query
    block 0 (ids 0-1) skips key blocks 1-2 (ids 2-3) and query block 1 (ids 2, 7, 8, unsorted)
    skips key block 0: the d bias tiles of skipped tiles are written as zeros."""
    q_ids = np.array([[0] * 10 + [1] * 6 + [7] * 6 + [2] * 6 + [8] * 4], np.int32)
    kv_ids = np.array([[0] * 8 + [1] * 8 + [3] * 14 + [2] * 3], np.int32)
    tiles = np.asarray(segment_tiles(q_ids, kv_ids, BLOCK, BLOCK))[0]
    np.testing.assert_array_equal(tiles, [[1, 0, 0], [0, 1, 1]])
    got = check(q_ids, kv_ids, n=2, n_kv=1, bias_shape=(1, 2, 32, 33))
    out, lse, dq, dk, dv, dbias = got
    empty = np.flatnonzero(~np.isin(q_ids[0], kv_ids[0]))
    assert list(empty) == list(range(16, 22)) + list(range(28, 32))
    assert np.all(np.isneginf(lse[:, :, empty]))
    assert np.all(np.isfinite(np.delete(lse, empty, axis=2)))
    for x in (out, dq, dbias):
        assert not np.any(x[:, :, empty])
    for x in (dk, dv):
        assert not np.any(x[:, :, 16:30])


# --- block skipping ---------------------------------------------------------------------------

def test_segment_tiles_of_a_packed_batch():
    """Prompts of 16, 16 and 32 tokens in 16-blocks: the block-diagonal tiles run, 6 of 16, the
    sum of the parts (1 + 1 + 4)."""
    ids = packed([16, 16, 32], 64)[None]
    tiles = np.asarray(segment_tiles(ids, ids, BLOCK, BLOCK))[0]
    want = np.zeros((4, 4), bool)
    want[0, 0] = want[1, 1] = True
    want[2:, 2:] = True
    np.testing.assert_array_equal(tiles, want)
    # Unaligned prompts share the blocks they straddle: 7 | 20 | 13 | 8 padding (id 3).
    ids = packed([7, 20, 13], 48)[None]
    tiles = np.asarray(segment_tiles(ids, ids, BLOCK, BLOCK))[0]
    np.testing.assert_array_equal(tiles, [[1, 1, 0], [1, 1, 1], [0, 1, 1]])


@pytest.mark.parametrize("seed", range(4))
def test_segment_tiles_never_skip_a_visible_pair(seed):
    """On unsorted ids, any tile holding an equal (query, key) pair runs (brute force), for
    tails and unequal blocks; sorted ids run exactly the tiles holding such a pair."""
    rng = np.random.default_rng(seed)
    b, sq, skv, bq, bk = 3, 45, 70, 16, 32
    q_ids = rng.integers(0, 5, (b, sq)).astype(np.int32)
    kv_ids = rng.integers(0, 5, (b, skv)).astype(np.int32)
    for qi, ki in ((q_ids, kv_ids), (np.sort(q_ids, 1), np.sort(kv_ids, 1))):
        tiles = np.asarray(segment_tiles(qi, ki, bq, bk))
        assert tiles.shape == (b, -(-sq // bq), -(-skv // bk))
        pairs = qi[:, :, None] == ki[:, None, :]
        padded = np.zeros((b, tiles.shape[1] * bq, tiles.shape[2] * bk), bool)
        padded[:, :sq, :skv] = pairs
        any_pair = padded.reshape(b, tiles.shape[1], bq, tiles.shape[2], bk).any((2, 4))
        assert np.all(tiles[any_pair])
    assert not np.all(tiles)  # sorted ids (the last pair) do skip tiles


@pytest.mark.parametrize("seed", range(3))
def test_segment_spans_cover_every_tile_that_runs(seed):
    """The kernels loop over spans: from the first block whose ids meet theirs to one past the
    last, both ways (per query block, per key block). Every meeting tile is inside its span;
    with sorted ids the span holds nothing else; a block that meets none gets (0, 0)."""
    rng = np.random.default_rng(seed)
    b, sq, skv, bq, bk = 2, 45, 70, 16, 8
    q_ids = np.sort(rng.integers(0, 6, (b, sq)), 1).astype(np.int32)
    kv_ids = np.sort(rng.integers(2, 9, (b, skv)), 1).astype(np.int32)
    q_ids[1] = 50  # meets nothing
    for qi, ki in ((q_ids, kv_ids), (rng.permutation(q_ids, axis=1), rng.permutation(kv_ids, axis=1))):
        tiles = np.asarray(segment_tiles(qi, ki, bq, bk))
        for by_key, t in ((False, tiles), (True, tiles.swapaxes(1, 2))):
            spans = np.asarray(segment_spans(qi, ki, bq, bk, by_key))
            assert spans.shape == (b, 2, t.shape[1])
            inside = np.arange(t.shape[2]) >= spans[:, 0, :, None]
            inside &= np.arange(t.shape[2]) < spans[:, 1, :, None]
            assert np.all(inside[t]), "a tile that runs is outside its span"
            if qi is q_ids:  # sorted: the span is exactly the tiles that meet
                np.testing.assert_array_equal(inside, t)
            assert np.all(spans[1, :, t[1].any(-1) == 0] == 0)


@pytest.mark.parametrize("dkdv", ["split", pytest.param("whole", marks=SLOW)])
def test_kernels_skip_tiles_of_other_segments(dkdv, monkeypatch):
    """Poison with NaN what the kernels must not visit; a visited tile, even fully masked, turns
    NaN into the results (0 * NaN in the matmuls).

    64 tokens, prompts of 16 | 16 | 32 in 16-blocks. Key block 0 (prompt 0) holds NaN k and v:
    the forward and dQ of query blocks 1-3 must skip it. Query block 0 holds NaN q and dO, so
    its lse and D are NaN: the dK/dV of key blocks 1-3 must skip query block 0."""
    if dkdv == "whole":
        monkeypatch.setattr(flash_backward, "_dkdv_splits", lambda *args: 1)
    ids = packed([16, 16, 32], 64)[None]
    q, k, v, do, dlse = inputs(1, 2, 1, 64, 64, 16, "float32", 3)
    bad = [x.copy() for x in (q, k, v, do)]
    for x in bad:
        x[:, :, :16] = np.nan
    out, lse, dq, dk, dv, _ = run(*bad, dlse, ids, ids)  # not causal: it would skip tiles too
    keep = keep_mask(ids, ids, 64, 64)
    r_out, r_lse, r_dq, r_dk, r_dv, _ = ref_all(q, k, v, do, dlse, keep, None, 0.25)
    assert np.all(np.isnan(out[:, :, :16]))  # prompt 0 sees its own NaN, by right
    tol = reference.TOLERANCE["float32"]
    rest = slice(16, 64)
    for name, x, r in (("out", out, r_out), ("lse", lse, r_lse), ("dq", dq, r_dq),
                       ("dk", dk, r_dk), ("dv", dv, r_dv)):
        assert reference.relative_error(x[:, :, rest], r[:, :, rest]) <= tol, name


# --- arguments --------------------------------------------------------------------------------

def test_segment_arguments_are_checked():
    q = jnp.zeros((2, 1, 8, 16), jnp.float32)
    ids = jnp.zeros((2, 8), jnp.int32)
    kw = dict(config=SMALL, interpret=True)
    with pytest.raises(ValueError, match="together"):
        flash_attention(q, q, q, q_segment_ids=ids, **kw)
    with pytest.raises(ValueError, match="shape"):
        flash_attention(q, q, q, q_segment_ids=ids[:, :5], kv_segment_ids=ids, **kw)
    with pytest.raises(TypeError, match="integer"):
        flash_attention(q, q, q, q_segment_ids=ids.astype(jnp.float32), kv_segment_ids=ids, **kw)


@SLOW
def test_segment_ids_traced_under_jit():
    """Ids are runtime data: one compiled function serves different packings."""
    q, k, v, _, _ = inputs(1, 2, 1, 32, 32, 16, "float32", 5)
    f = jax.jit(lambda q, k, v, ids: flash_attention(
        q, k, v, q_segment_ids=ids, kv_segment_ids=ids, config=SMALL, interpret=True))
    for lengths in ([10, 22], [32], [3, 3, 26]):
        ids = packed(lengths, 32)[None]
        want = ref_all(q, k, v, np.zeros_like(q), np.zeros((1, 2, 32), np.float32),
                       keep_mask(ids, ids, 32, 32), None, 0.25)[0]
        got = np.asarray(f(q, k, v, jnp.asarray(ids)))
        assert reference.relative_error(got, want) <= reference.TOLERANCE["float32"]


@SLOW
def test_sharded_over_batch_and_heads_stays_local():
    """q, k, v split over batch and heads and the ids over batch (4 simulated devices): the
    kernels run shard by shard (no all-gather, forward or backward) and match the whole call."""
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    if len(jax.devices()) < 4:
        pytest.skip("needs 4 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
    mesh = Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("data", "model"))
    q, k, v, do, _ = inputs(2, 2, 2, 32, 32, 16, "float32", 7)
    ids = np.stack([packed([10, 22], 32), packed([5, 11, 16], 32)])

    def loss(q, k, v, ids):
        out = flash_attention(q, k, v, q_segment_ids=ids, kv_segment_ids=ids, is_causal=True,
                              config=SMALL, interpret=True)
        return jnp.sum(out * do), out

    f = jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True))
    qkv, by_batch = NamedSharding(mesh, P("data", "model")), NamedSharding(mesh, P("data"))
    places = (qkv, qkv, qkv, by_batch)
    args = [jax.device_put(jnp.asarray(x), s) for x, s in zip((q, k, v, ids), places)]
    text = f.lower(*args).compile().as_text()
    assert not any(c in text for c in ("all-gather", "all-to-all", "collective-permute"))
    got, want = f(*args), f(*(jnp.asarray(x) for x in (q, k, v, ids)))
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):  # the loss: sums reordered
        assert reference.relative_error(np.asarray(g), np.asarray(w)) <= 1e-5
    (_, out), (dq, _, _) = got
    assert out.sharding.is_equivalent_to(qkv, 4) and dq.sharding.is_equivalent_to(qkv, 4)
