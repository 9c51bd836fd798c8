"""The `fa4` backend: its declaration, its reasons, the mapping of our arguments onto FA4's, and
(on a Hopper/Blackwell GPU with FA4 installed) forward, lse and gradients vs the float64 reference."""
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_attn
from jax_attn import reference
from jax_attn.backends import BACKENDS, fa4
from jax_attn.backends.base import gpu_compute_capability, platform
from jax_attn.contract import validate

FA4 = BACKENDS["fa4"]


def spec_of(sq=128, skv=128, d=64, dtype=jnp.bfloat16, **kw):
    q = jax.ShapeDtypeStruct((2, 4, sq, d), dtype)
    k = jax.ShapeDtypeStruct((2, 2, skv, d), dtype)
    return validate(q, k, k, **kw)


def test_declaration():
    caps = FA4.capabilities()
    assert caps["platforms"] == ("gpu",)
    assert caps["dtypes"] == ("float16", "bfloat16")
    assert caps["head_dims"] == (8, 256) and caps["head_dim_multiple"] == 8
    assert not caps["bool mask"] and not caps["bias"] and not caps["bias grad"] and not caps["lse grad"]
    assert caps["causal"] and caps["kv_lengths"] and caps["window"] and not caps["forward AD"]
    assert caps["segment ids"] and caps["skips segment tiles"]  # sm90 only: `test_segment_reasons`
    assert FA4.automatic is True  # routing data decides: unmeasured buckets list it after the others


def test_auto_takes_fa4_only_where_measured(monkeypatch):
    """Without a measured bucket naming it, fa4 is the last candidate before nothing (never first)."""
    from jax_attn import autoselect
    from jax_attn.contract import validate
    x = jnp.zeros((1, 2, 256, 64), jnp.bfloat16)
    spec = validate(x, x, x)
    monkeypatch.setattr(autoselect, "table", lambda mode="train": {})
    order = autoselect.preference(spec)
    assert order.index("fa4") > order.index("chunked")


@pytest.mark.skipif(platform() == "gpu", reason="checks the reasons given off-GPU")
def test_unavailable_off_gpu_names_the_device():
    why = FA4.unavailable()
    assert why and "GPU" in why[0]
    decision = jax_attn.explain(jnp.zeros((1, 2, 16, 64), jnp.bfloat16), jnp.zeros((1, 2, 16, 64), jnp.bfloat16),
                                jnp.zeros((1, 2, 16, 64), jnp.bfloat16))
    assert decision.reasons["fa4"] and decision.backend != "fa4"


def test_missing_packages_are_named(monkeypatch):
    monkeypatch.setattr(fa4, "platform", lambda: "gpu")
    monkeypatch.setattr("jax_attn.backends.base.platform", lambda: "gpu")
    monkeypatch.setattr(fa4, "_importable", lambda name: name != "flash_attn.cute")
    why = FA4.unavailable()
    assert len(why) == 1 and "flash-attn-4" in why[0] and "jax-tvm-ffi" not in why[0]


def test_compute_capability_is_checked(monkeypatch):
    monkeypatch.setattr("jax_attn.backends.base.platform", lambda: "gpu")
    monkeypatch.setattr(fa4, "_importable", lambda name: True)
    for cc, ok in (((8, 0), False), ((9, 0), True), ((10, 0), True), ((12, 0), False)):
        monkeypatch.setattr(fa4, "gpu_compute_capability", lambda cc=cc: cc)
        assert (FA4.unavailable() == []) is ok, cc


def test_shape_reasons():
    assert any("head dim 4" in r for r in FA4.reasons(spec_of(d=4)))
    assert any("head dim 68" in r for r in FA4.reasons(spec_of(d=68)))  # 68 is not a multiple of 8
    assert any("dtype float32" in r for r in FA4.reasons(spec_of(dtype=jnp.float32)))
    mask = jax.ShapeDtypeStruct((2, 1, 1, 128), jnp.bool_)
    assert any("bool attn_mask" in r for r in FA4.reasons(spec_of(attn_mask=mask)))


def test_sm100_head_dims(monkeypatch):
    monkeypatch.setattr(fa4, "platform", lambda: "gpu")
    monkeypatch.setattr(fa4, "gpu_compute_capability", lambda: (10, 0))
    assert any("sm100" in r for r in FA4.reasons(spec_of(d=160)))
    assert not any("sm100" in r for r in FA4.reasons(spec_of(d=128)))
    monkeypatch.setattr(fa4, "gpu_compute_capability", lambda: (9, 0))
    assert not any("sm100" in r for r in FA4.reasons(spec_of(d=160)))


@pytest.mark.parametrize("kw, expected", [
    ({}, fa4.FA4Args(0.125, False, None, None)),
    ({"is_causal": True}, fa4.FA4Args(0.125, True, None, None)),
    ({"local_window_size": (16, 0)}, fa4.FA4Args(0.125, False, 16, 0)),
    ({"local_window_size": (16, 4)}, fa4.FA4Args(0.125, False, 16, 4)),
    ({"local_window_size": (16, 4), "is_causal": True}, fa4.FA4Args(0.125, False, 16, 0)),
    ({"local_window_size": (None, 8)}, fa4.FA4Args(0.125, False, None, 8)),
    ({"scale": 0.5}, fa4.FA4Args(0.5, False, None, None)),
])
def test_argument_mapping(kw, expected):
    spec = spec_of(**kw)
    assert fa4.mapping_reasons(spec) == []
    assert fa4.fa4_arguments(spec) == expected


def test_mapping_declines_what_fa4_aligns_differently():
    # FA4's masks are bottom-right aligned; ours top-left: equal only when sq == skv and no lengths.
    assert any("bottom-right" in r for r in fa4.mapping_reasons(spec_of(sq=64, skv=128, is_causal=True)))
    lengths = jax.ShapeDtypeStruct((2,), jnp.int32)
    assert any("kv_lengths" in r for r in fa4.mapping_reasons(spec_of(is_causal=True, kv_lengths=lengths)))
    assert fa4.mapping_reasons(spec_of(sq=64, skv=128, kv_lengths=lengths)) == []  # no causality: exact
    assert fa4.mapping_reasons(spec_of(sq=64, skv=128)) == []


def _has_fa4_gpu() -> bool:
    return (platform() == "gpu" and (gpu_compute_capability() or (0,))[0] in (9, 10)
            and importlib.util.find_spec("flash_attn") is not None
            and importlib.util.find_spec("flash_attn.cute") is not None
            and importlib.util.find_spec("jax_tvm_ffi") is not None)


@pytest.mark.skipif(not _has_fa4_gpu(), reason="needs an sm90/sm100 GPU with flash-attn-4 and jax-tvm-ffi")
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("case", ["plain", "causal", "gqa", "lengths", "cross", "window", "bsnd"])
def test_matches_reference_on_gpu(dtype, d, case):
    rng = np.random.default_rng(0)
    b, n, n_kv, sq, skv = 2, 4, 4, 256, 256
    kw, layout = {}, "bnsd"
    if case == "causal":
        kw["is_causal"] = True
    if case == "gqa":
        n_kv = 2
    if case == "lengths":
        kw["kv_lengths"] = jnp.array([skv, 77], jnp.int32)
    if case == "cross":
        sq, skv = 192, 77
    if case == "window":
        kw["local_window_size"] = (32, 16)
    if case == "bsnd":
        layout = "bsnd"
    shape = lambda heads, s, dd: (b, heads, s, dd)
    q, k, v, do = (jnp.asarray(rng.standard_normal(shape(h, s, d)), dtype)
                   for h, s in ((n, sq), (n_kv, skv), (n_kv, skv), (n, sq)))
    t = (lambda x: jnp.swapaxes(x, 1, 2)) if layout == "bsnd" else (lambda x: x)

    @jax.jit
    def run(q, k, v, do):
        def f(q, k, v):
            out, lse = jax_attn.attention_forward(q, k, v, backend="fa4", layout=layout, return_lse=True, **kw)
            return out, lse
        out, vjp, lse = jax.vjp(f, q, k, v, has_aux=True)  # lse as aux: not differentiated (it has no gradient)
        return out, lse, vjp(do)

    out, lse, grads = run(t(q), t(k), t(v), t(do))
    out, grads = t(out), [t(g) for g in grads]
    ref_kw = dict(kv_lengths=kw.get("kv_lengths"), is_causal=kw.get("is_causal", False),
                  window=kw.get("local_window_size"))
    ref_out, ref_lse = reference.attention(q, k, v, return_lse=True, **ref_kw)
    ref_grads = reference.attention_vjp(q, k, v, do, **ref_kw)[:3]
    tol = reference.TOLERANCE[jnp.dtype(dtype).name]
    assert reference.relative_error(out, ref_out) < tol
    assert reference.relative_error(lse, ref_lse) < tol
    for name, g, r in zip("qkv", grads, ref_grads):
        assert reference.relative_error(g, r) < 2 * tol, name


def test_backward_at_an_unverified_head_dim_raises():
    """FA4's sm90 backward was wrong at d=40 on the H200: a gradient there must raise, not be wrong."""
    from jax_attn.backends import fa4_kernels
    fa4_kernels.check_backward_head_dim(64)
    fa4_kernels.check_backward_head_dim(128)
    with pytest.raises(ValueError, match="backend='fa4'.*head dim 40"):
        fa4_kernels.check_backward_head_dim(40)


@pytest.mark.parametrize("layout", ["bnsd", "bsnd"])
def test_handlers_hand_either_layout_to_fa4_as_bsnd(monkeypatch, layout):
    """The FFI handlers' bodies, on CPU torch tensors, with a stand-in for FA4's interface that
    computes (b, s, h, d) attention and writes into the buffers it is given: a (b, n, s, d) call
    reaches FA4 as strided (b, s, n, d) views of the same buffers, so results land in place."""
    torch = pytest.importorskip("torch")
    import sys
    import types

    from jax_attn.backends import fa4_kernels

    def attention(q, k, v, scale):  # (b, s, h, d) -> out (b, s, h, d), lse (b, h, s)
        s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
        lse = torch.logsumexp(s, -1)
        return torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s, -1), v), lse

    def fwd(q, k, v, *, softmax_scale, out, lse, **_):
        assert q.shape[1] == 6 and q.stride(-1) == 1  # (b, s=6, h=3, d): FA4's layout
        o, l_ = attention(q, k, v, softmax_scale)
        out.copy_(o)
        lse.copy_(l_)

    def bwd(q, k, v, out, dout, lse, *, softmax_scale, dq, dk, dv, **_):
        leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
        o, _ = attention(*leaves, softmax_scale)
        for g, x in zip(torch.autograd.grad(o, leaves, dout), (dq, dk, dv)):
            x.copy_(g)

    fake = types.ModuleType("flash_attn.cute.interface")
    fake._flash_attn_fwd, fake._flash_attn_bwd = fwd, bwd
    for name in ("flash_attn", "flash_attn.cute"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "flash_attn.cute.interface", fake)
    args = fa4.FA4Args(softmax_scale=0.5, causal=False, window_size_left=None,
                       window_size_right=None)
    rng = np.random.default_rng(0)
    shape = (2, 3, 6, 4) if layout == "bnsd" else (2, 6, 3, 4)
    q, k, v, do = (torch.tensor(rng.standard_normal(shape), dtype=torch.float64) for _ in range(4))
    out, lse = torch.zeros(shape, dtype=torch.float64), torch.zeros((2, 3, 6), dtype=torch.float64)
    fa4_kernels._fwd_runner(args, False, layout == "bnsd")(q, k, v, out, lse)
    t = (lambda x: np.swapaxes(x, 1, 2)) if layout == "bsnd" else (lambda x: x)
    ref_out, ref_lse = reference.attention(*(t(x.numpy()) for x in (q, k, v)), scale=0.5,
                                           return_lse=True)
    np.testing.assert_allclose(t(out.numpy()), ref_out, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(lse.numpy(), ref_lse, rtol=1e-10, atol=1e-12)
    grads = [torch.zeros(shape, dtype=torch.float64) for _ in range(3)]
    fa4_kernels._bwd_runner(args, False, layout == "bnsd")(q, k, v, out, do, lse, *grads)
    want = reference.attention_vjp(*(t(x.numpy()) for x in (q, k, v, do)), scale=0.5)[:3]
    for g, w in zip(grads, want):
        np.testing.assert_allclose(t(g.numpy()), w, rtol=1e-9, atol=1e-11)


# ---------------------------------------------------------------------------------------------
# Packed sequences (segment ids): FA4's mask_mod with block sparsity (`fa4_segments`).

def segment_spec(sq=128, skv=128, d=64, **kw):
    ids_q, ids_kv = (jax.ShapeDtypeStruct((2, s), jnp.int32) for s in (sq, skv))
    return spec_of(sq=sq, skv=skv, d=d, q_segment_ids=ids_q, kv_segment_ids=ids_kv, **kw)


def test_segment_reasons(monkeypatch):
    """Served on sm90 with any geometry (our mask_mod aligns it top-left); declined on sm100."""
    monkeypatch.setattr(fa4, "platform", lambda: "gpu")
    monkeypatch.setattr(fa4, "_importable", lambda name: True)
    monkeypatch.setattr("jax_attn.backends.base.platform", lambda: "gpu")
    lengths = jax.ShapeDtypeStruct((2,), jnp.int32)
    specs = [segment_spec(), segment_spec(sq=64, skv=128, is_causal=True, kv_lengths=lengths),
             segment_spec(local_window_size=(16, 4), kv_lengths=lengths)]
    monkeypatch.setattr(fa4, "gpu_compute_capability", lambda: (9, 0))
    monkeypatch.setattr(fa4, "installed_version", lambda: "4.0.0b36")
    for spec in specs:
        assert FA4.reasons(spec) == [], spec
        assert fa4.fa4_arguments(spec) == fa4.FA4Args(spec.scale, False, None, None)  # all in the mask_mod
    # another FA4 version: its kernels may walk the block lists differently, so ids are declined
    monkeypatch.setattr(fa4, "installed_version", lambda: "4.0.1")
    assert any("4.0.0b36" in r and "4.0.1" in r for r in FA4.reasons(segment_spec()))
    assert FA4.reasons(spec_of()) == []  # calls without ids are unaffected
    monkeypatch.setattr(fa4, "installed_version", lambda: "4.0.0b36")
    monkeypatch.setattr(fa4, "gpu_compute_capability", lambda: (10, 0))
    assert any("sm90" in r and "segment" in r for r in FA4.reasons(segment_spec()))
    assert not any("segment" in r for r in FA4.reasons(spec_of()))


def test_sparse_block_sizes():
    """FA4 4.0.0b36's sm90 tiles for a mask_mod call (interface.py `_tile_size_fwd_sm90`,
    `_tile_size_bwd_sm90` with FA4's default sparse q block of 128)."""
    from jax_attn.backends.fa4_segments import sparse_blocks
    assert sparse_blocks(64, 64) == ((192, 128), (128, 128))
    assert sparse_blocks(96, 96) == ((192, 144), (128, 128))
    assert sparse_blocks(128, 128) == ((128, 128), (128, 128))
    assert sparse_blocks(192, 192) == ((128, 112), (128, 96))
    assert sparse_blocks(256, 256) == ((128, 80), (128, 64))


def random_ids(rng, kind, b, s, parts=(3, 6)):
    """int32 `(b, s)`: "sorted" uneven contiguous segments (3-6 per row), or "unsorted" ids."""
    if kind == "unsorted":
        return rng.integers(0, 4, (b, s)).astype(np.int32)
    rows = []
    for _ in range(b):
        cuts = np.sort(rng.choice(np.arange(1, s), rng.integers(*parts) - 1, replace=False))
        rows.append(np.searchsorted(cuts, np.arange(s), side="right"))
    return np.asarray(rows, np.int32)


def brute_force_lists(q_ids, kv_ids, lengths, window, block, by_kv):
    """Per query block (per key block when `by_kv`): the ascending partial and full block lists,
    tile by tile from full (sq, skv) matrices: full where every pair is kept; partial where not,
    but some pair has equal ids (its key before the length) and some pair is inside the window
    (the rule `block_classes` computes; exactly "some pair kept" without a window)."""
    b, sq = q_ids.shape
    skv = kv_ids.shape[1]
    i, j = np.arange(sq)[:, None], np.arange(skv)[None, :]
    ids = q_ids[:, :, None] == kv_ids[:, None, :]
    if lengths is not None:
        ids &= j[None] < lengths[:, None, None]
    inside = np.ones((sq, skv), bool)
    left, right = window or (None, None)
    if left is not None:
        inside &= j >= i - left
    if right is not None:
        inside &= j <= i + right
    keep = ids & inside
    bq, bk = block
    m, n = -(-sq // bq), -(-skv // bk)
    partial, full = np.zeros((b, m, n), bool), np.zeros((b, m, n), bool)
    for r in range(m):
        for c in range(n):
            rows, cols = slice(r * bq, (r + 1) * bq), slice(c * bk, (c + 1) * bk)
            full[:, r, c] = keep[:, rows, cols].all((1, 2))
            listed = ids[:, rows, cols].any((1, 2)) & inside[rows, cols].any()
            partial[:, r, c] = listed & ~full[:, r, c]
            assert (keep[:, rows, cols].any((1, 2)) <= listed).all()  # no kept pair is ever skipped
    if by_kv:
        partial, full = partial.transpose(0, 2, 1), full.transpose(0, 2, 1)
    return [[[np.flatnonzero(row) for row in x[bb]] for bb in range(b)] for x in (partial, full)]


@pytest.mark.fast_diagonal  # the fast run: each ids kind, geometry and lengths setting once
@pytest.mark.parametrize("kind", ["sorted", "unsorted", "cross"])
@pytest.mark.parametrize("geometry", [None, (None, 0), (40, 7), (1, 1)])  # (1, 1): tiles touching its edges
@pytest.mark.parametrize("lengths", [False, True])
def test_block_lists_match_brute_force(kind, geometry, lengths):
    """The block-sparse lists handed to FA4, forward (per query block) and backward (per key
    block), against a brute-force NumPy classification (`brute_force_lists`): without a window a
    tile is listed partial when some but not all of its pairs are kept, full when all are, and
    not at all when none is; a window only adds partial tiles on its edges."""
    from jax_attn.backends import fa4_segments
    rng = np.random.default_rng(hash((kind, geometry, lengths)) % 2**32)
    b, sq, skv = 2, 451, (451 if kind != "cross" else 300)
    ids_kind = "unsorted" if kind == "unsorted" else "sorted"
    q_ids = random_ids(rng, ids_kind, b, sq)
    kv_ids = q_ids.copy() if kind == "sorted" else random_ids(rng, ids_kind, b, skv)
    q_ids[0, 5:40] = 17  # a query segment with no key
    kv_len = np.array([skv - 61, skv // 3], np.int32) if lengths else None
    # FA4's tiles at d = 64 and 128, and small odd ones: tiles inside a window, edges at every offset.
    for fwd, bwd in (fa4_segments.sparse_blocks(64, 64), fa4_segments.sparse_blocks(128, 128), ((12, 5), (7, 12))):
        plan = fa4_segments.SegmentPlan(geometry, lengths, fwd, bwd)
        args = (jnp.asarray(q_ids), jnp.asarray(kv_ids), None if kv_len is None else jnp.asarray(kv_len), plan)
        for lists_of, block, by_kv in ((fa4_segments.forward_blocks, fwd, False),
                                       (fa4_segments.backward_blocks, bwd, True)):
            got = [np.asarray(x) for x in jax.jit(lists_of, static_argnums=3)(*args)]
            want = brute_force_lists(q_ids, kv_ids, kv_len, geometry, block, by_kv)
            rows = -(-(skv if by_kv else sq) // block[1 if by_kv else 0])
            for (count, index), expect in ((got[:2], want[0]), (got[2:], want[1])):
                assert count.shape == (b, 1, rows) and index.shape[:3] == (b, 1, rows)
                assert count.dtype == np.int32 and index.dtype == np.int32
                for bb in range(b):
                    for r in range(rows):
                        c = count[bb, 0, r]
                        np.testing.assert_array_equal(index[bb, 0, r, :c], expect[bb][r], err_msg=f"{block} {by_kv}")


def _fake_fa4(monkeypatch, seen):
    """Stand-ins for FA4's interface and block_sparsity modules: masked (b, s, h, d) attention that
    visits only the tiles the block-sparse lists name, applying the mask_mod on partial tiles only
    and nothing on full ones, as FA4's sm90 kernels do; empty rows give zeros and lse -inf."""
    torch = pytest.importorskip("torch")
    import collections
    import sys
    import types

    Lists = collections.namedtuple("BlockSparseTensorsTorch", "mask_block_cnt mask_block_idx full_block_cnt "
                                   "full_block_idx block_size")

    def tiles(bs, sq, skv, by_kv):
        """bool (b, sq, skv) of listed partial and full tiles, from the counts and indices."""
        bq, bk = bs.block_size
        partial, full = (torch.zeros(bs.mask_block_cnt.shape[0], sq, skv, dtype=torch.bool) for _ in range(2))
        for out_, cnt, idx in ((partial, bs.mask_block_cnt, bs.mask_block_idx),
                               (full, bs.full_block_cnt, bs.full_block_idx)):
            for bb in range(cnt.shape[0]):
                for r in range(cnt.shape[2]):
                    for c in idx[bb, 0, r, :cnt[bb, 0, r]].tolist():
                        m, n = (c, r) if by_kv else (r, c)
                        out_[bb, m * bq:(m + 1) * bq, n * bk:(n + 1) * bk] = True
        return partial, full

    def attention(q, k, v, scale, mask_mod, aux, bs, by_kv):
        b, sq, h, _ = q.shape
        skv, g = k.shape[1], h // k.shape[2]
        bi, i, j = torch.arange(b)[:, None, None], torch.arange(sq)[None, :, None], torch.arange(skv)[None, None, :]
        partial, full = tiles(bs, sq, skv, by_kv)
        keep = (partial & mask_mod(bi, None, i, j, None, aux)) | full  # (b, sq, skv)
        k, v = (x.repeat_interleave(g, dim=2) for x in (k, v))
        s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
        keep = keep[:, None]
        m = torch.where(keep, s, -torch.inf).amax(-1, keepdim=True)
        e = torch.where(keep, torch.exp(s - torch.where(torch.isfinite(m), m, 0)), 0)
        total = e.sum(-1, keepdim=True)
        lse = torch.where(total[..., 0] > 0, torch.log(total[..., 0]) + m[..., 0], -torch.inf)
        return torch.einsum("bhqk,bkhd->bqhd", e / torch.where(total > 0, total, 1), v), lse

    def fwd(q, k, v, *, softmax_scale, causal, mask_mod, aux_tensors, block_sparse_tensors, out, lse, **kw):
        assert not causal and kw.get("seqused_k") is None and kw.get("window_size_left") is None
        seen["fwd"] = (mask_mod, block_sparse_tensors.block_size, len(aux_tensors))
        o, l_ = attention(q, k, v, softmax_scale, mask_mod, aux_tensors, block_sparse_tensors, False)
        out.copy_(o)
        lse.copy_(l_)

    def bwd(q, k, v, out, dout, lse, *, softmax_scale, causal, mask_mod, aux_tensors, block_sparse_tensors,
            dq, dk, dv, **kw):
        assert not causal and kw.get("seqused_k") is None
        seen["bwd"] = (mask_mod, block_sparse_tensors.block_size, len(aux_tensors))
        leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
        o, _ = attention(*leaves, softmax_scale, mask_mod, aux_tensors, block_sparse_tensors, True)
        for grad, x in zip(torch.autograd.grad(o, leaves, dout), (dq, dk, dv)):
            x.copy_(grad)

    interface = types.ModuleType("flash_attn.cute.interface")
    interface._flash_attn_fwd, interface._flash_attn_bwd = fwd, bwd
    sparsity = types.ModuleType("flash_attn.cute.block_sparsity")
    sparsity.BlockSparseTensorsTorch = lambda **kw: Lists(**kw)
    for name in ("flash_attn", "flash_attn.cute"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "flash_attn.cute.interface", interface)
    monkeypatch.setitem(sys.modules, "flash_attn.cute.block_sparsity", sparsity)
    return torch


def _torch_mask_mod(window, has_lengths):
    """What `segment_mask_mod(window, has_lengths)` computes, on broadcast torch index grids."""
    left, right = window or (None, None)

    def mask_mod(b, h, i, j, seqlen_info, aux):
        keep = aux[0][b, i] == aux[1][b, j]
        if has_lengths:
            keep = keep & (j < aux[2][b])
        if left is not None:
            keep = keep & (j >= i - left)
        if right is not None:
            keep = keep & (j <= i + right)
        return keep
    mask_mod.geometry = (window, has_lengths)
    return mask_mod


@pytest.mark.fast_diagonal  # the fast run: each case once, the layouts in turn
@pytest.mark.parametrize("layout", ["bnsd", "bsnd"])
@pytest.mark.parametrize("case", ["sorted", "unsorted-cross", "cross-lengths", "causal-gqa", "window"])
def test_segment_handlers_pass_ids_through(monkeypatch, layout, case):
    """The segment FFI handlers' bodies on CPU torch tensors, with a stand-in for FA4 that applies
    the mask_mod it is given to the aux tensors it is given, on the tiles the block-sparse lists
    name (`_fake_fa4`): outputs, lse and gradients match the float64 reference with segment ids,
    so the ids, kv_lengths and lists reach FA4 in order, and the lists skip no kept pair and mark
    no tile full that holds a dropped one."""
    from jax_attn.backends import fa4_kernels, fa4_segments
    seen = {}
    torch = _fake_fa4(monkeypatch, seen)
    monkeypatch.setattr(fa4_segments, "segment_mask_mod", _torch_mask_mod)
    rng = np.random.default_rng(1)
    b, n, n_kv, sq, skv, d = 2, 2, 2, 200, 200, 8
    window, kv_len = None, None
    q_ids = random_ids(rng, "sorted", b, sq)
    kv_ids = q_ids.copy()
    if case == "unsorted-cross":
        skv = 150
        kv_ids = random_ids(rng, "unsorted", b, skv)
    elif case == "cross-lengths":  # sorted: full tiles, some cut by a length
        skv = 150
        kv_ids = random_ids(rng, "sorted", b, skv, parts=(2, 4))
        kv_len = np.array([skv, 97], np.int32)
    elif case == "causal-gqa":
        n, window = 4, (None, 0)
    elif case == "window":
        window = (30, 5)
    q_ids[0, :20] = 9  # queries whose segment has no key: zeros, lse -inf, no gradient
    plan = fa4_segments.SegmentPlan(window, kv_len is not None, (64, 32), (32, 64))
    args = fa4.FA4Args(softmax_scale=0.5, causal=False, window_size_left=None, window_size_right=None)
    shape = lambda h, s: (b, h, s, d) if layout == "bnsd" else (b, s, h, d)  # noqa: E731
    q, k, v, do = (torch.tensor(rng.standard_normal(shape(h, s)))
                   for h, s in ((n, sq), (n_kv, skv), (n_kv, skv), (n, sq)))
    ids, ids_kv, lengths = jnp.asarray(q_ids), jnp.asarray(kv_ids), None if kv_len is None else jnp.asarray(kv_len)

    def operands(lists_of):
        lists = lists_of(ids, ids_kv, lengths, plan)
        return [torch.from_numpy(np.array(x)) for x in
                fa4_kernels._segment_operands(ids, ids_kv, lengths, lists)]

    out, lse = torch.zeros(shape(n, sq), dtype=torch.float64), torch.zeros((b, n, sq), dtype=torch.float64)
    fa4_kernels._seg_fwd_runner(args, plan, layout == "bnsd")(q, k, v, *operands(fa4_segments.forward_blocks),
                                                              out, lse)
    grads = [torch.zeros_like(x) for x in (q, k, v)]
    fa4_kernels._seg_bwd_runner(args, plan, layout == "bnsd")(q, k, v, out, do, lse,
                                                              *operands(fa4_segments.backward_blocks), *grads)
    assert seen["fwd"] == (seen["fwd"][0], (64, 32), 2 + (kv_len is not None))
    assert seen["bwd"][1:] == ((32, 64), 2 + (kv_len is not None))
    assert seen["fwd"][0].geometry == seen["bwd"][0].geometry == (window, kv_len is not None)
    t = (lambda x: np.swapaxes(x, 1, 2)) if layout == "bsnd" else (lambda x: x)
    ref_kw = dict(scale=0.5, kv_lengths=kv_len, window=window, q_segment_ids=q_ids, kv_segment_ids=kv_ids)
    ref_out, ref_lse = reference.attention(*(t(x.numpy()) for x in (q, k, v)), return_lse=True, **ref_kw)
    np.testing.assert_allclose(t(out.numpy()), ref_out, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(lse.numpy(), ref_lse, rtol=1e-10, atol=1e-12)
    assert np.isneginf(ref_lse[0, :, :20]).all() and np.isneginf(lse.numpy()[0, :, :20]).all()
    want = reference.attention_vjp(*(t(x.numpy()) for x in (q, k, v, do)), **ref_kw)[:3]
    for g, w in zip(grads, want):
        np.testing.assert_allclose(t(g.numpy()), w, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("layout", ["bnsd", "bsnd"])
@pytest.mark.parametrize("case", ["gqa", "causal-lengths"])
def test_segment_path_end_to_end_on_cpu(monkeypatch, layout, case):
    """`fa4_kernels.forward` with segment ids under jit and `jax.vjp`, its FFI calls replaced by
    host callbacks into the real handler bodies over the FA4 stand-in (`_fake_fa4`): the ids are
    padded and the block lists built in JAX, the custom VJP hands the backward its own lists, and
    out, lse and gradients match the float64 reference (empty rows and a NaN key no query holds
    included)."""
    from jax_attn.backends import fa4_kernels, fa4_segments
    from jax_attn.inputs import AttentionInputs
    torch = _fake_fa4(monkeypatch, {})
    monkeypatch.setattr(fa4_segments, "segment_mask_mod", _torch_mask_mod)
    monkeypatch.setattr(fa4_kernels, "_seg_fwd_target", fa4_kernels._seg_fwd_runner)
    monkeypatch.setattr(fa4_kernels, "_seg_bwd_target", fa4_kernels._seg_bwd_runner)

    def host_call(runner, results, *operands):
        def host(*arrays):
            outs = [torch.from_numpy(np.zeros(r.shape, r.dtype)) for r in results]
            runner(*(torch.from_numpy(np.array(a)) for a in arrays), *outs)
            return tuple(o.numpy() for o in outs)
        return jax.pure_callback(host, results, *operands)
    monkeypatch.setattr(fa4_kernels, "_call", host_call)

    rng = np.random.default_rng(2)
    b, n, n_kv, sq, skv, d = 2, 4, 2, 333, 333, 64  # d: a head dim whose backward fa4 serves
    kw = {}
    if case == "causal-lengths":
        n_kv, skv = 4, 290
        kw = dict(is_causal=True, kv_lengths=np.array([skv, 201], np.int32))
    q_ids = random_ids(rng, "sorted", b, sq)
    kv_ids = random_ids(rng, "sorted", b, skv)
    q_ids[1, 100:140] = 11  # no key holds it
    kv_ids[0, -9:] = 12  # no query holds it: NaN there must reach nothing
    q, k, v, do = (rng.standard_normal((b, h, s, d)) for h, s in ((n, sq), (n_kv, skv), (n_kv, skv), (n, sq)))
    k[0, :, -9:] = v[0, :, -9:] = np.nan
    t = (lambda x: np.swapaxes(x, 1, 2)) if layout == "bsnd" else (lambda x: x)

    @jax.jit
    def run(q, k, v, do):
        def f(q, k, v):
            inputs = AttentionInputs.build(q, k, v, layout=layout, q_segment_ids=q_ids, kv_segment_ids=kv_ids, **kw)
            spec = inputs.spec
            return fa4_kernels.forward(inputs, fa4.fa4_arguments(spec), True)
        out, vjp, lse = jax.vjp(f, q, k, v, has_aux=True)
        return out, lse, vjp(do)

    out, lse, grads = run(*(jnp.asarray(t(x), jnp.float32) for x in (q, k, v, do)))
    ref_kw = dict(kv_lengths=kw.get("kv_lengths"), is_causal=kw.get("is_causal", False),
                  q_segment_ids=q_ids, kv_segment_ids=kv_ids)
    ref_out, ref_lse = reference.attention(q, k, v, return_lse=True, **ref_kw)
    tol = reference.TOLERANCE["float32"]
    assert reference.relative_error(t(np.asarray(out)), ref_out) < tol
    assert reference.relative_error(lse, ref_lse) < tol and np.isneginf(np.asarray(lse)[1, :, 100:140]).all()
    for name, g, r in zip("qkv", grads, reference.attention_vjp(q, k, v, do, **ref_kw)[:3]):
        assert reference.relative_error(t(np.asarray(g)), r) < 2 * tol, name


def test_segment_plan():
    """The static half of a call with ids: the geometry folded into the mask_mod, the tiles."""
    from jax_attn.backends.fa4_segments import SegmentPlan, plan
    lengths = jax.ShapeDtypeStruct((2,), jnp.int32)
    assert plan(segment_spec()) == SegmentPlan(None, False, (192, 128), (128, 128))
    assert plan(segment_spec(d=128, is_causal=True, kv_lengths=lengths)) == SegmentPlan(
        (None, 0), True, (128, 128), (128, 128))
    assert plan(segment_spec(local_window_size=(8, 2), is_causal=True)).window == (8, 0)


@pytest.mark.skipif(not _has_fa4_gpu(), reason="needs an sm90/sm100 GPU with flash-attn-4 and jax-tvm-ffi")
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("case", ["sorted", "unsorted-cross", "causal", "causal-cross", "gqa-bsnd", "lengths",
                                  "window", "one-segment"])
def test_segments_match_reference_on_gpu(dtype, d, case):
    """fa4 with segment ids (mask_mod + block sparsity) vs the float64 reference: output, lse and
    gradients. Every case has a query segment with no key (zeros, lse -inf) and a key segment no
    query holds, filled with NaN (it must reach nothing); lengths are not tile multiples."""
    if (gpu_compute_capability() or (0,))[0] != 9:
        pytest.skip("segment ids are served by fa4 on sm90 only")
    rng = np.random.default_rng(0)
    b, n, n_kv, sq, skv = 2, 4, 4, 300, 300
    kw, layout = {}, "bnsd"
    if case in ("unsorted-cross", "causal-cross"):
        skv = 211
    if case in ("causal", "causal-cross"):
        kw["is_causal"] = True
    if case == "gqa-bsnd":
        n_kv, layout = 2, "bsnd"
    if case == "lengths":
        kw["kv_lengths"] = jnp.array([skv, 177], jnp.int32)
    if case == "window":
        kw["local_window_size"] = (40, 9)
    kind = "unsorted" if case == "unsorted-cross" else "sorted"
    q_ids = random_ids(rng, kind, b, sq)
    if case == "one-segment":  # full tiles (no mask_mod) up to the ragged sequence end
        q_ids = np.zeros((b, sq), np.int32)
    kv_ids = q_ids[:, :skv].copy() if sq == skv else random_ids(rng, kind, b, skv)
    q_ids[0, -30:] = 7  # no key holds it
    kv_ids[1, :5] = 9  # no query holds it
    q, k, v, do = (rng.standard_normal((b, h, s, d)) for h, s in ((n, sq), (n_kv, skv), (n_kv, skv), (n, sq)))
    k[1, :, :5] = v[1, :, :5] = np.nan
    q, k, v, do = (jnp.asarray(x, dtype) for x in (q, k, v, do))
    t = (lambda x: jnp.swapaxes(x, 1, 2)) if layout == "bsnd" else (lambda x: x)
    ids = dict(q_segment_ids=jnp.asarray(q_ids), kv_segment_ids=jnp.asarray(kv_ids))

    @jax.jit
    def run(q, k, v, do):
        def f(q, k, v):
            return jax_attn.attention_forward(q, k, v, backend="fa4", layout=layout, return_lse=True, **ids, **kw)
        out, vjp, lse = jax.vjp(f, q, k, v, has_aux=True)
        return out, lse, vjp(do)

    out, lse, grads = run(t(q), t(k), t(v), t(do))
    out, grads = t(out), [t(g) for g in grads]
    ref_kw = dict(kv_lengths=kw.get("kv_lengths"), is_causal=kw.get("is_causal", False),
                  window=kw.get("local_window_size"), q_segment_ids=q_ids, kv_segment_ids=kv_ids)
    ref_out, ref_lse = reference.attention(q, k, v, return_lse=True, **ref_kw)
    ref_grads = reference.attention_vjp(q, k, v, do, **ref_kw)[:3]
    tol = reference.TOLERANCE[jnp.dtype(dtype).name]
    assert np.isneginf(np.asarray(lse)[0, :, -30:]).all() and not np.asarray(out)[0, :, -30:].any()
    assert reference.relative_error(out, ref_out) < tol
    assert reference.relative_error(lse, ref_lse) < tol
    for name, g, r in zip("qkv", grads, ref_grads):
        assert reference.relative_error(g, r) < 2 * tol, name
