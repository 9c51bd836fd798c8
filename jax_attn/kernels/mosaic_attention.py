"""Hopper flash attention in Pallas's Mosaic GPU dialect: the forward kernel, and a custom VJP.

Design of the forward (one CTA = three warpgroups, FlashAttention-3 style):

* Warpgroups 0 and 1 compute; each owns `block_q` (64) query rows, so a CTA covers
  `2 * block_q` queries of one head. Warpgroup 2 is the producer: it only issues TMA copies of
  the K and V tiles (and the optional key-bias vector) into a ring of `stages` shared-memory
  slots, waiting on per-slot "consumed" barriers before it overwrites a slot. It gives its
  registers away (`set_max_registers(40)`); the compute warpgroups take 232.
* Per key block a compute warpgroup issues S = Q K^T as a wgmma (Q and K from shared memory,
  K transposed through a `transpose_ref` view, no copy), does the online softmax in registers
  (base-2 logits: `exp2` is one instruction, so `qk_scale = scale * log2(e)` folds into one FMA
  with the running max), then O += P V as a wgmma with P as the register operand.
* The two compute warpgroups take turns on the tensor cores through a shared "schedule"
  barrier: one issues its matmul while the other does its softmax (ping-pong). Warpgroup 1
  starts one phase late and warpgroup 0 ends one phase late, so both pass the barrier the same
  number of times.
* The producer, after its last copy, waits for the final consumption of every slot, so that
  each thread observes every phase of every barrier it waits on (the interpreter checks this).
* The epilogue writes O (reusing Q's shared-memory tile) and the natural-log LSE back by TMA.

Inputs are read in place in either layout: `bnsd` tiles are contiguous (b, h, rows, :) boxes,
`bsnd` tiles are strided (b, rows, h, :) boxes; TMA handles both, so neither needs a transpose.

Masking follows `jax_attn.kernels.flash_attention` (and `jax_attn.reference`): a dropped key
gets the logit -inf, never a large finite number; a row with no key keeps `l == 0` and returns
zeros and `lse = -inf`, and the running max is guarded so no `-inf - -inf` reaches `exp2`.
Every dropped key arrives through ONE float32 key-bias vector `(b|1, n|1, skv_padded)` of 0/-inf
built in the wrapper: the per-key bool mask, `kv_lengths`, and the padded key tail all fold into
it, so the kernel has a single masked code path and, when nothing is masked (aligned lengths, no
mask), a path with no mask arithmetic at all.

What the wrapper pads (never the caller): wgmma wants 128-byte swizzled rows and a contraction
dim that is a multiple of 16, so head dims are run at 64, 128 or 256 (40 -> 64, 80 and 96 -> 128,
zero columns change neither Q K^T nor the kept columns of P V); query rows are padded to a
multiple of `2 * block_q` and keys to a multiple of `block_kv` (the key tail is masked through
the key bias; padded query rows are sliced off). Shapes that are already aligned are not copied.

Backward (`backward="auto"`, the default: "mosaic" for head dims up to 128, else "triton"): two
Mosaic GPU kernels of the same CTA shape as the forward (two compute warpgroups of 64 rows, one
TMA producer streaming a ring of `MosaicConfig.bwd_stages` slots): dQ over query tiles, and dK/dV
over key tiles of each k/v head with the group's query heads streamed in turn (GQA sums stay in
registers). Their S^T, dP^T and dS^T tiles are formed as K Q^T and V dO^T (transposed views);
delta = rowsum(dO * O) - dlse and the base-2 lse are computed in XLA before the kernels. At
d > 128 the dK and dV accumulators would not fit in registers, so there (and with
`backward="triton"`) the Triton dK/dV and dQ kernels of `jax_attn.kernels.flash_attention` run,
fed with this forward's output and lse (same masking conventions, same gradients).

Interpret mode (`interpret=True`, the CPU tests): Mosaic GPU's interpreter runs the same kernel
body (grid, warpgroup threads, TMA copies, barriers with their phase checks, the index
arithmetic, the online softmax and the epilogue), but it cannot run wgmma with a register operand
or a transposed shared-memory view, nor `layout_cast`; there the two matmuls are plain
`lax.dot_general` on the shared-memory tiles and layout casts are skipped. See
`tests/test_mosaic.py` for what that does and does not prove.

Measured on an H100 (bf16, benchmarks/results/2026-11-23-h100-mosaic-grid/README.md), against
cuDNN in the same run: forward 1.03x (d = 64), 1.02x (d = 128, 4608 tokens), 0.99x at 16k tokens
(1.00x reading bnsd); backward 0.94x, 0.96x, 0.90x. Against our Triton kernels on self-attention:
forward 1.2-1.3x, backward 1.25-1.45x faster; slower than Triton on 77-key cross-attention (the
`pallas` backend routes that to Triton). That README also lists what was tried and not kept
(FlashAttention-3's intra-warpgroup overlap, paired backward matmuls) and what the profile says
still separates the 16k forward from cuDNN.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import logging
import math

import jax
import jax.numpy as jnp
from jax import lax

from . import configs, sharding

_triton = importlib.import_module(__package__ + ".flash_attention")  # the module, not the function

log = logging.getLogger(__name__)

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)

try:  # Mosaic GPU is experimental; a JAX without it must still import jax_attn.
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu
    _IMPORT_ERROR = None
except Exception as e:  # pragma: no cover - depends on the installed JAX
    pl = plgpu = None
    _IMPORT_ERROR = f"{type(e).__name__}: {e}"


def available() -> str | None:
    """None when the Mosaic GPU Pallas dialect can be imported, else why not."""
    return _IMPORT_ERROR


# ---------------------------------------------------------------------------------------------
# Configuration


@dataclasses.dataclass(frozen=True)
class MosaicConfig:
    block_q: int = 64  # query rows per compute warpgroup (a CTA has two)
    block_kv: int = 128  # keys per pipeline step
    stages: int = 2  # shared-memory slots of K/V in flight
    # Which CTAs run side by side (Mosaic launches the last grid dimension as CUDA's x). True:
    # the sequence tiles of one head, so they share its K/V (forward, dQ) or Q/dO (dK/dV) in L2.
    # False: the heads, whose K/V re-read from DRAM once they outgrow L2 (Nsight Compute, 16k
    # tokens: DRAM at 40% of its bandwidth, cuDNN 1%). H100, 16k tokens d = 128: forward 9.8 ->
    # 8.9 ms, forward+backward 41.7 -> 36.8 ms; 1-4% faster at 4k-4.6k tokens too.
    q_major_grid: bool = True
    bwd_stages: int = 2  # shared-memory slots of the tiles the backward kernels stream


def head_dim_padded(d: int) -> int | None:
    """The head dim the kernel runs at, or None when it is not supported (d > 256)."""
    for dp in (64, 128, 256):
        if d <= dp:
            return dp
    return None


def default_config(d: int) -> MosaicConfig:
    dp = head_dim_padded(d)
    if dp == 256:  # 64x256 f32 accumulator = 128 registers/thread; keep S and smem small
        return MosaicConfig(block_q=64, block_kv=64, stages=2)
    # H100 2026-11-23 (benchmarks/mosaic_gpu.py --tune): at d = 64, 256-key blocks make the
    # forward 4-12% faster than 128 (half the barrier passes per key; no register spills).
    # Backward pipeline depth: forward+backward 3.7% faster with 4 stages than 2 at d = 64, 2.2%
    # with 3 at d = 128 (4 would not leave shared memory to spare).
    if dp == 64:
        return MosaicConfig(block_q=64, block_kv=256, stages=2, bwd_stages=4)
    return MosaicConfig(block_q=64, block_kv=128, stages=2, bwd_stages=3)


# Shape buckets where the Mosaic forward measured faster than the Triton kernel on an H100
# (bf16, 2026-11-23, benchmarks/results/2026-11-23-h100-mosaic.md). Keys: (padded head dim,
# kind), kind "cross" for fewer than 256 keys, else "short_q" for fewer than 128 queries (a CTA
# computes 128 query rows, so a short query block wastes most of it; not measured), else "self".
# The `pallas` backend's automatic choice (JAX_ATTN_PALLAS_KERNEL=auto) uses Mosaic only for
# buckets listed True; an unlisted bucket was not measured and stays on Triton.
FASTER_THAN_TRITON_SM90: dict[tuple[int, str], bool] = {
    (64, "self"): True,  # d=64: 1.26x Triton forward (1.04x cuDNN); d=40 (run at 64): 1.21x
    (128, "self"): True,  # d=128: 1.20x (4608 keys), 1.11x (16384 keys)
    (64, "cross"): False,  # 77 keys: 0.46-0.85x (d=64), 0.91x (d=40): padding + launch bound
}


def shape_bucket(d: int, sq: int, skv: int) -> tuple[int | None, str]:
    kind = "cross" if skv < 256 else "short_q" if sq < 128 else "self"
    return head_dim_padded(d), kind


def unsupported(*, dtype, d, dv, has_full_bias, is_causal) -> list[str]:
    """Why the Mosaic kernel cannot serve these inputs (empty when it can)."""
    why = []
    if _IMPORT_ERROR is not None:
        why.append(f"Mosaic GPU Pallas is not importable ({_IMPORT_ERROR})")
    if jnp.dtype(dtype).name not in ("bfloat16", "float16"):
        why.append(f"dtype {jnp.dtype(dtype).name} (the Mosaic kernel takes bfloat16/float16)")
    if head_dim_padded(d) is None:
        why.append(f"head dim {d} > 256")
    if dv != d:
        why.append(f"dv ({dv}) != d ({d})")
    if has_full_bias:
        why.append("a full (sq, skv) mask or bias (the Mosaic kernel reads per-key masks only)")
    if is_causal:
        why.append("causal masking (not implemented in the Mosaic kernel)")
    return why


# ---------------------------------------------------------------------------------------------
# Static description of one call (hashable: a custom_vjp nondiff argument)


@dataclasses.dataclass(frozen=True)
class _Static:
    scale: float
    layout: str
    sq: int
    skv: int
    d: int
    groups: int
    key_bias_dims: tuple[bool, bool] | None  # kernel key bias: (varies over b, varies over n)
    orig_key_bias_dims: tuple[bool, bool] | None  # the caller's mask, for the backward
    has_kv_lengths: bool
    config: MosaicConfig
    interpret: bool
    backward: str  # "mosaic" or "triton"

    @property
    def dp(self):
        return head_dim_padded(self.d)

    @property
    def sq_pad(self):
        t = 2 * self.config.block_q
        return -(-self.sq // t) * t

    @property
    def skv_pad(self):
        t = self.config.block_kv
        return -(-self.skv // t) * t


def _grid(cfg, batch, heads, tiles):
    """The grid (or its names) in launch order; the last dimension varies fastest (CUDA's x).

    q_major_grid: (batch, heads, tiles), tiles fastest. Else (tiles, heads, batch).
    """
    return (batch, heads, tiles) if cfg.q_major_grid else (tiles, heads, batch)


# ---------------------------------------------------------------------------------------------
# Forward kernel


def _fwd_call(st: _Static, q, k, v, kb):
    """q, k, v already padded (layout st.layout); kb: (b|1, n|1, skv_pad) f32 0/-inf or None."""
    cfg = st.config
    bq, bk, dp = cfg.block_q, cfg.block_kv, st.dp
    n_steps = st.skv_pad // bk
    stages = max(1, min(cfg.stages, n_steps))
    dtype = q.dtype
    bnsd = st.layout == "bnsd"
    batch = q.shape[0]
    heads = q.shape[1] if bnsd else q.shape[2]
    q_tiles = st.sq_pad // (2 * bq)
    has_kb = kb is not None
    interp = st.interpret
    qk_scale = st.scale * LOG2E
    groups = st.groups

    def rows(ref, b, h, start, size):  # a (size, dp) tile of a 4-d q/k/v/o ref
        return ref.at[b, h, pl.ds(start, size)] if bnsd else ref.at[b, pl.ds(start, size), h]

    def layout_cast(x, layout):
        return x if interp else plgpu.layout_cast(x, layout)

    def kernel(q_ref, k_ref, v_ref, *refs):
        if has_kb:
            kb_ref, *refs = refs
        o_ref, lse_ref, q_smem, k_smem, v_smem, lse_smem, *refs = refs
        if has_kb:
            kb_smem, *refs = refs
        q_bar, k_bar, v_bar, k_done, v_done, sched, *refs = refs
        kb_bar = refs[0] if has_kb else None

        qt, h, b = lax.axis_index("q"), lax.axis_index("h"), lax.axis_index("b")
        wg = lax.axis_index("wg")

        def sched_sync():
            plgpu.barrier_arrive(sched)
            plgpu.barrier_wait(sched)

        @pl.when(wg < 2)
        def _compute():
            plgpu.set_max_registers(232, action="increase")
            q_tile = q_smem.at[wg]
            q0 = qt * (2 * bq) + wg * bq
            plgpu.copy_gmem_to_smem(rows(q_ref, b, h, q0, bq), q_tile, q_bar.at[wg])
            plgpu.barrier_wait(q_bar.at[wg])

            row_layout = None if interp else plgpu.Layout.WGMMA.reduce(1)
            acc_layout = None if interp else plgpu.Layout.WGMMA
            acc = layout_cast(jnp.zeros((bq, dp), jnp.float32), acc_layout)
            m_i = layout_cast(jnp.full((bq,), -jnp.inf, jnp.float32), row_layout)
            l_i = layout_cast(jnp.zeros((bq,), jnp.float32), row_layout)

            plgpu.barrier_wait(k_bar.at[0])
            pl.when(wg == 1)(sched_sync)

            def step(i, carry):
                acc, m_i, l_i = carry
                slot = lax.rem(i, jnp.array(stages, i.dtype))
                if has_kb:  # read the key bias before the slot is released with K
                    plgpu.barrier_wait(kb_bar.at[slot])
                    if interp:
                        kbias = kb_smem[slot]
                    else:
                        kbias = plgpu.load(kb_smem.at[slot], (),
                                           layout=plgpu.Layout.WGMMA.reduce(0))
                if interp:
                    s = lax.dot_general(q_tile[...], k_smem[slot], (((1,), (1,)), ((), ())),
                                        preferred_element_type=jnp.float32)
                    sched_sync()
                else:
                    def qk(acc_ref):
                        plgpu.wgmma(acc_ref, q_tile, plgpu.transpose_ref(k_smem.at[slot], (1, 0)))
                        sched_sync()
                        return acc_ref[...]
                    s = pl.run_scoped(qk, plgpu.ACC((bq, bk), jnp.float32))
                plgpu.barrier_arrive(k_done.at[slot])

                # Online softmax in base 2.
                if has_kb:
                    s = s * qk_scale + lax.broadcast_in_dim(kbias, (bq, bk), [1])
                    m_new = jnp.maximum(m_i, s.max(axis=1))
                    m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # empty so far: no NaN
                    p = jnp.exp2(s - lax.broadcast_in_dim(m_use, (bq, bk), [0]))
                else:
                    m_new = jnp.maximum(m_i, s.max(axis=1) * qk_scale)
                    m_use = m_new
                    p = jnp.exp2(s * qk_scale - lax.broadcast_in_dim(m_use, (bq, bk), [0]))
                alpha = jnp.exp2(m_i - m_use)
                acc = acc * lax.broadcast_in_dim(alpha, (bq, dp), [0])
                l_i = l_i * alpha + p.sum(axis=1)
                p16 = p.astype(dtype)
                if not interp:
                    acc, l_i, m_new, p16 = lax.optimization_barrier((acc, l_i, m_new, p16))
                plgpu.barrier_arrive(sched)  # softmax done
                plgpu.barrier_wait(v_bar.at[slot])
                plgpu.barrier_wait(sched)  # the other warpgroup's matmul is issued

                nxt = i + 1
                nxt_slot = lax.rem(nxt, jnp.array(stages, nxt.dtype))

                def wait_next_k():
                    @pl.when(nxt < n_steps)
                    def _():
                        plgpu.barrier_wait(k_bar.at[nxt_slot])

                if interp:
                    acc = acc + lax.dot_general(p16, v_smem[slot], (((1,), (0,)), ((), ())),
                                                preferred_element_type=jnp.float32)
                    wait_next_k()
                else:
                    def pv(acc_ref):
                        plgpu.wgmma(acc_ref, p16, v_smem.at[slot])
                        wait_next_k()  # overlaps the wgmma
                    acc = pl.run_state(pv)(plgpu.ACC.init(acc))
                plgpu.barrier_arrive(v_done.at[slot])
                return acc, m_new, l_i

            acc, m_i, l_i = lax.fori_loop(0, n_steps, step, (acc, m_i, l_i))
            pl.when(wg == 0)(sched_sync)

            if has_kb:
                empty = l_i == 0.0
                l_safe = jnp.where(empty, 1.0, l_i)
            else:
                l_safe = l_i
            inv = 1.0 / l_safe
            q_tile[...] = (acc * lax.broadcast_in_dim(inv, (bq, dp), [0])).astype(dtype)
            lse = m_i * LN2 + jnp.log(l_safe)  # m is in base 2; lse in natural log
            if has_kb:
                lse = jnp.where(empty, -jnp.inf, lse)
            lse_smem.at[wg][...] = lse
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(q_tile, rows(o_ref, b, h, q0, bq))
            plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[b, h, pl.ds(q0, bq)])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == 2)
        def _producer():
            plgpu.set_max_registers(40, action="decrease")
            kvh = lax.div(h, jnp.array(groups, h.dtype))
            if has_kb:
                kbb = b if st.key_bias_dims[0] else 0
                kbh = h if st.key_bias_dims[1] else 0

            def issue(step_i, slot):
                k0 = step_i * bk
                plgpu.copy_gmem_to_smem(rows(k_ref, b, kvh, k0, bk), k_smem.at[slot],
                                        k_bar.at[slot])
                if has_kb:
                    plgpu.copy_gmem_to_smem(kb_ref.at[kbb, kbh, pl.ds(k0, bk)], kb_smem.at[slot],
                                            kb_bar.at[slot])

            def issue_v(step_i, slot):
                plgpu.copy_gmem_to_smem(rows(v_ref, b, kvh, step_i * bk, bk), v_smem.at[slot],
                                        v_bar.at[slot])

            for s0 in range(stages):
                issue(s0, s0)
                issue_v(s0, s0)

            @pl.loop(0, n_steps - stages)
            def _(i):
                slot = lax.rem(i, jnp.array(stages, i.dtype))
                plgpu.barrier_wait(k_done.at[slot])
                issue(i + stages, slot)
                plgpu.barrier_wait(v_done.at[slot])
                issue_v(i + stages, slot)

            # Observe the last consumption of every slot before leaving.
            for j in range(stages):
                slot = (n_steps - stages + j) % stages
                plgpu.barrier_wait(k_done.at[slot])
                plgpu.barrier_wait(v_done.at[slot])

    smem_t = () if interp else (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    scratch = [
        plgpu.SMEM((2, bq, dp), dtype, transforms=smem_t),
        plgpu.SMEM((stages, bk, dp), dtype, transforms=smem_t),
        plgpu.SMEM((stages, bk, dp), dtype, transforms=smem_t),
        plgpu.SMEM((2, bq), jnp.float32),
    ]
    if has_kb:
        scratch.append(plgpu.SMEM((stages, bk), jnp.float32))
    scratch += [
        plgpu.Barrier(num_barriers=2),
        plgpu.Barrier(num_barriers=stages),
        plgpu.Barrier(num_barriers=stages),
        plgpu.Barrier(num_arrivals=2, num_barriers=stages),
        plgpu.Barrier(num_arrivals=2, num_barriers=stages),
        plgpu.Barrier(num_arrivals=2),
    ]
    if has_kb:
        scratch.append(plgpu.Barrier(num_barriers=stages))

    grid, names = _grid(cfg, batch, heads, q_tiles), _grid(cfg, "b", "h", "q")
    out_type = [jax.ShapeDtypeStruct(q.shape, dtype),
                jax.ShapeDtypeStruct((batch, heads, st.sq_pad), jnp.float32)]
    kw = {}
    if interp:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
        kw["interpret"] = InterpretGPUParams()
    call = plgpu.kernel(
        kernel, out_type=out_type, scratch_types=scratch, grid=grid, grid_names=names,
        num_threads=3, thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True), **kw)
    args = (q, k, v) + ((kb,) if has_kb else ())
    return call(*args)


# ---------------------------------------------------------------------------------------------
# Backward kernels (the default up to d = 128; see the module docstring)
#
# Same CTA shape as the forward: warpgroups 0 and 1 compute, warpgroup 2 streams tiles through
# a ring of shared-memory slots. Base-2 throughout: lse2 = lse * log2(e) (+inf for an empty or
# padded query row, so its p is exactly 0), the key bias is 0/-inf.
#   dQ kernel (grid over query tiles): per key block, S = Q K^T, P = exp2(S*c + kb - lse2),
#     dP = dO V^T, dS = P * (dP - delta), dQ += dS K.
#   dK/dV kernel (grid over key tiles of each k/v head; the group's query heads are streamed
#     one after the other, so GQA sums stay in registers): per query block,
#     S^T = K Q^T, P^T = exp2(S^T*c + kb - lse2), dV += P^T dO, dP^T = V dO^T,
#     dS^T = P^T * (dP^T - delta), dK += dS^T Q.

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


def _mm(interp, a, b_ref, shape, *, transpose_b, acc=None, a_is_ref=True):
    """acc + a @ (b^T if transpose_b else b) in float32; `a` a smem ref or (a_is_ref=False) a
    register value.

    On the GPU a wgmma (b through a transposed view, no copy); in interpret mode a dot_general
    on the same tiles (the interpreter has no register-operand or transposed wgmma).
    """
    if interp:
        a_val = a[...] if a_is_ref else a
        dims = (((1,), (1,)), ((), ())) if transpose_b else (((1,), (0,)), ((), ()))
        out = lax.dot_general(a_val, b_ref[...], dims, preferred_element_type=jnp.float32)
        return out if acc is None else acc + out
    b = plgpu.transpose_ref(b_ref, (1, 0)) if transpose_b else b_ref
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
            plgpu.set_max_registers(232, action="increase")
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
            plgpu.set_max_registers(40, action="decrease")
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


def _dkdv_call(st, q, k, v, do, lse2, delta, kb, sq_pad, skv_pad):
    bq = bk = BWD_BLOCK
    dp, dtype, interp = st.dp, q.dtype, st.interpret
    rows, kw, smem_t = _bwd_common(st)
    bnsd = st.layout == "bnsd"
    batch, kv_heads = k.shape[0], (k.shape[1] if bnsd else k.shape[2])
    n_qt = sq_pad // bq
    g = st.groups
    n_steps = g * n_qt
    stages = max(1, min(st.config.bwd_stages, n_steps))
    has_kb = kb is not None
    c = st.scale * LOG2E
    wgmma_l = None if interp else plgpu.Layout.WGMMA

    def head_and_row(t):  # streamed step -> (query head, first query row)
        t = jnp.asarray(t, jnp.int32)
        return lax.div(t, jnp.int32(n_qt)), lax.rem(t, jnp.int32(n_qt)) * bq

    def kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs):
        if has_kb:
            kb_ref, *refs = refs
        dk_ref, dv_ref, k_smem, v_smem, q_smem, do_smem, lse_smem, delta_smem, *refs = refs
        if has_kb:
            kb_smem, *refs = refs
        kv_in, q_bar, q_done, *refs = refs
        kb_bar = refs[0] if has_kb else None
        kt, kvh, b = lax.axis_index("k"), lax.axis_index("h"), lax.axis_index("b")
        wg = lax.axis_index("wg")

        @pl.when(wg < 2)
        def _compute():
            plgpu.set_max_registers(232, action="increase")
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
                slot = lax.rem(i, jnp.array(stages, i.dtype))
                for j in range(4):
                    plgpu.barrier_wait(q_bar.at[slot * 4 + j])
                if interp:
                    lse2, dlt = lse_smem[slot], delta_smem[slot]
                else:
                    lse2 = plgpu.load(lse_smem.at[slot], (), layout=plgpu.Layout.WGMMA.reduce(0))
                    dlt = plgpu.load(delta_smem.at[slot], (), layout=plgpu.Layout.WGMMA.reduce(0))
                st_ = _mm(interp, k_smem.at[wg], q_smem.at[slot], (bk, bq), transpose_b=True)
                st_ = st_ * c - lax.broadcast_in_dim(lse2, (bk, bq), [1])
                if has_kb:
                    plgpu.barrier_wait(kb_bar.at[slot * 2 + wg])
                    kbias = kb_smem[slot, wg] if interp else plgpu.load(
                        kb_smem.at[slot, wg], (), layout=plgpu.Layout.WGMMA.reduce(1))
                    st_ = st_ + lax.broadcast_in_dim(kbias, (bk, bq), [0])
                pt = jnp.exp2(st_)
                dv = _mm(interp, pt.astype(dtype), do_smem.at[slot], (bk, dp), transpose_b=False,
                         acc=dv, a_is_ref=False)
                dpt = _mm(interp, v_smem.at[wg], do_smem.at[slot], (bk, bq), transpose_b=True)
                dst = pt * (dpt - lax.broadcast_in_dim(dlt, (bk, bq), [1]))
                dk = _mm(interp, dst.astype(dtype), q_smem.at[slot], (bk, dp), transpose_b=False,
                         acc=dk, a_is_ref=False)
                plgpu.barrier_arrive(q_done.at[slot])
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
            plgpu.set_max_registers(40, action="decrease")

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
    scratch += [plgpu.Barrier(num_barriers=4), plgpu.Barrier(num_barriers=4 * stages),
                plgpu.Barrier(num_arrivals=2, num_barriers=stages)]
    if has_kb:
        scratch.append(plgpu.Barrier(num_barriers=2 * stages))
    call = plgpu.kernel(
        kernel, out_type=[jax.ShapeDtypeStruct(kv_shape, dtype)] * 2, scratch_types=scratch,
        grid=_grid(st.config, batch, kv_heads, skv_pad // (2 * bk)),
        grid_names=_grid(st.config, "b", "h", "k"),
        num_threads=3, thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True), **kw)
    return call(q, k, v, do, lse2, delta, *((kb,) if has_kb else ()))


def _mosaic_backward(st, q, k, v, key_bias, kv_lengths, out, lse, do, dlse):
    bnsd = st.layout == "bnsd"
    s_axis = 2 if bnsd else 1
    delta = jnp.einsum("bnsd,bnsd->bns" if bnsd else "bsnd,bsnd->bns",
                       out.astype(jnp.float32), do.astype(jnp.float32)) - dlse.astype(jnp.float32)
    lse2 = jnp.where(jnp.isneginf(lse), jnp.inf, lse * LOG2E)
    t = 2 * BWD_BLOCK
    sq_pad, skv_pad = -(-st.sq // t) * t, -(-st.skv // t) * t
    lse2 = jnp.pad(lse2, ((0, 0), (0, 0), (0, sq_pad - st.sq)), constant_values=jnp.inf)
    delta = _pad_to(delta, 2, sq_pad)
    qp, dop = (_pad_to(_pad_to(x, 3, st.dp), s_axis, sq_pad) for x in (q, do))
    kp, vp = (_pad_to(_pad_to(x, 3, st.dp), s_axis, skv_pad) for x in (k, v))
    kb = None
    if st.key_bias_dims is not None:
        kb = _kernel_key_bias(st, key_bias, kv_lengths, q.shape[0], skv_pad)
    dq = _dq_call(st, qp, kp, vp, dop, lse2, delta, kb, sq_pad, skv_pad)
    dk, dv = _dkdv_call(st, qp, kp, vp, dop, lse2, delta, kb, sq_pad, skv_pad)
    if bnsd:
        return dq[:, :, :st.sq, :st.d], dk[:, :, :st.skv, :st.d], dv[:, :, :st.skv, :st.d]
    return dq[:, :st.sq, :, :st.d], dk[:, :st.skv, :, :st.d], dv[:, :st.skv, :, :st.d]


# ---------------------------------------------------------------------------------------------
# Wrapper: padding, mask folding, slicing


def _pad_to(x, axis, size):
    if x.shape[axis] == size:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths)


def _forward(st: _Static, q, k, v, key_bias, kv_lengths):
    """key_bias: the caller's per-key mask as (b|1, n|1, skv) float32 0/-inf, or None."""
    s_axis = 2 if st.layout == "bnsd" else 1
    qp = _pad_to(_pad_to(q, 3, st.dp), s_axis, st.sq_pad)
    kp = _pad_to(_pad_to(k, 3, st.dp), s_axis, st.skv_pad)
    vp = _pad_to(_pad_to(v, 3, st.dp), s_axis, st.skv_pad)
    kb = None
    if st.key_bias_dims is not None:
        kb = _kernel_key_bias(st, key_bias, kv_lengths, q.shape[0])
    out, lse = _fwd_call(st, qp, kp, vp, kb)
    if st.layout == "bnsd":
        out = out[:, :, :st.sq, :st.d]
    else:
        out = out[:, :st.sq, :, :st.d]
    return out, lse[:, :, :st.sq]


def _kernel_key_bias(st, key_bias, kv_lengths, batch, size=None):
    """One (b|1, n|1, size) 0/-inf vector: caller mask, kv_lengths and the padded tail."""
    size = st.skv_pad if size is None else size
    cols = jnp.arange(size)
    keep = (cols < st.skv)[None, None, :]
    if kv_lengths is not None:
        keep = keep & (cols[None, None, :] < kv_lengths[:, None, None])
    kb = jnp.where(keep, 0.0, -jnp.inf).astype(jnp.float32)
    if key_bias is not None:
        kb = kb + _pad_to(key_bias.astype(jnp.float32), 2, size)
    want = (batch if st.key_bias_dims[0] else 1, kb.shape[1] if st.key_bias_dims[1] else 1, size)
    return jnp.broadcast_to(kb, want)


def _triton_static(st: _Static, dtype):
    cc = _triton._compute_capability(st.interpret)
    return _triton._Static(
        scale=st.scale, causal=False, layout=st.layout, sq=st.sq, skv=st.skv, d=st.d, dv=st.d,
        groups=st.groups, has_kv_lengths=st.has_kv_lengths,
        key_bias_dims=st.orig_key_bias_dims, bias_dims=None,
        config=configs.get_config(st.d, jnp.dtype(dtype).name, cc), interpret=st.interpret)


def _operands(st):
    """The optional operands the wrapped calls get (for the sharding rules): no full bias."""
    return {"key_bias": st.orig_key_bias_dims is not None, "bias": False,
            "len": st.has_kv_lengths}


# The calls as the partitioner sees them: batch/head-sharded inputs run shard by shard
# (kernels/sharding.py); the Triton backward is already wrapped in flash_attention.py. The Mosaic
# GPU interpreter runs ordered IO callbacks, which custom_partitioning cannot lower, so interpret
# mode calls the kernels directly (tests/test_pallas_sharding.py checks these operand roles).
def _unless_interpreting(local, kind):
    wrapped = sharding.partitioned(local, kind, _operands)
    return lambda st, *args: (local if st.interpret else wrapped)(st, *args)


_forward_sharded = _unless_interpreting(_forward, "fwd")
_mosaic_backward_sharded = _unless_interpreting(_mosaic_backward, "bwd")


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _mosaic_flash(st, q, k, v, key_bias, kv_lengths):
    return _forward_sharded(st, q, k, v, key_bias, kv_lengths)


def _mosaic_flash_fwd(st, q, k, v, key_bias, kv_lengths):
    out, lse = _forward_sharded(st, q, k, v, key_bias, kv_lengths)
    return (out, lse), (q, k, v, key_bias, kv_lengths, out, lse)


def _mosaic_flash_bwd(st, res, cotangents):
    q, k, v, key_bias, kv_lengths, out, lse = res
    do, dlse = cotangents
    if st.backward == "mosaic":
        dq, dk, dv = _mosaic_backward_sharded(st, q, k, v, key_bias, kv_lengths, out, lse, do, dlse)
        return dq, dk, dv, None, None
    # The Triton backward kernels, given this forward's out and lse (see the module docstring).
    dq, dk, dv = _triton._backward_sharded(_triton_static(st, q.dtype), q, k, v, key_bias, None,
                                           kv_lengths, out, lse, do, dlse)
    return dq, dk, dv, None, None


_mosaic_flash.defvjp(_mosaic_flash_fwd, _mosaic_flash_bwd)


def mosaic_attention(q, k, v, *, kv_lengths=None, key_mask=None, scale=None, layout="bnsd",
                     return_lse=False, config=None, interpret=False, backward="auto"):
    """Flash attention on Hopper through Mosaic GPU (differentiable in q, k, v and the lse).

    q `(b, n, sq, d)`, k and v `(b, n_kv, skv, d)` (or `(b, s, n, d)` with `layout="bsnd"`),
    bfloat16 or float16, `d <= 256`, `n % n_kv == 0`. `key_mask`: bool (True = attend)
    broadcastable to `(b, 1|n, 1, skv)` (read as a vector per batch/head). `kv_lengths (b,)`:
    keys at or past it are padding. Returns `out` (q's layout and dtype) and, with `return_lse`, the
    float32 natural log-sum-exp `(b, n, sq)` (-inf for a row with no key). `backward`: "mosaic"
    (the Mosaic GPU dQ and dK/dV kernels, head dims up to 128), "triton" (the Triton kernels fed
    with this forward's lse), or "auto" (default: mosaic where it can, else triton).
    """
    if backward not in ("auto", "triton", "mosaic"):
        raise ValueError(f"backward must be 'auto', 'triton' or 'mosaic', got {backward!r}")
    if _IMPORT_ERROR is not None:
        raise RuntimeError(f"Mosaic GPU Pallas is unavailable: {_IMPORT_ERROR}")
    if layout not in ("bnsd", "bsnd"):
        raise ValueError(f"layout must be 'bnsd' or 'bsnd', got {layout!r}")

    def bnsd(shape):
        return tuple(shape) if layout == "bnsd" else (shape[0], shape[2], shape[1], shape[3])

    b, n, sq, d = bnsd(q.shape)
    _, n_kv, skv, _ = bnsd(k.shape)
    why = unsupported(dtype=q.dtype, d=d, dv=v.shape[-1], has_full_bias=False, is_causal=False)
    if why:
        raise ValueError("mosaic_attention cannot serve these inputs: " + "; ".join(why))
    if n % n_kv:
        raise ValueError(f"q heads ({n}) must be a multiple of k/v heads ({n_kv})")
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)

    key_bias = None
    if key_mask is not None:
        km = jnp.asarray(key_mask)
        km = km.reshape((1,) * (4 - km.ndim) + km.shape)
        if km.shape[2] != 1:
            raise ValueError(f"key_mask must be broadcastable to (b, 1|n, 1, skv), got {km.shape}")
        if km.shape[0] not in (1, b) or km.shape[1] not in (1, n) or km.shape[3] not in (1, skv):
            raise ValueError(f"key_mask {km.shape} is not broadcastable to ({b}, {n}, 1, {skv})")
        km = km[:, :, 0, :]
        km = jnp.broadcast_to(km, km.shape[:2] + (skv,))
        key_bias = jnp.where(km, 0.0, -jnp.inf).astype(jnp.float32)
    if kv_lengths is not None:
        kv_lengths = jnp.asarray(kv_lengths, jnp.int32)

    if backward == "auto":  # measured faster than the Triton backward (module docstring)
        backward = "mosaic" if head_dim_padded(d) <= 128 else "triton"
    if backward == "mosaic" and head_dim_padded(d) > 128:
        raise ValueError(f"backward='mosaic' takes head dims up to 128 (dK and dV accumulators "
                         f"of 64x{head_dim_padded(d)} float32 would not fit in registers), got {d}")
    cfg = config or default_config(d)
    skv_pad = -(-skv // cfg.block_kv) * cfg.block_kv
    orig_dims = None if key_bias is None else (key_bias.shape[0] != 1, key_bias.shape[1] != 1)
    if orig_dims is not None or kv_lengths is not None or skv_pad != skv:
        kdims = (bool(orig_dims and orig_dims[0]) or kv_lengths is not None,
                 bool(orig_dims and orig_dims[1]))
    else:
        kdims = None
    log.debug("mosaic_attention %s d=%d sq=%d skv=%d: %s, backward=%s", jnp.dtype(q.dtype).name,
              d, sq, skv, cfg, backward)
    st = _Static(scale=scale, layout=layout, sq=sq, skv=skv, d=d, groups=n // n_kv,
                 key_bias_dims=kdims, orig_key_bias_dims=orig_dims,
                 has_kv_lengths=kv_lengths is not None, config=cfg, interpret=bool(interpret),
                 backward=backward)
    out, lse = _mosaic_flash(st, q, k, v, key_bias, kv_lengths)
    return (out, lse) if return_lse else out
