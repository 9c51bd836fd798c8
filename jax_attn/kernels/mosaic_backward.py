"""The Hopper (sm90) Mosaic GPU flash-attention backward kernels: dQ, and dK/dV.

The default backward up to d = 128 (`mosaic_attention.py` chooses; at d > 128 the dK and dV
accumulators would not fit in registers, so there the Triton kernels run instead).

The forward's default CTA shape (`mosaic_forward.py`): warpgroups 0 and 1 compute, 64 rows each,
warpgroup 2 is a TMA producer streaming tiles through a ring of `MosaicConfig.bwd_stages`
shared-memory slots (`_produce`). Base-2 throughout: lse2 = lse * log2(e) (+inf for an empty or
padded query row, so its p is exactly 0), the key bias is 0/-inf; delta = rowsum(dO * O) - dlse
and lse2 are computed in XLA before the kernels (`mosaic_attention._mosaic_backward`).

* dQ kernel (`_dq_call`, grid over query tiles): per key block, S = Q K^T,
  P = exp2(S*c + kb - lse2), dP = dO V^T, dS = P * (dP - delta), dQ += dS K.
* dK/dV kernel (`_dkdv_call`, grid over key tiles of each k/v head; the group's query heads are
  streamed one after the other, so GQA sums stay in registers): per query block,
  S^T = K Q^T, P^T = exp2(S^T*c + kb - lse2), dV += P^T dO, dP^T = V dO^T,
  dS^T = P^T * (dP^T - delta), dK += dS^T Q. Its S^T, dP^T and dS^T tiles are formed as K Q^T
  and V dO^T (transposed views).
* Fused (`MosaicConfig.bwd_fused`, `_dkdv_call(with_dq=True)`): the dK/dV kernel alone, each
  step also adding dQ's share (dS^T)^T K into a float32 dQ in global memory with a TMA
  reduce-add: five matmuls per tile instead of seven, and dQ's sum order then depends on which
  CTA adds first (float32 adds, so the result varies in its last bits from run to run, as
  FlashAttention-3's does). Its K and V tiles are indexed through an opaque copy of the
  warpgroup index each step: with the plain index LLVM hoisted their wgmma descriptors out of
  the loop and, beside the third accumulator, they spilled (H200, round 8). Without spills it
  is bound by L2 (the reduce-adds: two 64 x d float32 tiles per CTA and step).

In interpret mode the matmuls (`_mm`) are `lax.dot_general` on the same shared-memory tiles.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from .mosaic_config import LOG2E, _grid, pl, plgpu

BWD_BLOCK = 64  # rows per compute warpgroup and per streamed step, both kernels


def _produce(n_steps, stages, groups_of_copies):
    """Producer warpgroup: fill `stages` slots, then refill a slot once its consumers released it.

    `groups_of_copies`: list of (consumed barrier ring, [issue(step, slot) ...]). After the last
    copy it waits for the final release of every slot (every phase observed).
    """
    for s0 in range(stages):
        for _, issuers in groups_of_copies:
            for issue in issuers:
                issue(s0, s0)

    @pl.loop(0, n_steps - stages)
    def _(i):
        slot = lax.rem(i, jnp.array(stages, i.dtype))
        for done, issuers in groups_of_copies:
            plgpu.barrier_wait(done.at[slot])
            for issue in issuers:
                issue(i + stages, slot)

    for j in range(stages):
        slot = (n_steps - stages + j) % stages
        for done, _ in groups_of_copies:
            plgpu.barrier_wait(done.at[slot])


def _mm(interp, a, b_ref, shape, *, transpose_b, acc=None, a_is_ref=True, transpose_a=False):
    """acc + (a^T if transpose_a else a) @ (b^T if transpose_b else b) in float32; `a` a smem
    ref or (a_is_ref=False) a register value (never transposed).

    On the GPU a wgmma (a and b through transposed views, no copy); in interpret mode a
    dot_general on the same tiles (the interpreter has no register-operand or transposed wgmma).
    """
    if interp:
        a_val = a[...] if a_is_ref else a
        a_val = a_val.T if transpose_a else a_val
        dims = (((1,), (1,)), ((), ())) if transpose_b else (((1,), (0,)), ((), ()))
        out = lax.dot_general(a_val, b_ref[...], dims, preferred_element_type=jnp.float32)
        return out if acc is None else acc + out
    b = plgpu.transpose_ref(b_ref, (1, 0)) if transpose_b else b_ref
    a = plgpu.transpose_ref(a, (1, 0)) if transpose_a else a
    if acc is None:
        def fresh(acc_ref):
            plgpu.wgmma(acc_ref, a, b)
            return acc_ref[...]
        return pl.run_scoped(fresh, plgpu.ACC(shape, jnp.float32))

    def accumulate(acc_ref):
        plgpu.wgmma(acc_ref, a, b)
    return pl.run_state(accumulate)(plgpu.ACC.init(acc))


def _bwd_common(st):
    bnsd = st.layout == "bnsd"

    def rows(ref, b, h, start, size):
        return ref.at[b, h, pl.ds(start, size)] if bnsd else ref.at[b, pl.ds(start, size), h]

    kw = {}
    if st.interpret:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
        kw["interpret"] = InterpretGPUParams()
    smem_t = () if st.interpret else (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    return rows, kw, smem_t


def _dq_call(st, q, k, v, do, lse2, delta, kb, sq_pad, skv_pad):
    bq = bk = BWD_BLOCK
    dp, dtype, interp = st.dp, q.dtype, st.interpret
    rows, kw, smem_t = _bwd_common(st)
    bnsd = st.layout == "bnsd"
    batch, heads = q.shape[0], (q.shape[1] if bnsd else q.shape[2])
    n_steps = skv_pad // bk
    stages = max(1, min(st.config.bwd_stages, n_steps))
    has_kb = kb is not None
    c = st.scale * LOG2E
    wgmma_l = None if interp else plgpu.Layout.WGMMA

    def kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs):
        if has_kb:
            kb_ref, *refs = refs
        dq_ref, q_smem, do_smem, lse_smem, delta_smem, k_smem, v_smem, *refs = refs
        if has_kb:
            kb_smem, *refs = refs
        in_bar, kv_bar, kv_done, *refs = refs
        kb_bar = refs[0] if has_kb else None
        qt, h, b = lax.axis_index("q"), lax.axis_index("h"), lax.axis_index("b")
        wg = lax.axis_index("wg")

        @pl.when(wg < 2)
        def _compute():
            plgpu.set_max_registers(st.config.bwd_registers[0], action="increase")
            q0 = qt * (2 * bq) + wg * bq
            for src, dst, i in ((rows(q_ref, b, h, q0, bq), q_smem.at[wg], 0),
                                (rows(do_ref, b, h, q0, bq), do_smem.at[wg], 1),
                                (lse_ref.at[b, h, pl.ds(q0, bq)], lse_smem.at[wg], 2),
                                (delta_ref.at[b, h, pl.ds(q0, bq)], delta_smem.at[wg], 3)):
                plgpu.copy_gmem_to_smem(src, dst, in_bar.at[wg * 4 + i])
            for i in range(4):
                plgpu.barrier_wait(in_bar.at[wg * 4 + i])
            if interp:
                lse2, dlt = lse_smem[wg], delta_smem[wg]
            else:
                lse2 = plgpu.load(lse_smem.at[wg], (), layout=plgpu.Layout.WGMMA.reduce(1))
                dlt = plgpu.load(delta_smem.at[wg], (), layout=plgpu.Layout.WGMMA.reduce(1))
            dq = jnp.zeros((bq, dp), jnp.float32)
            if not interp:
                dq = plgpu.layout_cast(dq, wgmma_l)

            def step(i, dq):
                slot = lax.rem(i, jnp.array(stages, i.dtype))
                plgpu.barrier_wait(kv_bar.at[slot * 2])
                plgpu.barrier_wait(kv_bar.at[slot * 2 + 1])
                s = _mm(interp, q_smem.at[wg], k_smem.at[slot], (bq, bk), transpose_b=True)
                s = s * c - lax.broadcast_in_dim(lse2, (bq, bk), [0])
                if has_kb:
                    plgpu.barrier_wait(kb_bar.at[slot])
                    kbias = kb_smem[slot] if interp else plgpu.load(
                        kb_smem.at[slot], (), layout=plgpu.Layout.WGMMA.reduce(0))
                    s = s + lax.broadcast_in_dim(kbias, (bq, bk), [1])
                p = jnp.exp2(s)
                dpm = _mm(interp, do_smem.at[wg], v_smem.at[slot], (bq, bk), transpose_b=True)
                ds = p * (dpm - lax.broadcast_in_dim(dlt, (bq, bk), [0]))
                dq = _mm(interp, ds.astype(dtype), k_smem.at[slot], (bq, dp), transpose_b=False,
                         acc=dq, a_is_ref=False)
                plgpu.barrier_arrive(kv_done.at[slot])
                return dq

            dq = lax.fori_loop(0, n_steps, step, dq)
            q_smem.at[wg][...] = (dq * st.scale).astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(q_smem.at[wg], rows(dq_ref, b, h, q0, bq))
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == 2)
        def _producer():
            plgpu.set_max_registers(st.config.bwd_registers[1], action="decrease")
            kvh = lax.div(h, jnp.array(st.groups, h.dtype))
            issuers = [
                lambda s_, sl: plgpu.copy_gmem_to_smem(rows(k_ref, b, kvh, s_ * bk, bk),
                                                       k_smem.at[sl], kv_bar.at[sl * 2]),
                lambda s_, sl: plgpu.copy_gmem_to_smem(rows(v_ref, b, kvh, s_ * bk, bk),
                                                       v_smem.at[sl], kv_bar.at[sl * 2 + 1]),
            ]
            if has_kb:
                kbb = b if st.key_bias_dims[0] else 0
                kbh = h if st.key_bias_dims[1] else 0
                issuers.append(lambda s_, sl: plgpu.copy_gmem_to_smem(
                    kb_ref.at[kbb, kbh, pl.ds(s_ * bk, bk)], kb_smem.at[sl], kb_bar.at[sl]))
            _produce(n_steps, stages, [(kv_done, issuers)])

    scratch = [plgpu.SMEM((2, bq, dp), dtype, transforms=smem_t),
               plgpu.SMEM((2, bq, dp), dtype, transforms=smem_t),
               plgpu.SMEM((2, bq), jnp.float32), plgpu.SMEM((2, bq), jnp.float32),
               plgpu.SMEM((stages, bk, dp), dtype, transforms=smem_t),
               plgpu.SMEM((stages, bk, dp), dtype, transforms=smem_t)]
    if has_kb:
        scratch.append(plgpu.SMEM((stages, bk), jnp.float32))
    scratch += [plgpu.Barrier(num_barriers=8), plgpu.Barrier(num_barriers=2 * stages),
                plgpu.Barrier(num_arrivals=2, num_barriers=stages)]
    if has_kb:
        scratch.append(plgpu.Barrier(num_barriers=stages))
    call = plgpu.kernel(
        kernel, out_type=jax.ShapeDtypeStruct(q.shape, dtype), scratch_types=scratch,
        grid=_grid(st.config, batch, heads, sq_pad // (2 * bq)),
        grid_names=_grid(st.config, "b", "h", "q"),
        num_threads=3, thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True), **kw)
    return call(q, k, v, do, lse2, delta, *((kb,) if has_kb else ()))


SMEM_BUDGET = 220 * 1024  # bytes of shared memory a backward CTA may take (an H100/H200 has 227 KB)


def _dq_split(st, with_dq):
    """Fused at d = 128 with `bwd_dq_split`: the two warpgroups share every dS tile and each
    adds one 64-column half of dQ (FlashAttention-3's traffic) instead of a full-width share."""
    return with_dq and st.config.bwd_dq_split and st.dp == 128


def _dkdv_stages(st, itemsize, n_steps, with_dq, has_kb):
    """The deepest Q/dO ring up to `bwd_stages` that fits SMEM_BUDGET beside the K/V tiles (and,
    fused, the dS^T and float32 dQ staging tiles): at d = 128 the fused kernel runs 2 deep."""
    bq = bk = BWD_BLOCK
    fixed = 2 * 2 * bk * st.dp * itemsize
    if _dq_split(st, with_dq):  # dS^T double-buffered; dQ staged as column halves
        fixed += 2 * 2 * bk * bq * itemsize + 2 * bq * (st.dp // 2) * 4
    elif with_dq:
        fixed += 2 * bk * bq * itemsize + 2 * bq * st.dp * 4
    per_stage = 2 * bq * st.dp * itemsize + 2 * bq * 4 + (2 * bk * 4 if has_kb else 0)
    stages = max(1, min(st.config.bwd_stages, n_steps))
    while stages > 1 and fixed + stages * per_stage > SMEM_BUDGET:
        stages -= 1
    return stages


def _dkdv_call(st, q, k, v, do, lse2, delta, kb, sq_pad, skv_pad, *, with_dq=False):
    """dK and dV (and, `with_dq`, dQ in float32: one kernel for the whole backward).

    Fused, each compute warpgroup also forms dQ's share of its 64 keys per streamed query
    block, dS K with dS^T staged in shared memory (a transposed wgmma operand), and adds it
    into a float32 dQ in global memory with a TMA reduce-add: five matmuls per tile where the
    two kernels take seven (the dQ kernel recomputes S, P and dP). The dQ accumulator must start
    at zero: on the GPU it is a zeroed `jax.new_ref` the kernel aliases; the interpreter has
    neither aliased refs nor TMA reductions, so there it is an output (the interpreter zeroes
    fresh memory when asked) with one slice per warpgroup, each added to by one thread only.
    With `MosaicConfig.bwd_dq_split` (d = 128), both warpgroups stage their dS^T, meet at a
    barrier, and each forms one 64-column half of the CTA's dQ tile from both: half the
    reduce-add traffic, for one barrier per step (dS^T double-buffered by step parity, so a
    warpgroup that runs ahead cannot overwrite a tile the other still reads).
    Returns (dk, dv) or (dk, dv, dq_f32).
    """
    bq = bk = BWD_BLOCK
    dp, dtype, interp = st.dp, q.dtype, st.interpret
    rows, kw, smem_t = _bwd_common(st)
    bnsd = st.layout == "bnsd"
    batch, kv_heads = k.shape[0], (k.shape[1] if bnsd else k.shape[2])
    n_qt = sq_pad // bq
    g = st.groups
    n_steps = g * n_qt
    has_kb = kb is not None
    stages = _dkdv_stages(st, q.dtype.itemsize, n_steps, with_dq, has_kb)
    c = st.scale * LOG2E
    wgmma_l = None if interp else plgpu.Layout.WGMMA
    n_in = 7 if has_kb else 6
    split = _dq_split(st, with_dq)
    half = dp // 2

    def head_and_row(t):  # streamed step -> (query head, first query row)
        t = jnp.asarray(t, jnp.int32)
        return lax.div(t, jnp.int32(n_qt)), lax.rem(t, jnp.int32(n_qt)) * bq

    def kernel(*refs):
        q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = refs[:6]
        kb_ref = refs[6] if has_kb else None
        refs = refs[n_in:]
        dq_ref = None
        if with_dq and not interp:  # the aliased accumulator comes after the inputs
            dq_ref, *refs = refs
        dk_ref, dv_ref, *refs = refs
        if with_dq and interp:
            dq_ref, *refs = refs
        k_smem, v_smem, q_smem, do_smem, lse_smem, delta_smem, *refs = refs
        if has_kb:
            kb_smem, *refs = refs
        if with_dq:
            ds_smem, dq_smem, *refs = refs
        kv_in, q_bar, q_done, *refs = refs
        if has_kb:
            kb_bar, *refs = refs
        ds_ready = refs[0] if split else None
        kt, kvh, b = lax.axis_index("k"), lax.axis_index("h"), lax.axis_index("b")
        wg = lax.axis_index("wg")

        def add_dq(dq, t, w, cols=None):
            """dQ rows of streamed step t (columns `cols`, default all) += dq, staged in the
            staging tile of warpgroup `w`."""
            hq, r0 = head_and_row(t)
            dst = rows(dq_ref.at[wg] if interp else dq_ref, b, kvh * g + hq, r0, bq)
            if cols is not None:
                dst = dst.at[:, cols]
            if interp:
                dst[...] = dst[...] + dq
                return
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last add has read the tile
            dq_smem.at[w][...] = dq
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(dq_smem.at[w], dst, reduction_op="add")

        def dq_of_step(i, dst, w):
            if not split:  # this warpgroup's 64 keys, every column
                ds_smem.at[w][...] = dst
                plgpu.commit_smem()
                return lambda: add_dq(st.scale * _mm(
                    interp, ds_smem.at[w], k_smem.at[w], (bq, dp), transpose_a=True,
                    transpose_b=False), i, w)
            buf = lax.rem(i, jnp.array(2, i.dtype))
            ds_smem.at[buf, w][...] = dst
            plgpu.commit_smem()
            plgpu.barrier_arrive(ds_ready.at[0])

            def add_half():
                plgpu.barrier_wait(ds_ready.at[0])  # both warpgroups' dS^T are in place
                for h in range(2):  # static column slices of the swizzled K tiles
                    @pl.when(wg == h)
                    def _():
                        cols = pl.ds(h * half, half)
                        dq = None
                        # keys of this warpgroup, then of the other; traced indices, since a
                        # static one becomes a literal operand of the accumulator's run_state,
                        # which Mosaic GPU (jax 0.11) cannot lower
                        for j in (w, 1 - w):
                            dq = _mm(interp, ds_smem.at[buf, j], k_smem.at[j, :, cols],
                                     (bq, half), transpose_a=True, transpose_b=False, acc=dq)
                        add_dq(st.scale * dq, i, w, cols)
            return add_half

        @pl.when(wg < 2)
        def _compute():
            plgpu.set_max_registers(st.config.bwd_registers[0], action="increase")
            k0 = kt * (2 * bk) + wg * bk
            plgpu.copy_gmem_to_smem(rows(k_ref, b, kvh, k0, bk), k_smem.at[wg], kv_in.at[wg * 2])
            plgpu.copy_gmem_to_smem(rows(v_ref, b, kvh, k0, bk), v_smem.at[wg],
                                    kv_in.at[wg * 2 + 1])
            plgpu.barrier_wait(kv_in.at[wg * 2])
            plgpu.barrier_wait(kv_in.at[wg * 2 + 1])
            acc0 = jnp.zeros((bk, dp), jnp.float32)
            if not interp:
                acc0 = plgpu.layout_cast(acc0, wgmma_l)

            def step(i, carry):
                dk, dv = carry
                # Fused: the warpgroup's tiles indexed through an opaque copy of wg (an empty
                # inline asm), so LLVM cannot hoist their wgmma descriptors and staging
                # addresses out of the loop, where at d = 128 they held ~34 registers and
                # spilled (ptxas, 2026-12-01 round 8); recomputing them costs a few adds a step.
                w = lax.optimization_barrier(wg) if with_dq and not interp else wg
                slot = lax.rem(i, jnp.array(stages, i.dtype))
                for j in range(4):
                    plgpu.barrier_wait(q_bar.at[slot * 4 + j])
                if interp:
                    lse2, dlt = lse_smem[slot], delta_smem[slot]
                else:
                    lse2 = plgpu.load(lse_smem.at[slot], (), layout=plgpu.Layout.WGMMA.reduce(0))
                    dlt = plgpu.load(delta_smem.at[slot], (), layout=plgpu.Layout.WGMMA.reduce(0))
                st_ = _mm(interp, k_smem.at[w], q_smem.at[slot], (bk, bq), transpose_b=True)
                st_ = st_ * c - lax.broadcast_in_dim(lse2, (bk, bq), [1])
                if has_kb:
                    plgpu.barrier_wait(kb_bar.at[slot * 2 + wg])
                    kbias = kb_smem[slot, wg] if interp else plgpu.load(
                        kb_smem.at[slot, wg], (), layout=plgpu.Layout.WGMMA.reduce(1))
                    st_ = st_ + lax.broadcast_in_dim(kbias, (bk, bq), [0])
                pt = jnp.exp2(st_)
                dv = _mm(interp, pt.astype(dtype), do_smem.at[slot], (bk, dp), transpose_b=False,
                         acc=dv, a_is_ref=False)
                dpt = _mm(interp, v_smem.at[w], do_smem.at[slot], (bk, bq), transpose_b=True)
                dst = (pt * (dpt - lax.broadcast_in_dim(dlt, (bk, bq), [1]))).astype(dtype)
                dk = _mm(interp, dst, q_smem.at[slot], (bk, dp), transpose_b=False,
                         acc=dk, a_is_ref=False)
                finish_dq = dq_of_step(i, dst, w) if with_dq else None
                plgpu.barrier_arrive(q_done.at[slot])  # dQ below reads only this CTA's K
                if with_dq:
                    finish_dq()
                return dk, dv

            dk, dv = lax.fori_loop(0, n_steps, step, (acc0, acc0))
            k_smem.at[wg][...] = (dk * st.scale).astype(dtype)
            v_smem.at[wg][...] = dv.astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(k_smem.at[wg], rows(dk_ref, b, kvh, k0, bk))
            plgpu.copy_smem_to_gmem(v_smem.at[wg], rows(dv_ref, b, kvh, k0, bk))
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == 2)
        def _producer():
            plgpu.set_max_registers(st.config.bwd_registers[1], action="decrease")

            def q_issue(src_ref, smem, j):
                def issue(s_, sl):
                    hq, r0 = head_and_row(s_)
                    plgpu.copy_gmem_to_smem(rows(src_ref, b, kvh * g + hq, r0, bq), smem.at[sl],
                                            q_bar.at[sl * 4 + j])
                return issue

            def vec_issue(src_ref, smem, j):
                def issue(s_, sl):
                    hq, r0 = head_and_row(s_)
                    plgpu.copy_gmem_to_smem(src_ref.at[b, kvh * g + hq, pl.ds(r0, bq)], smem.at[sl],
                                            q_bar.at[sl * 4 + j])
                return issue

            issuers = [q_issue(q_ref, q_smem, 0), q_issue(do_ref, do_smem, 1),
                       vec_issue(lse_ref, lse_smem, 2), vec_issue(delta_ref, delta_smem, 3)]
            if has_kb:
                kbb = b if st.key_bias_dims[0] else 0

                def kb_issue(w):
                    def issue(s_, sl):
                        hq, _ = head_and_row(s_)
                        kbh = kvh * g + hq if st.key_bias_dims[1] else 0
                        plgpu.copy_gmem_to_smem(
                            kb_ref.at[kbb, kbh, pl.ds(kt * (2 * bk) + w * bk, bk)],
                            kb_smem.at[sl, w], kb_bar.at[sl * 2 + w])
                    return issue
                issuers += [kb_issue(0), kb_issue(1)]
            _produce(n_steps, stages, [(q_done, issuers)])

    kv_shape = k.shape
    scratch = [plgpu.SMEM((2, bk, dp), dtype, transforms=smem_t),
               plgpu.SMEM((2, bk, dp), dtype, transforms=smem_t),
               plgpu.SMEM((stages, bq, dp), dtype, transforms=smem_t),
               plgpu.SMEM((stages, bq, dp), dtype, transforms=smem_t),
               plgpu.SMEM((stages, bq), jnp.float32), plgpu.SMEM((stages, bq), jnp.float32)]
    if has_kb:
        scratch.append(plgpu.SMEM((stages, 2, bk), jnp.float32))
    if with_dq:
        f32_t = () if interp else (plgpu.TilingTransform((8, 32)), plgpu.SwizzleTransform(128))
        scratch += [plgpu.SMEM((2, 2, bk, bq) if split else (2, bk, bq), dtype, transforms=smem_t),
                    plgpu.SMEM((2, bq, half if split else dp), jnp.float32, transforms=f32_t)]
    scratch += [plgpu.Barrier(num_barriers=4), plgpu.Barrier(num_barriers=4 * stages),
                plgpu.Barrier(num_arrivals=2, num_barriers=stages)]
    if has_kb:
        scratch.append(plgpu.Barrier(num_barriers=2 * stages))
    if split:
        scratch.append(plgpu.Barrier(num_arrivals=2, num_barriers=1))
    out_type = [jax.ShapeDtypeStruct(kv_shape, dtype)] * 2
    grid = _grid(st.config, batch, kv_heads, skv_pad // (2 * bk))
    grid_names = _grid(st.config, "b", "h", "k")
    params = plgpu.CompilerParams(approx_math=True)
    args = (q, k, v, do, lse2, delta, *((kb,) if has_kb else ()))
    if with_dq and interp:  # dQ as a zeroed output, one slice per warpgroup
        out_type.append(jax.ShapeDtypeStruct((2, *q.shape), jnp.float32))
        kw = dict(kw, interpret=dataclasses.replace(kw["interpret"], uninitialized_memory="zero"))
    if not with_dq or interp:
        outs = plgpu.kernel(kernel, out_type=out_type, scratch_types=scratch, grid=grid,
                            grid_names=grid_names, num_threads=3, thread_name="wg",
                            compiler_params=params, **kw)(*args)
        if not with_dq:
            return outs
        dk, dv, dq2 = outs
        return dk, dv, dq2[0] + dq2[1]
    # plgpu.kernel's vmap wrapper does not pass refs through; pl.kernel over the same mesh
    # does, and aliases the ref in and out of the kernel.
    mesh = plgpu.Mesh(grid=grid, grid_names=grid_names, num_threads=3, thread_name="wg")

    def body(*refs):
        pl.run_scoped(lambda *scr: kernel(*refs, *scr), *scratch, collective_axes="wg")

    dq_acc = jax.new_ref(jnp.zeros(q.shape, jnp.float32))
    dk, dv = pl.kernel(body, out_type=out_type, mesh=mesh, compiler_params=params)(*args, dq_acc)
    return dk, dv, dq_acc[...]
