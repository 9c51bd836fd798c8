"""The Hopper (sm90) Mosaic GPU flash-attention forward kernel, FlashAttention-3 style.

Design (one CTA = `W` = `MosaicConfig.compute_warpgroups` compute warpgroups, two by default,
and a producer):

* Warpgroups 0 .. W-1 compute; each owns `block_q` (64) query rows, so a CTA covers
  `W * block_q` queries of one head. Warpgroup W is the producer: it only issues TMA copies of
  the K and V tiles (and the optional key-bias vector) into a ring of `stages` shared-memory
  slots, waiting on per-slot "consumed" barriers before it overwrites a slot. It gives its
  registers away (`set_max_registers(40)`); the compute warpgroups take 232
  (`MosaicConfig.fwd_registers`).
* Per key block a compute warpgroup issues S = Q K^T as a wgmma (Q and K from shared memory,
  K transposed through a `transpose_ref` view, no copy), does the online softmax in registers
  (base-2 logits: `exp2` is one instruction, so `qk_scale = scale * log2(e)` folds into one FMA
  with the running max), then O += P V as a wgmma with P as the register operand.
* The two compute warpgroups take turns on the tensor cores through a shared "schedule"
  barrier: one issues its matmul while the other does its softmax (ping-pong). Warpgroup 1
  starts one phase late and warpgroup 0 ends one phase late, so both pass the barrier the same
  number of times.
* With `MosaicConfig.overlap` (the default at d = 128) each warpgroup also overlaps with itself,
  as FlashAttention-3/4 do: it issues S = Q K^T of the next key block and O += P V of this one
  together, waits for the first only, and runs the next softmax while P V is on the tensor
  cores; the warpgroups then take turns per step, round robin, through one `turn` barrier each
  instead of the schedule barrier (which pairs two; W != 2 needs overlap). The turns are
  mbarriers in shared memory, or with `MosaicConfig.named_turns` hardware named barriers
  (`bar.sync` / `bar.arrive` as inline PTX, what FA4 uses; Pallas reaches them only through
  `plgpu.inline_mgpu`).
* The producer, after its last copy, waits for the final consumption of every slot, so that
  each thread observes every phase of every barrier it waits on (the interpreter checks this).
* The epilogue writes O (reusing Q's shared-memory tile) and the natural-log LSE back by TMA.

Inputs are read in place in either layout: `bnsd` tiles are contiguous (b, h, rows, :) boxes,
`bsnd` tiles are strided (b, rows, h, :) boxes; TMA handles both, so neither needs a transpose.

Masking arrives as one float32 0/-inf key-bias vector built by the wrapper (`mosaic_attention.py`
says what folds into it): with it the kernel takes its single masked path (a dropped key's logit
is -inf, the running max is guarded so no `-inf - -inf` reaches `exp2`, a row with no key keeps
`l == 0` and returns zeros and `lse = -inf`); without it, a path with no mask arithmetic at all.

The kernel body is split by phase: `_fwd_producer` (warpgroup W, the TMA loads),
`_fwd_consumer` (the compute warpgroups: Q load, the key loop of `_fwd_scores` (S = Q K^T),
`_online_softmax` and `_fwd_pv` (O += P V), then `_fwd_epilogue`), or with overlap
`_fwd_consumer_overlap` (its key loop `_fwd_step_overlap`). The trace-time constants they
share are one frozen `_Fwd`, the kernel's refs one `_FwdRefs`. They are plain Python functions
called in the order above, so they trace into one kernel body with the barrier waits and arrivals
exactly where the design puts them.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jaxlib.mlir import ir
from jaxlib.mlir.dialects import llvm

from .mosaic_config import LN2, LOG2E, MosaicCall, _grid, pl, plgpu, smem_swizzle

# Hardware named barriers of `_NamedTurns`: Mosaic GPU itself uses barrier 0 (the CTA's) and
# 1 + warpgroup (each warpgroup's own), so the turns take 8 + warpgroup.
TURN_BARRIER_BASE = 8
TURN_THREADS = 256  # a turn's barrier counts the taker's 128 threads and the passer's 128


@dataclasses.dataclass(frozen=True)
class _Fwd:
    """Trace-time constants of one forward kernel."""
    bq: int  # query rows per compute warpgroup
    bk: int  # keys per pipeline step
    dp: int  # the head dim the forward runs at (MosaicCall.fwd_dp)
    n_steps: int  # key blocks
    stages: int  # K/V slots in the ring
    dtype: Any  # q/k/v/o dtype
    bnsd: bool  # layout
    has_kb: bool  # a key-bias vector is read
    interp: bool  # Mosaic GPU interpret mode
    qk_scale: float  # scale * log2(e)
    groups: int  # query heads per k/v head
    key_bias_dims: tuple[bool, bool] | None  # key bias varies over (b, n)
    overlap: bool = False  # intra-warpgroup overlap (MosaicConfig.overlap)
    registers: tuple[int, int] = (232, 40)  # per thread: compute, producer warpgroups
    wgs: int = 2  # compute warpgroups (MosaicConfig.compute_warpgroups)
    named_turns: bool = False  # overlap's turns through named barriers (not in interpret mode)

    def rows(self, ref, b, h, start, size):  # a (size, dp) tile of a 4-d q/k/v/o ref
        return ref.at[b, h, pl.ds(start, size)] if self.bnsd else ref.at[b, pl.ds(start, size), h]

    def layout_cast(self, x, layout):
        return x if self.interp else plgpu.layout_cast(x, layout)


@dataclasses.dataclass(frozen=True, eq=False)
class _FwdRefs:
    """The forward kernel's refs: operands, outputs, shared memory, barriers (kb_*: None unless
    a key bias is read)."""
    q_ref: Any
    k_ref: Any
    v_ref: Any
    kb_ref: Any
    o_ref: Any
    lse_ref: Any
    q_smem: Any
    k_smem: Any
    v_smem: Any
    lse_smem: Any
    kb_smem: Any
    q_bar: Any
    k_bar: Any
    v_bar: Any
    k_done: Any
    v_done: Any
    sched: Any
    kb_bar: Any
    turn: Any  # overlap with mbarrier turns only: turn.at[w] lets warpgroup w issue its matmuls

    @classmethod
    def unpack(cls, fw: _Fwd, q_ref, k_ref, v_ref, refs):
        """From the kernel's arguments, in the order `_fwd_call` declares them."""
        has_kb = fw.has_kb
        kb_ref = kb_smem = kb_bar = turn = None
        if has_kb:
            kb_ref, *refs = refs
        o_ref, lse_ref, q_smem, k_smem, v_smem, lse_smem, *refs = refs
        if has_kb:
            kb_smem, *refs = refs
        q_bar, k_bar, v_bar, k_done, v_done, sched, *refs = refs
        if has_kb:
            kb_bar, *refs = refs
        if fw.overlap and not fw.named_turns:
            turn, *refs = refs
        return cls(q_ref=q_ref, k_ref=k_ref, v_ref=v_ref, kb_ref=kb_ref, o_ref=o_ref,
                   lse_ref=lse_ref, q_smem=q_smem, k_smem=k_smem, v_smem=v_smem,
                   lse_smem=lse_smem, kb_smem=kb_smem, q_bar=q_bar, k_bar=k_bar, v_bar=v_bar,
                   k_done=k_done, v_done=v_done, sched=sched, kb_bar=kb_bar, turn=turn)

    def sched_sync(self):
        plgpu.barrier_arrive(self.sched)
        plgpu.barrier_wait(self.sched)


def _fwd_kernel(fw: _Fwd, r: _FwdRefs):
    """The kernel body: warpgroups 0 .. wgs-1 compute, warpgroup wgs produces."""
    qt, h, b = lax.axis_index("q"), lax.axis_index("h"), lax.axis_index("b")
    wg = lax.axis_index("wg")

    @pl.when(wg < fw.wgs)
    def _compute():
        (_fwd_consumer_overlap if fw.overlap else _fwd_consumer)(fw, r, qt, h, b, wg)

    @pl.when(wg == fw.wgs)
    def _producer():
        _fwd_producer(fw, r, h, b)


# ---------------------------------------------------------------------------------------------
# Compute warpgroups (0 .. wgs-1)


def _fwd_consumer(fw: _Fwd, r: _FwdRefs, qt, h, b, wg):
    """Compute warpgroup `wg`: load its Q tile, run the key loop, then the epilogue."""
    q_tile, q0, (acc, m_i, l_i) = _consumer_start(fw, r, qt, h, b, wg)
    sched_sync = r.sched_sync  # one function object: both `pl.when`s share one traced branch
    plgpu.barrier_wait(r.k_bar.at[0])
    pl.when(wg == 1)(sched_sync)

    step = functools.partial(_fwd_step, fw, r, q_tile)
    acc, m_i, l_i = lax.fori_loop(0, fw.n_steps, step, (acc, m_i, l_i))
    pl.when(wg == 0)(sched_sync)

    _fwd_epilogue(fw, r, q_tile, acc, m_i, l_i, b, h, wg, q0)


def _consumer_start(fw: _Fwd, r: _FwdRefs, qt, h, b, wg):
    """Take the registers, load this warpgroup's Q tile; returns it, its first row and the
    initial (acc, m, l)."""
    bq, dp, interp = fw.bq, fw.dp, fw.interp
    plgpu.set_max_registers(fw.registers[0], action="increase")
    q_tile = r.q_smem.at[wg]
    q0 = qt * (fw.wgs * bq) + wg * bq
    plgpu.copy_gmem_to_smem(fw.rows(r.q_ref, b, h, q0, bq), q_tile, r.q_bar.at[wg])
    plgpu.barrier_wait(r.q_bar.at[wg])

    row_layout = None if interp else plgpu.Layout.WGMMA.reduce(1)
    acc_layout = None if interp else plgpu.Layout.WGMMA
    acc = fw.layout_cast(jnp.zeros((bq, dp), jnp.float32), acc_layout)
    m_i = fw.layout_cast(jnp.full((bq,), -jnp.inf, jnp.float32), row_layout)
    l_i = fw.layout_cast(jnp.zeros((bq,), jnp.float32), row_layout)
    return q_tile, q0, (acc, m_i, l_i)


def _fwd_step(fw: _Fwd, r: _FwdRefs, q_tile, i, carry):
    """One key block: S = Q K^T, the online softmax, O += P V."""
    acc, m_i, l_i = carry
    slot = lax.rem(i, jnp.array(fw.stages, i.dtype))
    s, kbias = _fwd_scores(fw, r, q_tile, slot)
    acc, l_i, m_new, p16 = _online_softmax(fw, s, kbias, acc, m_i, l_i)
    acc = _fwd_pv(fw, r, i, slot, acc, p16)
    return acc, m_new, l_i


def _fwd_scores(fw: _Fwd, r: _FwdRefs, q_tile, slot):
    """S = Q K^T for the K tile in `slot` (and that slot's key bias, or None); releases K."""
    bq, bk, interp = fw.bq, fw.bk, fw.interp
    kbias = _key_bias(fw, r, slot)
    if interp:
        s = _qk_interp(q_tile, r.k_smem, slot)
        r.sched_sync()
    else:
        def qk(acc_ref):
            plgpu.wgmma(acc_ref, q_tile, plgpu.transpose_ref(r.k_smem.at[slot], (1, 0)))
            r.sched_sync()
            return acc_ref[...]
        s = pl.run_scoped(qk, plgpu.ACC((bq, bk), jnp.float32))
    plgpu.barrier_arrive(r.k_done.at[slot])
    return s, kbias


def _key_bias(fw: _Fwd, r: _FwdRefs, slot):
    """The key-bias vector of the K tile in `slot` (None without one); read before the slot is
    released with K."""
    if not fw.has_kb:
        return None
    plgpu.barrier_wait(r.kb_bar.at[slot])
    if fw.interp:
        return r.kb_smem[slot]
    return plgpu.load(r.kb_smem.at[slot], (), layout=plgpu.Layout.WGMMA.reduce(0))


def _softmax_step(fw: _Fwd, s, kbias, m_i, l_i, cast=True):
    """One block of the online softmax in base 2: P (in the input dtype; float32 with
    cast=False), the new running max, the new row sum, and alpha, the factor that rescales what
    was accumulated before."""
    bq, bk = fw.bq, fw.bk
    qk_scale = fw.qk_scale
    if fw.has_kb:
        s = s * qk_scale + lax.broadcast_in_dim(kbias, (bq, bk), [1])
        m_new = jnp.maximum(m_i, s.max(axis=1))
        m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # empty so far: no NaN
        p = jnp.exp2(s - lax.broadcast_in_dim(m_use, (bq, bk), [0]))
    else:
        m_new = jnp.maximum(m_i, s.max(axis=1) * qk_scale)
        m_use = m_new
        p = jnp.exp2(s * qk_scale - lax.broadcast_in_dim(m_use, (bq, bk), [0]))
    alpha = jnp.exp2(m_i - m_use)
    l_i = l_i * alpha + p.sum(axis=1)
    return (p.astype(fw.dtype) if cast else p), m_new, l_i, alpha


def _qk_interp(q_tile, k_smem, slot):
    """Interpret mode's S = Q K^T (the interpreter cannot run wgmma on a transposed view)."""
    return lax.dot_general(q_tile[...], k_smem[slot], (((1,), (1,)), ((), ())),
                           preferred_element_type=jnp.float32)


def _pv_interp(p16, v_smem, slot):
    """Interpret mode's P V (the interpreter cannot run wgmma with a register operand)."""
    return lax.dot_general(p16, v_smem[slot], (((1,), (0,)), ((), ())),
                           preferred_element_type=jnp.float32)


def _online_softmax(fw: _Fwd, s, kbias, acc, m_i, l_i):
    """Online softmax in base 2: returns (acc, l_i) rescaled, the new running max, and P in the
    input dtype."""
    p16, m_new, l_i, alpha = _softmax_step(fw, s, kbias, m_i, l_i)
    acc = acc * lax.broadcast_in_dim(alpha, (fw.bq, fw.dp), [0])
    if not fw.interp:
        acc, l_i, m_new, p16 = lax.optimization_barrier((acc, l_i, m_new, p16))
    return acc, l_i, m_new, p16


def _fwd_pv(fw: _Fwd, r: _FwdRefs, i, slot, acc, p16):
    """Take the tensor cores from the other warpgroup, O += P V (the next K tile's wait overlaps
    the wgmma), release V."""
    plgpu.barrier_arrive(r.sched)  # softmax done
    plgpu.barrier_wait(r.v_bar.at[slot])
    plgpu.barrier_wait(r.sched)  # the other warpgroup's matmul is issued

    nxt = i + 1
    nxt_slot = lax.rem(nxt, jnp.array(fw.stages, nxt.dtype))

    def wait_next_k():
        @pl.when(nxt < fw.n_steps)
        def _():
            plgpu.barrier_wait(r.k_bar.at[nxt_slot])

    if fw.interp:
        acc = acc + _pv_interp(p16, r.v_smem, slot)
        wait_next_k()
    else:
        def pv(acc_ref):
            plgpu.wgmma(acc_ref, p16, r.v_smem.at[slot])
            wait_next_k()  # overlaps the wgmma
        acc = pl.run_state(pv)(plgpu.ACC.init(acc))
    plgpu.barrier_arrive(r.v_done.at[slot])
    return acc


# ---------------------------------------------------------------------------------------------
# Compute warpgroups with intra-warpgroup overlap (MosaicConfig.overlap)
#
# Per key block j a warpgroup issues S(j+1) = Q K(j+1)^T and then O += P(j) V(j) as two wgmma
# groups, waits for the first group only, and computes the softmax of block j+1 while P(j) V(j)
# runs; then it waits for that, rescales O and releases V(j). The compute warpgroups take turns
# to issue, round robin (turn.at[w] opens warpgroup w's turn; each passes it to the next once its
# matmuls are issued), so one's matmuls run while the others do their softmax. Block 0's S comes
# first (prologue) and the last block's P V last (epilogue), each one turn. The last warpgroup
# opens warpgroup 0's first turn; warpgroup 0 observes the last warpgroup's last pass at the end,
# so every phase is observed.


def _fwd_consumer_overlap(fw: _Fwd, r: _FwdRefs, qt, h, b, wg):
    q_tile, q0, (acc, m_i, l_i) = _consumer_start(fw, r, qt, h, b, wg)
    turn = (_NamedTurns if fw.named_turns else _Turns)(r.turn, wg, fw.wgs)
    pl.when(wg == fw.wgs - 1)(turn.open_first)

    plgpu.barrier_wait(r.k_bar.at[0])
    kbias = _key_bias(fw, r, 0)
    turn.take()
    if fw.interp:
        s = _qk_interp(q_tile, r.k_smem, 0)
        turn.pass_on()
    else:
        def qk(s_ref):
            plgpu.wgmma(s_ref, q_tile, plgpu.transpose_ref(r.k_smem.at[0], (1, 0)))
            turn.pass_on()
            return plgpu.wgmma_accumulator_load(s_ref)
        s = pl.run_scoped(qk, plgpu.ACC((fw.bq, fw.bk), jnp.float32))
    plgpu.barrier_arrive(r.k_done.at[0])
    p16, m_i, l_i, _ = _softmax_step(fw, s, kbias, m_i, l_i)  # acc is zero: nothing to rescale

    step = functools.partial(_fwd_step_overlap, fw, r, q_tile, turn)
    acc, m_i, l_i, p16 = lax.fori_loop(0, fw.n_steps - 1, step, (acc, m_i, l_i, p16))

    last = fw.n_steps - 1
    slot = last % fw.stages
    plgpu.barrier_wait(r.v_bar.at[slot])
    turn.take()
    if fw.interp:
        acc = acc + _pv_interp(p16, r.v_smem, slot)
        turn.pass_on()
    else:
        def pv(o_ref):
            plgpu.wgmma(o_ref, p16, r.v_smem.at[slot])
            turn.pass_on()
        acc = pl.run_state(pv)(plgpu.ACC.init(acc))
    plgpu.barrier_arrive(r.v_done.at[slot])
    pl.when(wg == 0)(turn.take)  # the last warpgroup's last pass

    _fwd_epilogue(fw, r, q_tile, acc, m_i, l_i, b, h, wg, q0)


@dataclasses.dataclass(frozen=True, eq=False)
class _Turns:
    """Turn-taking on the tensor cores among `n` compute warpgroups, round robin."""
    bars: Any
    wg: Any
    n: int = 2

    def take(self):
        plgpu.barrier_wait(self.bars.at[self.wg])

    def pass_on(self):
        plgpu.barrier_arrive(self.bars.at[lax.rem(self.wg + 1, self.n)])

    def open_first(self):
        plgpu.barrier_arrive(self.bars.at[0])


def _named_barrier(op: str, barrier_id, threads: int):
    """`bar.<op>` ("sync": arrive and wait; "arrive") on hardware barrier `barrier_id` (a traced
    int32) counting `threads` threads, as inline PTX."""
    @plgpu.inline_mgpu(arg_types=(plgpu.Layout.WG_SPLAT,))
    def emit(_, idx):
        llvm.inline_asm(ir.Type.parse("!llvm.void"), [idx.registers.item()],
                        f"bar.{op} $0, {threads};", "r", has_side_effects=True)
    emit(jnp.asarray(barrier_id, jnp.int32))


@dataclasses.dataclass(frozen=True, eq=False)
class _NamedTurns(_Turns):
    """`_Turns` on hardware named barriers: warpgroup w's turn is barrier 8 + w, complete once
    its own 128 threads sync there and the 128 of the warpgroup before it have arrived; no
    shared memory is polled. The round robin keeps every barrier's arrivals and syncs in step
    (a warpgroup passes again only after its own turn, which needs the others' passes)."""
    def take(self):
        _named_barrier("sync", TURN_BARRIER_BASE + self.wg, TURN_THREADS)

    def pass_on(self):
        _named_barrier("arrive", TURN_BARRIER_BASE + lax.rem(self.wg + 1, self.n), TURN_THREADS)

    def open_first(self):
        _named_barrier("arrive", TURN_BARRIER_BASE, TURN_THREADS)


def _fwd_step_overlap(fw: _Fwd, r: _FwdRefs, q_tile, turn: _Turns, j, carry):
    """Block j's P V and block j+1's S = Q K^T issued together; block j+1's softmax while P V
    runs. Carry: (O over blocks < j, m and l over blocks <= j, P of block j)."""
    acc, m_i, l_i, p16 = carry
    stages = jnp.array(fw.stages, j.dtype)
    slot, nslot = lax.rem(j, stages), lax.rem(j + 1, stages)
    plgpu.barrier_wait(r.k_bar.at[nslot])
    kbias = _key_bias(fw, r, nslot)
    plgpu.barrier_wait(r.v_bar.at[slot])
    turn.take()
    if fw.interp:
        s = _qk_interp(q_tile, r.k_smem, nslot)
        acc = acc + _pv_interp(p16, r.v_smem, slot)
        turn.pass_on()
        plgpu.barrier_arrive(r.k_done.at[nslot])
        p16, m_i, l_i, alpha = _softmax_step(fw, s, kbias, m_i, l_i)
    else:
        def body(refs):
            o_ref, p_ref, m_ref, l_ref, alpha_ref = refs

            def issue(s_ref):
                plgpu.wgmma(s_ref, q_tile, plgpu.transpose_ref(r.k_smem.at[nslot], (1, 0)))
                plgpu.wgmma(o_ref, p16, r.v_smem.at[slot])
                turn.pass_on()
                return plgpu.wgmma_accumulator_load(s_ref, wait_n=1)  # S only; P V runs on
            s = pl.run_scoped(issue, plgpu.ACC((fw.bq, fw.bk), jnp.float32))
            plgpu.barrier_arrive(r.k_done.at[nslot])
            p_ref[...], m_ref[...], l_ref[...], alpha_ref[...] = _softmax_step(
                fw, s, kbias, m_i, l_i, cast=False)
        # run_state waits for P V on leaving; the softmax's results leave through plain refs
        # (the first, P, in float32: it is cast once the old P's registers are free, as FA4 does).
        p_init = fw.layout_cast(jnp.zeros((fw.bq, fw.bk), jnp.float32), plgpu.Layout.WGMMA)
        acc, p, m_i, l_i, alpha = pl.run_state(body)(
            (plgpu.ACC.init(acc), p_init, m_i, l_i, m_i))
        p16 = p.astype(fw.dtype)
    plgpu.barrier_arrive(r.v_done.at[slot])
    acc = acc * lax.broadcast_in_dim(alpha, (fw.bq, fw.dp), [0])
    return acc, m_i, l_i, p16


def _fwd_epilogue(fw: _Fwd, r: _FwdRefs, q_tile, acc, m_i, l_i, b, h, wg, q0):
    """O = acc / l into Q's shared-memory tile, the natural-log lse, both written back by TMA."""
    bq, dp = fw.bq, fw.dp
    if fw.has_kb:
        empty = l_i == 0.0
        l_safe = jnp.where(empty, 1.0, l_i)
    else:
        l_safe = l_i
    inv = 1.0 / l_safe
    q_tile[...] = (acc * lax.broadcast_in_dim(inv, (bq, dp), [0])).astype(fw.dtype)
    lse = m_i * LN2 + jnp.log(l_safe)  # m is in base 2; lse in natural log
    if fw.has_kb:
        lse = jnp.where(empty, -jnp.inf, lse)
    r.lse_smem.at[wg][...] = lse
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(q_tile, fw.rows(r.o_ref, b, h, q0, bq))
    plgpu.copy_smem_to_gmem(r.lse_smem.at[wg], r.lse_ref.at[b, h, pl.ds(q0, bq)])
    plgpu.wait_smem_to_gmem(0)


# ---------------------------------------------------------------------------------------------
# Producer warpgroup (wgs): TMA loads of K, V and the key bias


def _fwd_producer(fw: _Fwd, r: _FwdRefs, h, b):
    bk, stages, n_steps, has_kb = fw.bk, fw.stages, fw.n_steps, fw.has_kb
    plgpu.set_max_registers(fw.registers[1], action="decrease")
    kvh = lax.div(h, jnp.array(fw.groups, h.dtype))
    if has_kb:
        kbb = b if fw.key_bias_dims[0] else 0
        kbh = h if fw.key_bias_dims[1] else 0

    def issue(step_i, slot):
        k0 = step_i * bk
        plgpu.copy_gmem_to_smem(fw.rows(r.k_ref, b, kvh, k0, bk), r.k_smem.at[slot],
                                r.k_bar.at[slot])
        if has_kb:
            plgpu.copy_gmem_to_smem(r.kb_ref.at[kbb, kbh, pl.ds(k0, bk)], r.kb_smem.at[slot],
                                    r.kb_bar.at[slot])

    def issue_v(step_i, slot):
        plgpu.copy_gmem_to_smem(fw.rows(r.v_ref, b, kvh, step_i * bk, bk), r.v_smem.at[slot],
                                r.v_bar.at[slot])

    for s0 in range(stages):
        issue(s0, s0)
        issue_v(s0, s0)

    @pl.loop(0, n_steps - stages)
    def _(i):
        slot = lax.rem(i, jnp.array(stages, i.dtype))
        plgpu.barrier_wait(r.k_done.at[slot])
        issue(i + stages, slot)
        plgpu.barrier_wait(r.v_done.at[slot])
        issue_v(i + stages, slot)

    # Observe the last consumption of every slot before leaving.
    for j in range(stages):
        slot = (n_steps - stages + j) % stages
        plgpu.barrier_wait(r.k_done.at[slot])
        plgpu.barrier_wait(r.v_done.at[slot])


# ---------------------------------------------------------------------------------------------
# The call: shared memory, barriers, grid


def _fwd_call(st: MosaicCall, q, k, v, kb):
    """q, k, v already padded (layout st.layout); kb: (b|1, n|1, skv_pad) f32 0/-inf or None."""
    cfg = st.config
    bq, bk, dp = cfg.block_q, cfg.block_kv, st.fwd_dp
    n_steps = st.skv_pad // bk
    stages = max(1, min(cfg.stages, n_steps))
    dtype = q.dtype
    bnsd = st.layout == "bnsd"
    batch = q.shape[0]
    heads = q.shape[1] if bnsd else q.shape[2]
    wgs = cfg.compute_warpgroups
    if wgs != 2 and not cfg.overlap:
        raise ValueError(f"MosaicConfig.compute_warpgroups={wgs} needs overlap=True (the "
                         "schedule barrier of the plain pipeline pairs two warpgroups)")
    regs, regs_producer = cfg.fwd_registers
    if wgs * 128 * regs + 128 * regs_producer > 65536:
        raise ValueError(f"MosaicConfig.fwd_registers={cfg.fwd_registers} with {wgs} compute "
                         "warpgroups exceeds the SM's 65536 registers")
    q_tiles = st.sq_pad // (wgs * bq)
    has_kb = kb is not None
    interp = st.interpret
    fw = _Fwd(bq=bq, bk=bk, dp=dp, n_steps=n_steps, stages=stages, dtype=dtype, bnsd=bnsd,
              has_kb=has_kb, interp=interp, qk_scale=st.scale * LOG2E, groups=st.groups,
              key_bias_dims=st.key_bias_dims, overlap=cfg.overlap,
              registers=cfg.fwd_registers, wgs=cfg.compute_warpgroups,
              named_turns=cfg.overlap and cfg.named_turns and not interp)

    def kernel(q_ref, k_ref, v_ref, *refs):
        _fwd_kernel(fw, _FwdRefs.unpack(fw, q_ref, k_ref, v_ref, refs))

    swizzle = smem_swizzle(dp, jnp.dtype(dtype).itemsize)
    smem_t = () if interp else (plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize)),
                                plgpu.SwizzleTransform(swizzle))
    scratch = [
        plgpu.SMEM((wgs, bq, dp), dtype, transforms=smem_t),
        plgpu.SMEM((stages, bk, dp), dtype, transforms=smem_t),
        plgpu.SMEM((stages, bk, dp), dtype, transforms=smem_t),
        plgpu.SMEM((wgs, bq), jnp.float32),
    ]
    if has_kb:
        scratch.append(plgpu.SMEM((stages, bk), jnp.float32))
    scratch += [
        plgpu.Barrier(num_barriers=wgs),
        plgpu.Barrier(num_barriers=stages),
        plgpu.Barrier(num_barriers=stages),
        plgpu.Barrier(num_arrivals=wgs, num_barriers=stages),
        plgpu.Barrier(num_arrivals=wgs, num_barriers=stages),
        plgpu.Barrier(num_arrivals=2),
    ]
    if has_kb:
        scratch.append(plgpu.Barrier(num_barriers=stages))
    if cfg.overlap and not fw.named_turns:
        scratch.append(plgpu.Barrier(num_barriers=wgs))

    grid, names = _grid(cfg, batch, heads, q_tiles), _grid(cfg, "b", "h", "q")
    out_type = [jax.ShapeDtypeStruct(q.shape, dtype),
                jax.ShapeDtypeStruct((batch, heads, st.sq_pad), jnp.float32)]
    kw = {}
    if interp:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
        kw["interpret"] = InterpretGPUParams()
    call = plgpu.kernel(
        kernel, out_type=out_type, scratch_types=scratch, grid=grid, grid_names=names,
        num_threads=wgs + 1, thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True), **kw)
    args = (q, k, v) + ((kb,) if has_kb else ())
    return call(*args)
