"""The Hopper (sm90) Mosaic GPU forward kernel of the `sage` scheme: INT8 Q K^T, FP8 P V
(or, with `SageConfig.pv_bits=16`, P V in the inputs' 16-bit dtype: the accurate variant).

The arithmetic is `jax_attn.quantization`'s (its docstring states the scheme; `simulate` there
is this kernel in jnp, step for step). The structure is `mosaic_forward.py`'s: one CTA = two
compute warpgroups of `block_q` query rows each and a TMA producer warpgroup streaming K and V
tiles through a ring of `stages` shared-memory slots; the compute warpgroups alternate on the
tensor cores through a shared "schedule" barrier. What differs, and why:

* The grid is persistent (`SageConfig.persistent`, default): one CTA per SM loops over query
  tiles, its producer running on into the next tile's K and V and each compute warpgroup
  loading its next tile's Q into a second buffer, so no SM idles between tiles.

* Operands arrive quantized and padded by the pre-pass in (b, n, s, d) (the pre-pass reads the
  caller's layout and writes that order as it quantizes), except the 16-bit P V's V, which is
  read in the caller's layout (`Quantized.v_bsnd`); the output is written in the caller's layout.
* 8-bit wgmma reads both operands K-major (PTX allows transposed shared-memory operands only for
  16-bit types). Q (rows, d) and K (keys, d) already are, so S = Q K^T is a wgmma with K through
  a `transpose_ref` view, int8 x int8 -> int32 exact. For P V the contraction is over keys, so the
  pre-pass stores FP8 V transposed, (d, keys), and the kernel reads it through `transpose_ref`
  too. The 16-bit P V reads V as the caller's (keys, d) rows, in either layout (TMA's strided
  box for bsnd), so the pre-pass does not touch V unless it must pad it.
* P (float32, in the wgmma accumulator layout) is the FP8 register operand (`p_in_registers`,
  default): 8-bit A fragments need another register layout (`WGMMA_8BIT`), which Mosaic GPU
  cannot convert to, but P V contracts over keys, so the same registers are simply read as the
  8-bit layout (a relabelling of keys within each 16) and the pre-pass stores V^T's keys in that
  order (`_p_to_8bit_layout`). The old path (`p_in_registers=False`) stages P through a
  per-warpgroup shared-memory tile (a store, an async-proxy fence and a warpgroup sync per block).
* `fused_softmax` (default) trims the per-logit instructions: int32 -> float32 by the exponent
  trick (no quarter-rate conversion), the row scale folded into exp2's FMA, P_SCALE into its bias.
* Hopper's FP8 wgmma accumulates with reduced precision; with `two_level_pv` each block's P V is
  a fresh wgmma accumulator, added to the float32 output accumulator in registers (the
  SageAttention2 remedy), at the cost of one more accumulator's registers.
* Scales arrive as vectors: the Q scale of every row (softmax scale and log2(e) folded in), the K
  scale of every key (TMA'd per slot beside K), and the per-channel `v_scale / P_SCALE` applied
  in the epilogue. Masking is `mosaic_forward`'s single float32 0/-inf key-bias vector; segment
  ids (packed sequences) arrive as int32 vectors beside Q (the row's) and beside each K slot
  (the keys'), and a logit whose ids differ is -inf, as a dropped key's.
* With `overlap` each warpgroup also overlaps with itself, as `mosaic_forward`'s
  `MosaicConfig.overlap` (FlashAttention-3/4): it issues S = Q K^T of the next key block and
  O += P V of this one back to back, waits for the first only and runs the next softmax while
  P V is on the tensor cores; the two warpgroups then take turns per step through two `turn`
  barriers instead of the schedule barrier. P is cast to FP8 (and relabelled, or stored to its
  shared-memory tile) only once P V is done, so one P suffices. Every variant above combines
  with it.
* The epilogue writes O from its own shared-memory tile (Q's tile is int8), only the caller's
  head dim of it where that is narrower than dp (`narrow_output`).
* `rowsum_mma` (default with FP8 P V): the row sum l comes from the P V wgmma itself, through
  8 rows below V^T, the first all ones (8 more accumulator columns), instead of one add per
  logit in the softmax. `magic_acc` (default at d <= 64 and with 256-key blocks): S's int32
  accumulator starts at the exponent trick's offset, so the int -> float conversion needs no
  add either.

Over 600 lines on purpose: the configuration, the kernel body (one closure over its shared-memory
layout) and its launch are one kernel, and the variants above are switches inside that body;
split by role like `mosaic_*` it would scatter one closure over three files.

Interpret mode (CPU tests) runs the same body with the matmuls as `lax.dot_general` on the same
shared-memory tiles (the interpreter cannot run wgmma) and skips layouts and smem transforms.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ..quantization import FP8, LN2, LN_P_SCALE, LOG2_P_SCALE, MAGIC_F, MAGIC_I, P_SCALE, key_perm
from .mosaic_config import pl, plgpu
from .mosaic_forward import _Turns  # the bf16 kernel's turn-taking, shared as is

ROWSUM_COLS = 8  # SageConfig.rowsum_mma: rows beside V^T (`_rowsum_tile`; wgmma's N grows in 8s)


@dataclasses.dataclass(frozen=True)
class SageConfig:
    block_q: int = 64  # query rows per compute warpgroup (a CTA has two)
    # Keys per pipeline step; 0 = by head dim and P V's bits (`resolved`): 256 (as the bf16
    # Mosaic kernel: half the barrier passes and O rescales per key; the int32 S tile is then
    # 128 registers, like its f32 one), but 128 with the 16-bit P V at d = 128 (its two 256-key
    # V slots exceed shared memory) and with `overlap`. At d = 128 256 keys became the faster
    # once the row sum left the softmax (H200 round 17, two runs: 4-5% at 16k and 4608
    # tokens; 128 had been level in round 11).
    block_kv: int = 0
    stages: int = 2  # K/V slots in flight
    # Each block's P V in its own wgmma accumulator (see docstring); None = by head dim
    # (`resolved`): on at d = 64, off at d = 128, where its extra accumulator's registers cost
    # more than it gives (H200, 2026-11-30: 0.590 -> 0.523 ms at 1x24x4608x128, relative L1
    # against float64 0.1212 -> 0.1228; at d = 64 on is both faster and closer).
    two_level_pv: bool | None = None
    # P as the wgmma's register operand (keys permuted in the pre-pass's V^T to match the
    # accumulator's register layout, see `_p_to_8bit_layout`); False: the old path through a
    # shared-memory tile (a store, an async-proxy fence and a warpgroup sync per block).
    p_in_registers: bool = True
    # The leaner softmax (`_logits_fused`): int32 -> float32 by the exponent trick instead of a
    # conversion instruction, the row's Q scale folded into exp2's FMA, P_SCALE into its bias.
    # False: the old arithmetic. The simulation follows either (`quantization.simulate`).
    fused_softmax: bool = True
    # Intra-warpgroup overlap (see the docstring): S of the next block and P V of this one in
    # flight together. It holds the int32 S tile and the float32 P beside O, so `block_kv=0`
    # resolves to 128 keys with it at every head dim. Slower every time it was timed: 26-58%
    # against the default at the four timed shapes (H200 round 18).
    overlap: bool = False
    # Bits of the P V product: 8 (FP8, the scheme) or 16 (P and V in the inputs' 16-bit dtype,
    # V unquantized: only Q K^T is 8-bit; more accurate, P V at the bf16 rate). 16 takes P in
    # registers as the accumulator layout gives it (no relabelling) and one accumulator.
    pv_bits: int = 8
    # The plain pipeline's turn-taking (not `overlap`'s): the two compute warpgroups alternate on
    # the tensor cores through the schedule barrier, one's softmax beside the other's matmuls.
    # False: they run free, so both softmaxes can run at once and hide each other's latencies
    # (8-bit matmuls take half the bf16 time, so the softmax, not the tensor cores, sets the
    # pace: H200 profile, benchmarks/results/2026-11-30-h200-round6/). Timed slower: 5-8% at
    # d = 128 (round 7); with a third compute warpgroup, level at best (round 17); 4-22% at the
    # four timed shapes with the row sum on the tensor cores (round 18).
    pingpong: bool = True
    # One K scale per key block (the pre-pass's k_rows = block_kv; `sage_attention` sets it)
    # instead of one per key: the block's scale then multiplies the row's Q scale once per row,
    # and the fused softmax needs neither the per-key multiply nor the exponent trick's
    # subtraction, which fold into exp2's FMA: two instructions per logit fewer, where the
    # profile puts the 8-bit kernel's pace (round-6 README). Costs some accuracy (`sage16`
    # relative L1 0.0095 -> 0.0119 at d = 128 on normal inputs, simulation vs float64,
    # benchmarks/sage_scale_granularity.py). Needs `fused_softmax`. None (the default): on
    # wherever the fused softmax is (`resolved`; `sage_attention` turns it off with the fused
    # softmax for scale <= 0), since the H200 measured it (2026-12-01,
    # benchmarks/results/2026-12-01-h200-round7/): `sage` 6-11% and `sage16` 4-10% faster at
    # 4096-16384 tokens, d = 64 and 128; relative L1 unchanged for `sage`, 0.0078 -> 0.0085 at
    # most for `sage16`.
    k_scale_per_tile: bool | None = None
    # The FP8 V's cast and transpose (the pre-pass, not this kernel) as one Pallas pass
    # (`sage_prepass.quantize_v`, bit for bit the same V^T) instead of XLA's transpose fusion.
    # Inside one call on the H200 (round 11, Nsight Compute) it takes 41 us instead of 331 at
    # 1x24x16384x128, 13 instead of 95 at 4608 tokens, 8 instead of 36 at 2x10x4096x64.
    v_pallas: bool = True
    # The kernel writes the caller's head dim d wherever d < dp is a multiple of 8 (40, 80, ...):
    # O's shared-memory tile is then d wide and unswizzled, and TMA copies (rows, d) boxes, so
    # XLA slices no head dim off the padded output (5.5 us of the 176 of GPU time at
    # 2x8x4096x40, H200 round 18; round 19 timed the call 0.190 against 0.212 ms in one run,
    # within the spread between runs). Other d, or False: dp columns, sliced afterwards.
    narrow_output: bool = True
    # P's row sum on the tensor cores (FP8 P V only): V^T's shared-memory tile gets 8 more rows,
    # the first all ones (a constant tile TMA'd beside each V tile), so the P V wgmma's first
    # extra accumulator column holds the row sum of the FP8 P as the product used it, and the
    # softmax drops its per-logit add (1.2 of the 9.1 instructions per logit that set the
    # kernel's pace, round 11). l then sums P as rounded to e4m3 (numerator and denominator
    # from the same P); `quantization.simulate` mirrors it (`rowsum_p8`). The l columns start
    # from zero every block (see `_pv_acc`). None (the default): on wherever it can be (FP8 P V
    # with the per-tile K scale), since the H200 measured it (round 16, two runs): 6% faster
    # at 16k tokens (1.38x cuDNN), 5-8% at 4608, 12-17% at d = 64, 9-10% at d = 40. The output
    # is as close to float64 as before; the lse is 1.5-5e-3 further (l now sums e4m3-rounded P,
    # in the wgmma's reduced-precision FP8 accumulation, which the simulation does not model).
    rowsum_mma: bool | None = None
    # S's int32 wgmma accumulator starts at the exponent trick's MAGIC_I instead of 0, so the
    # matmul itself leaves MAGIC_I + s and the softmax drops its per-logit integer add (the
    # wgmma always adds its accumulator in, so the zeros were registers set every block too).
    # Needs the fused softmax and the plain pipeline (not `overlap`). None (the default): on
    # where it can be at d <= 64, and at d = 128 with 256-key blocks, as the H200 measured:
    # 5-7% faster for `sage` and 7-8% for `sage16` at d = 64 and 40 (round 16), 2-4% at
    # d = 128, 16k tokens, within 2% at 4608 (round 17, two runs); with 128-key blocks at
    # d = 128 it was 1-3% slower (round 16).
    magic_acc: bool | None = None
    # A persistent grid: one CTA per SM (or `persistent_ctas`), each looping over query tiles
    # (b, h, 2 * block_q rows; query tiles fastest, so the SMs share each head's K and V in L2).
    # The producer runs on into the next tile's K and V while the compute warpgroups finish
    # this one, and each warpgroup TMAs its next tile's Q, row scales and channel scales into a
    # second buffer as soon as it has its current ones, so neither a CTA's start (barrier
    # set-up, the first K, V and Q loads) nor its epilogue leaves the SM idle between tiles
    # (13% of the compute warps' samples at 1x24x4608x128, H200 round 21 profile). The plain
    # pipeline only (not `overlap`). None (the default): on wherever it can be, since the H200
    # measured it (round 21, Nsight Compute, the attention kernel alone): 3206 against 3240 us
    # at 1x24x16384x128, 283 / 291 at 4608 tokens, 157 / 157 at 2x10x4096x64, 121 / 126 at
    # 2x8x4096x40; wall-clock 0.5-0.6% faster at 16k in three processes, within the +-8%
    # spread between processes at the shorter shapes.
    persistent: bool | None = None
    persistent_ctas: int = 0  # CTAs of the persistent grid; 0: the device's SM count

    def resolved(self, dp: int) -> "SageConfig":
        """With `block_kv` (when 0) and `two_level_pv` (when None) chosen for head dim `dp`,
        `k_scale_per_tile` (when None) as `fused_softmax`, `rowsum_mma` (when None) on where
        it can be, `magic_acc` (when None) at d <= 64 or with 256-key blocks, and `persistent`
        (when None) without `overlap`."""
        if self.pv_bits not in (8, 16):
            raise ValueError(f"SageConfig.pv_bits must be 8 or 16, got {self.pv_bits}")
        ktile = self.fused_softmax if self.k_scale_per_tile is None else self.k_scale_per_tile
        if ktile and not self.fused_softmax:
            raise ValueError("SageConfig.k_scale_per_tile folds the K scale into the fused "
                             "softmax's exp2 FMA: it needs fused_softmax=True")
        rowsum = ktile and self.pv_bits == 8 if self.rowsum_mma is None else self.rowsum_mma
        if rowsum and not (ktile and self.pv_bits == 8):
            raise ValueError("SageConfig.rowsum_mma puts ones beside the FP8 V^T and is written "
                             "for the per-tile K scale's softmax: it needs pv_bits=8 and "
                             "k_scale_per_tile")
        narrow = self.overlap or (dp > 64 and self.pv_bits == 16)
        block_kv = self.block_kv or (128 if narrow else 256)
        magic = ((dp <= 64 or block_kv >= 256) and self.fused_softmax and not self.overlap
                 if self.magic_acc is None else self.magic_acc)
        persistent = not self.overlap if self.persistent is None else self.persistent
        if persistent and self.overlap:
            raise ValueError("SageConfig.persistent loops the plain pipeline over tiles: it "
                             "needs overlap=False")
        if magic and (self.overlap or not self.fused_softmax):
            raise ValueError("SageConfig.magic_acc is written for the fused softmax's exponent "
                             "trick in the plain pipeline: it needs fused_softmax=True and "
                             "overlap=False")
        two_level = (dp <= 64 and self.pv_bits == 8) if self.two_level_pv is None \
            else self.two_level_pv
        return dataclasses.replace(
            self, block_kv=block_kv,
            two_level_pv=two_level, k_scale_per_tile=ktile, rowsum_mma=rowsum, magic_acc=magic,
            persistent=persistent)


OLD_CONFIG = SageConfig(block_kv=128, two_level_pv=True, p_in_registers=False,
                        fused_softmax=False, k_scale_per_tile=False,
                        persistent=False)  # the kernel as first measured (2026-11-30)



@dataclasses.dataclass(frozen=True)
class _Fwd:
    bq: int
    bk: int
    dp: int
    n_steps: int
    stages: int
    out_dtype: Any
    out_bnsd: bool  # the output's layout (Q and K arrive bnsd; the 16-bit V as `v_bsnd` says)
    has_kb: bool
    interp: bool
    groups: int
    key_bias_dims: tuple[bool, bool] | None
    two_level: bool
    p_regs: bool
    fused: bool
    overlap: bool
    p_dtype: Any  # what P and V enter the P V wgmma as: FP8, or the 16-bit dtype
    has_seg: bool = False  # segment ids: a key counts for a row only where their ids are equal
    v_bsnd: bool = False  # the 16-bit P V's V in the caller's (b, s, n, d) order
    pingpong: bool = True  # SageConfig.pingpong
    tile_ks: bool = False  # SageConfig.k_scale_per_tile: one K scale per slot, a scalar
    rowsum: bool = False  # SageConfig.rowsum_mma: l in O's 8 extra accumulator columns
    magic: bool = False  # SageConfig.magic_acc: S arrives as MAGIC_I + s
    d_out: int | None = None  # the output's columns where fewer than dp: the caller's d
    # (`SageConfig.narrow_output`); None: dp
    persistent: bool = False  # SageConfig.persistent: the grid is ("sm",), tiles looped over
    tiles: tuple[int, int, int] = (1, 1, 1)  # (batch, heads, query tiles): what the grid covers

    @property
    def q_bufs(self) -> int:  # Q (and its scales) buffers per warpgroup: the next tile's in the 2nd
        return 2 if self.persistent else 1

    @property
    def acc_cols(self) -> int:  # O's accumulator columns: dp, and with `rowsum` l's 8
        return self.dp + ROWSUM_COLS * self.rowsum

    @property
    def p8(self) -> bool:
        return self.p_dtype == FP8

    @property
    def masked(self) -> bool:  # a logit can be -inf, a row can be empty
        return self.has_kb or self.has_seg

    def layout_cast(self, x, layout):
        return x if self.interp else plgpu.layout_cast(x, layout)

    def row_layout(self):
        return None if self.interp else plgpu.Layout.WGMMA.reduce(1)

    def load_vec(self, ref, reduce_axis):
        """A shared-memory vector as a row (reduce_axis=1) or column (0) of the accumulator."""
        if self.interp:
            return ref[...]
        return plgpu.load(ref, (), layout=plgpu.Layout.WGMMA.reduce(reduce_axis))


@dataclasses.dataclass(frozen=True, eq=False)
class _Refs:
    q_ref: Any
    qs_ref: Any
    k_ref: Any
    ks_ref: Any
    vt_ref: Any
    os_ref: Any
    kb_ref: Any
    o_ref: Any
    lse_ref: Any
    q_smem: Any
    qs_smem: Any
    os_smem: Any
    k_smem: Any
    ks_smem: Any
    vt_smem: Any
    p_smem: Any
    o_smem: Any
    lse_smem: Any
    kb_smem: Any
    q_bar: Any
    k_bar: Any
    v_bar: Any
    k_done: Any
    v_done: Any
    sched: Any
    kb_bar: Any
    turn: Any  # overlap only: turn.at[w] lets warpgroup w issue its matmuls
    qid_ref: Any = None  # segment ids (has_seg only): (b, sq_pad) and (b, skv_pad) int32,
    kid_ref: Any = None  # their tiles beside Q's (q_bar) and beside each K slot's (k_bar)
    qid_smem: Any = None
    kid_smem: Any = None
    ones_ref: Any = None  # rowsum only: (8, bk) FP8 ones, TMA'd below V^T in every slot

    def sched_sync(self):
        if self.sched is None:  # no turn-taking (SageConfig.pingpong=False)
            return
        plgpu.barrier_arrive(self.sched)
        plgpu.barrier_wait(self.sched)


def _kernel(fw: _Fwd, r: _Refs):
    wg = lax.axis_index("wg")
    if fw.persistent:  # tile t of this CTA: t * CTAs + its index, query tiles fastest; every
        # CTA has at least one tile (`_grid` launches no more CTAs than tiles)
        sm, n_sm = lax.axis_index("sm"), lax.axis_size("sm")
        batch, heads, n_qt = fw.tiles
        n_local = lax.div(batch * heads * n_qt + n_sm - 1 - sm, n_sm)

        def tile_at(t):
            idx = t * n_sm + sm
            return (lax.div(idx, heads * n_qt), lax.rem(lax.div(idx, n_qt), heads),
                    lax.rem(idx, n_qt))
    else:
        n_local = 1
        coords = (lax.axis_index("b"), lax.axis_index("h"), lax.axis_index("q"))
        tile_at = lambda t: coords  # noqa: E731

    @pl.when(wg < 2)
    def _compute():
        _consumer(fw, r, wg, n_local, tile_at)

    @pl.when(wg == 2)
    def _producer():
        _produce(fw, r, n_local, tile_at)


def _load_q(fw: _Fwd, r: _Refs, wg, coords, buf):
    """Start the copies of warpgroup `wg`'s Q rows of tile `coords`, their row scales and the
    output's channel scales (and the rows' segment ids) into its Q buffer `buf`, all on one
    barrier (Barrier(num_arrivals=3 + has_seg) below waits for all their bytes)."""
    b, h, qt = coords
    bq = fw.bq
    q0 = qt * (2 * bq) + wg * bq
    kvh = lax.div(h, jnp.array(fw.groups, h.dtype))
    qi = wg * fw.q_bufs + buf
    bar = r.q_bar.at[qi]
    plgpu.copy_gmem_to_smem(r.q_ref.at[b, h, pl.ds(q0, bq)], r.q_smem.at[qi], bar)
    plgpu.copy_gmem_to_smem(r.qs_ref.at[b, h, pl.ds(q0, bq)], r.qs_smem.at[qi], bar)
    plgpu.copy_gmem_to_smem(r.os_ref.at[b, kvh], r.os_smem.at[qi], bar)
    if fw.has_seg:
        plgpu.copy_gmem_to_smem(r.qid_ref.at[b, pl.ds(q0, bq)], r.qid_smem.at[qi], bar)


def _consumer(fw: _Fwd, r: _Refs, wg, n_local, tile_at):
    plgpu.set_max_registers(232, action="increase")
    _load_q(fw, r, wg, tile_at(0), 0)
    if not fw.persistent:
        _tile(fw, r, wg, tile_at(0), 0, 0)
        return

    @pl.loop(0, n_local)
    def _(t):
        buf = lax.rem(t, 2)
        # the next tile's Q goes to the other buffer, free since this tile began: the last
        # tile's Q K^T wgmmas were all waited for, its scales read before its epilogue's
        # warpgroup barrier (commit_smem)
        prefetch = lambda: _load_q(fw, r, wg, tile_at(t + 1), 1 - buf)  # noqa: E731
        _tile(fw, r, wg, tile_at(t), buf, t * fw.n_steps,
              lambda: pl.when(t + 1 < n_local)(prefetch))


def _tile(fw: _Fwd, r: _Refs, wg, coords, buf, base, prefetch=None):
    """One query tile of warpgroup `wg`: its Q buffer `buf` (loading), key blocks from the
    ring's global step `base` on, and the epilogue; `prefetch()` starts the next tile's Q
    once this one's has arrived."""
    b, h, qt = coords
    bq = fw.bq
    q0 = qt * (2 * bq) + wg * bq
    qi = wg * fw.q_bufs + buf
    plgpu.barrier_wait(r.q_bar.at[qi])
    if prefetch is not None:
        prefetch()
    qs = fw.load_vec(r.qs_smem.at[qi], 1)
    if fw.has_seg:  # the row's scale and segment id travel together as the row operand
        qs = (qs, fw.load_vec(r.qid_smem.at[qi], 1))

    acc = fw.layout_cast(jnp.zeros((bq, fw.acc_cols), jnp.float32),
                         None if fw.interp else plgpu.Layout.WGMMA)
    m_i = fw.layout_cast(jnp.full((bq,), -jnp.inf, jnp.float32), fw.row_layout())
    l_i = fw.layout_cast(jnp.zeros((bq,), jnp.float32), fw.row_layout())

    if fw.overlap:
        acc, m_i, l_i = _key_loop_overlap(fw, r, wg, qs, acc, m_i, l_i)  # qi = wg (1 buffer)
    else:
        sched_sync = r.sched_sync
        plgpu.barrier_wait(r.k_bar.at[_slot(fw, base)])
        pl.when(wg == 1)(sched_sync)
        step = functools.partial(_step, fw, r, wg, qi, qs, base)
        acc, m_i, l_i = lax.fori_loop(0, fw.n_steps, step, (acc, m_i, l_i))
        pl.when(wg == 0)(sched_sync)
    _epilogue(fw, r, acc, m_i, l_i, b, h, wg, q0, qi)


def _slot(fw: _Fwd, g):
    """The ring slot of global key step `g` (a Python int or an int32)."""
    if isinstance(g, int):
        return g % fw.stages
    return lax.rem(g, jnp.array(fw.stages, g.dtype))


def _step(fw: _Fwd, r: _Refs, wg, qi, qs, base, i, carry):
    """Key block i of the tile, the ring's global step base + i (`_tile`)."""
    acc, m_i, l_i = carry
    g = i if isinstance(base, int) and base == 0 else base + i
    slot = _slot(fw, g)
    s, ks, kbias = _scores(fw, r, wg, qi, slot)
    p, alpha, l_i, m_new = _softmax(fw, s, ks, kbias, qs, m_i, l_i)
    if not fw.two_level:  # the wgmma accumulates onto acc: rescale it first
        acc = _rescale(fw, acc, alpha)
    p8 = _stage_p(fw, r, wg, p)
    if fw.p_regs and not fw.interp:  # as mosaic_forward: softmax done before the schedule barrier
        acc, alpha, l_i, m_new, p8 = lax.optimization_barrier((acc, alpha, l_i, m_new, p8))
    acc = _pv(fw, r, wg, i, slot, acc, alpha, p8, _slot(fw, g + 1))
    return acc, m_new, l_i


def _rescale(fw: _Fwd, acc, alpha):
    return acc * lax.broadcast_in_dim(alpha, acc.shape, [0])


def _softmax(fw: _Fwd, s, ks, kbias, qs, m_i, l_i):
    """The online-softmax step on int32 scores: (P * P_SCALE in float32, alpha, l, m), by
    `_softmax_fused` or the plain arithmetic (`quantization.simulate` mirrors both)."""
    seg = None
    if fw.has_seg:  # ks carries the slot's key ids, qs the row's (see `_key_vectors`, `_consumer`)
        (qs, qid), (ks, kid) = qs, ks
        seg = (lax.broadcast_in_dim(qid, (fw.bq, fw.bk), [0])
               == lax.broadcast_in_dim(kid, (fw.bq, fw.bk), [1]))
    if fw.fused:
        return _softmax_fused(fw, s, ks, kbias, qs, m_i, l_i, seg)  # P_SCALE is in p (exp2's bias)
    bq, bk = fw.bq, fw.bk
    s2 = (s.astype(jnp.float32) * lax.broadcast_in_dim(qs, (bq, bk), [0])) \
        * lax.broadcast_in_dim(ks, (bq, bk), [1])
    if fw.has_kb:
        s2 = s2 + lax.broadcast_in_dim(kbias, (bq, bk), [1])
    if seg is not None:
        s2 = jnp.where(seg, s2, -jnp.inf)
    m_new = jnp.maximum(m_i, s2.max(axis=1))
    m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new) if fw.masked else m_new  # no -inf - -inf
    p = jnp.exp2(s2 - lax.broadcast_in_dim(m_use, (bq, bk), [0]))
    alpha = jnp.exp2(m_i - m_use)
    # l sums P itself; p <= 1, so p * 448 never exceeds e4m3's largest value
    return p * P_SCALE, alpha, l_i * alpha + p.sum(axis=1), m_new


def _stage_p(fw: _Fwd, r: _Refs, wg, p):
    """P * P_SCALE (float32) cast to e4m3 (or the 16-bit dtype) for the P V wgmma: returned
    as its register operand (p_regs), else stored to this warpgroup's shared-memory P tile
    (returns None; `_p_operand` then names the tile)."""
    p8 = p.astype(fw.p_dtype)
    if fw.p_regs:  # 16-bit P is already the A operand's register layout
        return p8 if fw.interp or not fw.p8 else _p_to_8bit_layout(p8)
    r.p_smem.at[wg][...] = p8
    plgpu.commit_smem()  # P visible to the wgmma (async proxy), all four warps done writing
    return None


def _p_operand(fw: _Fwd, r: _Refs, wg, p8):
    """The P V wgmma's A operand: the registers `_stage_p` returned, or the P tile."""
    return p8 if fw.p_regs else r.p_smem.at[wg]


def _softmax_fused(fw: _Fwd, s, ks, kbias, qs, m_i, l_i, seg=None):
    """The online-softmax step on int32 scores, lean: (P * P_SCALE, alpha, l * P_SCALE, m).

    t = s * ks (the exponent trick's exact int -> float, one multiply); the row's Q scale is
    positive, so max(t * qs) = max(t) * qs and it folds into exp2's argument as one FMA per
    logit, t * qs - (m - log2 P_SCALE), whose exp2 is already P * P_SCALE (at most P_SCALE but
    for the FMA's last-bit rounding, which the saturating e4m3 cast clips). l then sums
    P * P_SCALE; the epilogue divides by l / P_SCALE. `quantization.simulate` mirrors this.
    """
    bq, bk = fw.bq, fw.bk
    if fw.tile_ks:
        return _softmax_tile_scale(fw, s, ks, kbias, qs, m_i, l_i, seg)
    sf = lax.bitcast_convert_type(_magic(fw, s), jnp.float32) - MAGIC_F
    t = sf * lax.broadcast_in_dim(ks, (bq, bk), [1])
    if fw.has_kb:
        t = t + lax.broadcast_in_dim(kbias, (bq, bk), [1])
    if seg is not None:  # another query's segment: -inf, as a dropped key
        t = jnp.where(seg, t, -jnp.inf)
    m_new = jnp.maximum(m_i, t.max(axis=1) * qs)
    m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new) if fw.masked else m_new  # no -inf - -inf
    bias = m_use - LOG2_P_SCALE
    p = jnp.exp2(t * lax.broadcast_in_dim(qs, (bq, bk), [0])
                 - lax.broadcast_in_dim(bias, (bq, bk), [0]))
    alpha = jnp.exp2(m_i - m_use)
    return p, alpha, l_i * alpha + p.sum(axis=1), m_new


def _magic(fw: _Fwd, s):
    """MAGIC_I + s (int32), whose bits are the float32 MAGIC_F + s: added here, or already by
    the Q K^T wgmma (`magic_acc`)."""
    return s if fw.magic else s + jnp.int32(MAGIC_I)


def _softmax_tile_scale(fw: _Fwd, s, ks, kbias, qs, m_i, l_i, seg=None):
    """`_softmax_fused` with one K scale for the whole tile (`ks` a scalar): per logit the
    exponent trick's bits u = MAGIC_F + s (an integer add), the row max of u, and one FMA into
    exp2: u * c - (MAGIC_F * c + m - log2 P_SCALE), c = qs * ks per row, whose exact product
    leaves s * c - (m - log2 P_SCALE) but for the rounding of the row's constant (about 1e-5 in
    log2 units at logits of 30). Masked logits are -inf in u. `quantization.simulate` mirrors
    this (its `k_tile_scale`)."""
    bq, bk = fw.bq, fw.bk
    u = lax.bitcast_convert_type(_magic(fw, s), jnp.float32)  # MAGIC_F + s, exactly
    if fw.has_kb:
        u = u + lax.broadcast_in_dim(kbias, (bq, bk), [1])
    if seg is not None:
        u = jnp.where(seg, u, -jnp.inf)
    c = qs * ks  # the row's logit scale for this tile (qs, ks >= 0)
    m_new = jnp.maximum(m_i, (u.max(axis=1) - MAGIC_F) * c)
    m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new) if fw.masked else m_new
    bias = MAGIC_F * c + (m_use - LOG2_P_SCALE)
    p = jnp.exp2(u * lax.broadcast_in_dim(c, (bq, bk), [0])
                 - lax.broadcast_in_dim(bias, (bq, bk), [0]))
    alpha = jnp.exp2(m_i - m_use)
    if fw.rowsum:  # l is summed by the P V wgmma (O's extra columns)
        return p, alpha, l_i, m_new
    return p, alpha, l_i * alpha + p.sum(axis=1), m_new


def _p_to_8bit_layout(p8):
    """P (e4m3, the wgmma accumulator's register layout) as wgmma's 8-bit A register operand,
    with no data movement: only which key each register byte is taken to be changes.

    In the accumulator layout a thread holds, per 16-key chunk c and row, keys 16c + 2j + {0, 1}
    and 16c + 8 + 2j + {0, 1} (j = lane % 4), two 2-byte vectors; the 8-bit A layout wants one
    4-byte vector, keys 16c + 4j + {0..3}. Concatenating the two vectors relabels key
    16c + 8a + 2j + b as 16c + 4j + 2a + b; the pre-pass stores V^T's keys in that same order
    (`quantization.key_perm`), so P V sums the same products. Interpret mode applies the
    permutation to P explicitly instead (`_pv`), which is what the tests check against V^T.
    """
    from jax.experimental.mosaic import gpu as mgpu
    from jax.experimental.mosaic.gpu import fragmented_array as mfa
    from jax.experimental.mosaic.gpu import utils as mutils
    import numpy as np

    shape = p8.shape

    @plgpu.inline_mgpu(arg_types=(plgpu.Layout.WGMMA,),
                       return_type=plgpu.ShapeDtypeStruct(shape, FP8, plgpu.Layout.WGMMA_8BIT))
    def relabel(ctx, x):
        del ctx
        old = x.registers  # (1, keys / 8, 1, 1, 2, 1, 1, 1, 1): axis 1 the 8-key column tiles
        new_shape = mfa.WGMMA_LAYOUT_8BIT.registers_shape(shape)  # axis 1: 16-key chunks
        assert old.shape[1] == 2 * new_shape[1] and old.shape[2:] == tuple(new_shape[2:]), (
            old.shape, new_shape)
        new = np.empty(new_shape, dtype=object)
        for idx in np.ndindex(*new_shape):
            lo = old[(idx[0], 2 * idx[1], *idx[2:])]
            hi = old[(idx[0], 2 * idx[1] + 1, *idx[2:])]
            new[idx] = mutils.vector_concat([lo, hi])
        return mgpu.FragmentedArray(_registers=new, _layout=mfa.WGMMA_LAYOUT_8BIT,
                                    _is_signed=None)

    return relabel(p8)


def _scores(fw: _Fwd, r: _Refs, wg, qi, slot):
    """int32 Q8 K8^T of the K tile in `slot`, that slot's key scales and key bias (or None);
    releases K."""
    # K and its key scales (one barrier, two copies) were waited for before this step: before the
    # loop for the first slot, in `_pv`'s `wait_next_k` (overlapping the P V wgmma) for the rest.
    ks, kbias = _key_vectors(fw, r, slot)
    if fw.interp:
        s = _qk_interp(r, qi, slot)
        s = s + jnp.int32(MAGIC_I) if fw.magic else s
        r.sched_sync()
    elif fw.magic:  # the accumulator starts at MAGIC_I (SageConfig.magic_acc)
        def qk(acc_ref):
            plgpu.wgmma(acc_ref, r.q_smem.at[qi], _k_view(r, slot))
            r.sched_sync()
        start = fw.layout_cast(jnp.full((fw.bq, fw.bk), MAGIC_I, jnp.int32), plgpu.Layout.WGMMA)
        s = pl.run_state(qk)(plgpu.ACC.init(start))
    else:
        def qk(acc_ref):
            plgpu.wgmma(acc_ref, r.q_smem.at[qi], _k_view(r, slot))
            r.sched_sync()
            return acc_ref[...]
        s = pl.run_scoped(qk, plgpu.ACC((fw.bq, fw.bk), jnp.int32))
    plgpu.barrier_arrive(r.k_done.at[slot])
    return s, ks, kbias


def _key_vectors(fw: _Fwd, r: _Refs, slot):
    """The key scales and key bias (None without one) of the K tile in `slot`: TMA'd per slot
    beside K, so read before the slot is released with K. With `tile_ks` the scale is the
    slot's one value (every key of the tile holds it), a scalar."""
    ks = r.ks_smem.at[slot][0] if fw.tile_ks else fw.load_vec(r.ks_smem.at[slot], 0)
    if fw.has_seg:  # the slot's key ids (TMA'd on K's barrier) travel with its scales
        ks = (ks, fw.load_vec(r.kid_smem.at[slot], 0))
    kbias = None
    if fw.has_kb:
        plgpu.barrier_wait(r.kb_bar.at[slot])
        kbias = fw.load_vec(r.kb_smem.at[slot], 0)
    return ks, kbias


def _k_view(r: _Refs, slot):
    return plgpu.transpose_ref(r.k_smem.at[slot], (1, 0))


def _v_view(fw: _Fwd, r: _Refs, slot):
    """V of `slot` as the P V wgmma's (keys, d) operand: FP8 V^T through a transposed view
    (K-major), 16-bit V as it is (16-bit wgmma reads an MN-major operand)."""
    if fw.p8:
        return plgpu.transpose_ref(r.vt_smem.at[slot], (1, 0))
    return r.vt_smem.at[slot]


def _qk_interp(r: _Refs, qi, slot):
    """Interpret mode's S = Q8 K8^T (int32, exact) on the same shared-memory tiles."""
    return lax.dot_general(r.q_smem.at[qi][...].astype(jnp.int32),
                           r.k_smem[slot].astype(jnp.int32), (((1,), (1,)), ((), ())),
                           preferred_element_type=jnp.int32)


def _pv_interp(fw: _Fwd, r: _Refs, slot, a_op):
    """Interpret mode's P V (float32) of the V^T tile in `slot`, `a_op` as `_p_operand`."""
    if fw.p_regs and fw.p8:  # what the register relabelling means: P's keys in V^T's order
        p = key_perm(a_op.astype(jnp.float32), 1)
    elif fw.p_regs:
        p = a_op.astype(jnp.float32)
    else:
        p = a_op[...].astype(jnp.float32)
    v = r.vt_smem[slot].astype(jnp.float32)  # FP8: V^T (d, keys); 16 bits: V (keys, d)
    return lax.dot_general(p, v, (((1,), (1 if fw.p8 else 0,)), ((), ())),
                           preferred_element_type=jnp.float32, precision=lax.Precision.HIGHEST)


def _pv(fw: _Fwd, r: _Refs, wg, i, slot, acc, alpha, p8, nxt_slot):
    """O += P8 V8 (float32 accumulation); releases V. P is what `_stage_p` returned. With
    two_level, acc is rescaled by alpha here, while the block's wgmma runs (else the caller
    rescaled it before)."""
    bq = fw.bq
    a_op = _p_operand(fw, r, wg, p8)
    if r.sched is not None:
        plgpu.barrier_arrive(r.sched)  # softmax done
    plgpu.barrier_wait(r.v_bar.at[slot])
    if r.sched is not None:
        plgpu.barrier_wait(r.sched)  # the other warpgroup's matmul is issued
    nxt = i + 1

    def wait_next_k():
        @pl.when(nxt < fw.n_steps)
        def _():
            plgpu.barrier_wait(r.k_bar.at[nxt_slot])

    if fw.interp:
        pv = _pv_interp(fw, r, slot, a_op)
        acc = _rescale(fw, acc, alpha) + pv if fw.two_level else acc + pv
        wait_next_k()
    else:
        v_view = _v_view(fw, r, slot)
        if fw.two_level:
            def pv_block(acc_ref):
                plgpu.wgmma(acc_ref, a_op, v_view)
                scaled = _rescale(fw, acc, alpha)  # overlaps the wgmma
                wait_next_k()  # overlaps the wgmma
                return scaled, acc_ref[...]
            scaled, pv = pl.run_scoped(pv_block, plgpu.ACC((bq, fw.acc_cols), jnp.float32))
            acc = scaled + pv
        else:
            def pv(acc_ref):
                plgpu.wgmma(acc_ref, a_op, v_view)
                wait_next_k()
            acc = _pv_sum(fw, acc, pl.run_state(pv)(_pv_acc(fw, acc)))
    plgpu.barrier_arrive(r.v_done.at[slot])
    return acc


# ---------------------------------------------------------------------------------------------
# The key loop with intra-warpgroup overlap (SageConfig.overlap), `mosaic_forward`'s protocol:
# per key block j a warpgroup issues S(j+1) = Q K(j+1)^T and then O += P(j) V(j) as two wgmma
# groups, waits for the first only, and computes block j+1's softmax while P(j) V(j) runs; then
# it waits for that, releases V(j) and rescales O. The two warpgroups take turns to issue
# (turn.at[w] opens warpgroup w's turn; each passes it on once its matmuls are issued). Block 0's
# S comes first (prologue), the last block's P V last (epilogue), each one turn. Warpgroup 1 opens
# warpgroup 0's first turn; warpgroup 0 observes warpgroup 1's last pass at the end, so every
# phase is observed.


def _key_loop_overlap(fw: _Fwd, r: _Refs, wg, qs, acc, m_i, l_i):
    """All key blocks, overlapped: (acc, m, l) as the plain loop leaves them."""
    turn = _Turns(r.turn, wg)
    pl.when(wg == 1)(turn.open_first)

    plgpu.barrier_wait(r.k_bar.at[0])
    ks, kbias = _key_vectors(fw, r, 0)
    turn.take()
    if fw.interp:
        s = _qk_interp(r, wg, 0)
        turn.pass_on()
    else:
        def qk(s_ref):
            plgpu.wgmma(s_ref, r.q_smem.at[wg], _k_view(r, 0))
            turn.pass_on()
            return plgpu.wgmma_accumulator_load(s_ref)
        s = pl.run_scoped(qk, plgpu.ACC((fw.bq, fw.bk), jnp.int32))
    plgpu.barrier_arrive(r.k_done.at[0])
    p, _, l_i, m_i = _softmax(fw, s, ks, kbias, qs, m_i, l_i)  # acc is zero: nothing to rescale
    p8 = _stage_p(fw, r, wg, p)

    step = functools.partial(_step_overlap, fw, r, wg, qs, turn)
    acc, m_i, l_i, p8 = lax.fori_loop(0, fw.n_steps - 1, step, (acc, m_i, l_i, p8))

    slot = (fw.n_steps - 1) % fw.stages
    plgpu.barrier_wait(r.v_bar.at[slot])
    a_op = _p_operand(fw, r, wg, p8)
    turn.take()
    if fw.interp:
        acc = acc + _pv_interp(fw, r, slot, a_op)
        turn.pass_on()
    else:
        def pv(o_ref):
            plgpu.wgmma(o_ref, a_op, _v_view(fw, r, slot))
            turn.pass_on()
        acc = _pv_sum(fw, acc, pl.run_state(pv)(_pv_acc(fw, acc)))
    plgpu.barrier_arrive(r.v_done.at[slot])
    pl.when(wg == 0)(turn.take)  # warpgroup 1's last pass
    return acc, m_i, l_i


def _pv_acc(fw: _Fwd, acc):
    """What the P V wgmma accumulates onto: O itself, or with two_level a fresh (zero)
    accumulator that `_pv_sum` adds to O in float32 registers. With `rowsum` and one level,
    O but for fresh l columns: Hopper's FP8 wgmma adds to its accumulator at reduced precision,
    aligned to the largest addend, so a running l (one sign, growing with every block) would
    lose the small probabilities (H200 round 16: l 34% off at 16k keys); O's columns, of both
    signs, keep accumulating in the wgmma as before."""
    if fw.two_level:
        acc = _zeros_acc(fw, fw.acc_cols)
    elif fw.rowsum:
        acc = jnp.concatenate([acc[:, :fw.dp], _zeros_acc(fw, ROWSUM_COLS)], axis=1)
    return plgpu.ACC.init(acc)


def _pv_sum(fw: _Fwd, acc, out):
    """O after the block's P V: `out` is what the wgmma left in `_pv_acc`'s accumulator."""
    if fw.two_level:
        return acc + out
    if fw.rowsum:  # O as the wgmma left it; l in float32 registers
        return jnp.concatenate([out[:, :fw.dp], acc[:, fw.dp:] + out[:, fw.dp:]], axis=1)
    return out


def _zeros_acc(fw: _Fwd, cols: int):
    return fw.layout_cast(jnp.zeros((fw.bq, cols), jnp.float32), plgpu.Layout.WGMMA)


def _step_overlap(fw: _Fwd, r: _Refs, wg, qs, turn, j, carry):
    """Block j's P V and block j+1's S = Q K^T issued together; block j+1's softmax while P V
    runs. Carry: (O over blocks < j, relative to m; m and l over blocks <= j; P of block j as
    `_stage_p` left it)."""
    acc, m_i, l_i, p8 = carry
    stages = jnp.array(fw.stages, j.dtype)
    slot, nslot = lax.rem(j, stages), lax.rem(j + 1, stages)
    plgpu.barrier_wait(r.k_bar.at[nslot])
    ks, kbias = _key_vectors(fw, r, nslot)  # before K's slot is released below
    plgpu.barrier_wait(r.v_bar.at[slot])
    a_op = _p_operand(fw, r, wg, p8)
    turn.take()
    if fw.interp:
        s = _qk_interp(r, wg, nslot)
        acc = acc + _pv_interp(fw, r, slot, a_op)
        turn.pass_on()
        plgpu.barrier_arrive(r.k_done.at[nslot])
        p, alpha, l_i, m_i = _softmax(fw, s, ks, kbias, qs, m_i, l_i)
    else:
        def body(refs):
            o_ref, p_ref, m_ref, l_ref, alpha_ref = refs

            def issue(s_ref):
                plgpu.wgmma(s_ref, r.q_smem.at[wg], _k_view(r, nslot))
                plgpu.wgmma(o_ref, a_op, _v_view(fw, r, slot))
                turn.pass_on()
                return plgpu.wgmma_accumulator_load(s_ref, wait_n=1)  # S only; P V runs on
            s = pl.run_scoped(issue, plgpu.ACC((fw.bq, fw.bk), jnp.int32))
            plgpu.barrier_arrive(r.k_done.at[nslot])
            p_ref[...], alpha_ref[...], l_ref[...], m_ref[...] = _softmax(
                fw, s, ks, kbias, qs, m_i, l_i)
        # run_state waits for P V on leaving; the softmax's results leave through plain refs,
        # P in float32: it becomes FP8 (registers or the P tile) only once P V has read the old.
        p_init = fw.layout_cast(jnp.zeros((fw.bq, fw.bk), jnp.float32), plgpu.Layout.WGMMA)
        out, p, m_i, l_i, alpha = pl.run_state(body)(
            (_pv_acc(fw, acc), p_init, m_i, l_i, m_i))
        acc = _pv_sum(fw, acc, out)
    plgpu.barrier_arrive(r.v_done.at[slot])
    return _rescale(fw, acc, alpha), m_i, l_i, _stage_p(fw, r, wg, p)


def _rowsum_tile(bk: int):
    """The (8, bk) FP8 rows below V^T in every slot: ones in the first row, zeros below, so the
    first extra accumulator column is l and the other seven stay 0 (wgmma's N grows in 8s). A
    host constant that is not all one value: XLA turns a splat constant (all ones) back into a
    broadcast kernel launched on every call (2 us on the H200, round 18)."""
    tile = np.zeros((ROWSUM_COLS, bk), FP8)
    tile[0] = 1.0
    return tile


def _epilogue(fw: _Fwd, r: _Refs, acc, m_i, l_i, b, h, wg, q0, qi):
    bq, dp = fw.bq, fw.dp
    if fw.rowsum:  # the first of the 8 extra columns holds l, the others 0 (`_rowsum_tile`)
        l_i = acc[:, dp:].sum(axis=1)
        acc = acc[:, :dp]
    if fw.masked:
        empty = l_i == 0.0
        l_safe = jnp.where(empty, 1.0, l_i)
    else:
        l_safe = l_i
    inv = (P_SCALE if fw.fused else 1.0) / l_safe  # fused: l sums P * P_SCALE
    osc = fw.load_vec(r.os_smem.at[qi], 0)
    o = (acc * lax.broadcast_in_dim(inv, (bq, dp), [0])) * lax.broadcast_in_dim(osc, (bq, dp), [1])
    if fw.d_out is not None:  # the caller's head dim only (whole 8-column tiles of the layout)
        o = o[:, :fw.d_out]
    r.o_smem.at[wg][...] = o.astype(fw.out_dtype)
    lse = m_i * LN2 + jnp.log(l_safe)
    if fw.fused:
        lse = lse - LN_P_SCALE
    if fw.masked:
        lse = jnp.where(empty, -jnp.inf, lse)
    r.lse_smem.at[wg][...] = lse
    plgpu.commit_smem()
    out_rows = (r.o_ref.at[b, h, pl.ds(q0, bq)] if fw.out_bnsd
                else r.o_ref.at[b, pl.ds(q0, bq), h])
    plgpu.copy_smem_to_gmem(r.o_smem.at[wg], out_rows)
    plgpu.copy_smem_to_gmem(r.lse_smem.at[wg], r.lse_ref.at[b, h, pl.ds(q0, bq)])
    plgpu.wait_smem_to_gmem(0)


def _produce(fw: _Fwd, r: _Refs, n_local, tile_at):
    """The TMA warpgroup: K and V of every key block of every tile of this CTA through the ring,
    global step g = tile * n_steps + block in slot g % stages, each slot refilled once both
    compute warpgroups have released it."""
    bk, stages, n_steps, has_kb = fw.bk, fw.stages, fw.n_steps, fw.has_kb
    plgpu.set_max_registers(40, action="decrease")

    def where(g):  # (b, kv head, h, key block) of global step g
        if fw.persistent:
            b, h, _ = tile_at(lax.div(g, n_steps))
            step_i = lax.rem(g, n_steps)
        else:
            (b, h, _), step_i = tile_at(0), g
        return b, lax.div(h, jnp.array(fw.groups, h.dtype)), h, step_i

    def issue_k(g, slot):
        b, kvh, h, step_i = where(g)
        k0 = step_i * bk
        plgpu.copy_gmem_to_smem(r.k_ref.at[b, kvh, pl.ds(k0, bk)], r.k_smem.at[slot],
                                r.k_bar.at[slot])
        plgpu.copy_gmem_to_smem(r.ks_ref.at[b, kvh, pl.ds(k0, bk)], r.ks_smem.at[slot],
                                r.k_bar.at[slot])
        if fw.has_seg:
            plgpu.copy_gmem_to_smem(r.kid_ref.at[b, pl.ds(k0, bk)], r.kid_smem.at[slot],
                                    r.k_bar.at[slot])
        if has_kb:
            kbb = b if fw.key_bias_dims[0] else 0
            kbh = h if fw.key_bias_dims[1] else 0
            plgpu.copy_gmem_to_smem(r.kb_ref.at[kbb, kbh, pl.ds(k0, bk)], r.kb_smem.at[slot],
                                    r.kb_bar.at[slot])

    def issue_v(g, slot):
        b, kvh, _, step_i = where(g)
        keys = pl.ds(step_i * bk, bk)
        if fw.p8:
            src = r.vt_ref.at[b, kvh, :, keys]
        else:  # 16-bit V, (keys, d) rows in bnsd or (TMA's strided box) bsnd
            src = r.vt_ref.at[b, keys, kvh] if fw.v_bsnd else r.vt_ref.at[b, kvh, keys]
        if fw.rowsum:  # V^T in the slot's first dp rows, `_rowsum_tile` in the last 8
            plgpu.copy_gmem_to_smem(src, r.vt_smem.at[slot, pl.ds(0, fw.dp)], r.v_bar.at[slot])
            plgpu.copy_gmem_to_smem(r.ones_ref, r.vt_smem.at[slot, pl.ds(fw.dp, ROWSUM_COLS)],
                                    r.v_bar.at[slot])
        else:
            plgpu.copy_gmem_to_smem(src, r.vt_smem.at[slot], r.v_bar.at[slot])

    for s0 in range(stages):  # stages <= n_steps, and every CTA has a tile: every slot fills
        issue_k(s0, s0)
        issue_v(s0, s0)

    @pl.loop(stages, n_local * n_steps)
    def _(g):
        slot = _slot(fw, g)
        plgpu.barrier_wait(r.k_done.at[slot])
        issue_k(g, slot)
        plgpu.barrier_wait(r.v_done.at[slot])
        issue_v(g, slot)

    for slot in range(stages):  # observe the last consumption of every slot before leaving
        plgpu.barrier_wait(r.k_done.at[slot])
        plgpu.barrier_wait(r.v_done.at[slot])


def _swizzled(cols: int, interp: bool, itemsize: int = 1):
    """Tiling and swizzle of a shared-memory tile whose rows hold `cols` elements."""
    if interp:
        return ()
    swizzle = min(128, cols * itemsize)
    return (plgpu.TilingTransform((8, swizzle // itemsize)), plgpu.SwizzleTransform(swizzle))


def _grid(cfg: SageConfig, fw: _Fwd, interp: bool) -> dict:
    """`plgpu.kernel`'s grid: one CTA per query tile, or (persistent) `persistent_ctas` CTAs,
    by default one per SM of the device (interpret mode: 3, so tests loop over several tiles)."""
    if not fw.persistent:
        return dict(grid=fw.tiles, grid_names=("b", "h", "q"))
    ctas = cfg.persistent_ctas or (3 if interp else _sm_count())
    n_tiles = int(np.prod(fw.tiles))
    return dict(grid=(min(ctas or n_tiles, n_tiles),), grid_names=("sm",))


def _sm_count() -> int | None:
    """The GPU's SM count (132 on an H200), or None where the device does not say (the grid
    then has one CTA per tile, each looping once)."""
    return getattr(jax.devices()[0], "core_count", None)


def sage_call(cfg: SageConfig, qz, kb, *, out_dtype, out_layout: str, groups: int,
              key_bias_dims, interpret: bool, segments=None, d: int | None = None):
    """Run the kernel on a `quantization.Quantized` (padded); kb: (b|1, n|1, skv_pad) f32 0/-inf
    or None. With `cfg.k_scale_per_tile` the kernel reads each tile's first K scale for all its
    keys: qz must hold one scale per `block_kv` keys (`sage_attention` quantizes so). Returns out
    `(b, n, sq_pad, dp)` (or bsnd) in `out_dtype`, with `d` (the caller's head dim) and
    `cfg.narrow_output` d columns instead where d < dp is a multiple of 8, and lse
    `(b, n, sq_pad)` (without the smoothing shift). `segments`: None, or int32
    `(q_ids (b, sq_pad), kv_ids (b, skv_pad))` (padding ids that match no real one)."""
    batch, heads, sq_pad, dp = qz.q8.shape
    cfg = cfg.resolved(dp)
    d_out = d if d is not None and cfg.narrow_output and d < dp and d % 8 == 0 else None
    bq, bk = cfg.block_q, cfg.block_kv
    skv_pad = qz.k8.shape[2]
    n_steps = skv_pad // bk
    stages = max(1, min(cfg.stages, n_steps))
    has_kb = kb is not None
    interp = bool(interpret)
    fw = _Fwd(bq=bq, bk=bk, dp=dp, n_steps=n_steps, stages=stages, out_dtype=jnp.dtype(out_dtype),
              out_bnsd=out_layout == "bnsd", has_kb=has_kb, interp=interp, groups=groups,
              key_bias_dims=key_bias_dims, two_level=cfg.two_level_pv,
              p_regs=cfg.p_in_registers, fused=cfg.fused_softmax, overlap=cfg.overlap,
              p_dtype=qz.vt8.dtype, has_seg=segments is not None, v_bsnd=qz.v_bsnd,
              pingpong=cfg.pingpong, tile_ks=cfg.k_scale_per_tile, rowsum=cfg.rowsum_mma,
              magic=cfg.magic_acc, d_out=d_out, persistent=cfg.persistent,
              tiles=(batch, heads, sq_pad // (2 * bq)))
    out_cols = d_out or dp
    nq = 2 * fw.q_bufs  # Q-side buffers: per warpgroup, this tile's (and the next's)
    if (qz.vt8.dtype == FP8) != (cfg.pv_bits == 8):
        raise ValueError(f"SageConfig.pv_bits={cfg.pv_bits} but the pre-pass stored V as "
                         f"{qz.vt8.dtype}")

    def kernel(q_ref, qs_ref, k_ref, ks_ref, vt_ref, os_ref, *refs):
        refs = list(refs)
        kb_ref = refs.pop(0) if has_kb else None
        qid_ref, kid_ref = (refs.pop(0), refs.pop(0)) if fw.has_seg else (None, None)
        ones_ref = refs.pop(0) if fw.rowsum else None
        o_ref, lse_ref = refs[:2]
        q_smem, qs_smem, os_smem, k_smem, ks_smem, vt_smem = refs[2:8]
        rest = refs[8:]
        p_smem = None if fw.p_regs else rest.pop(0)
        o_smem, lse_smem = rest[:2]
        rest = rest[2:]
        kb_smem = rest.pop(0) if has_kb else None
        q_bar, k_bar, v_bar, k_done, v_done, sched = rest[:6]
        rest = rest[6:]
        kb_bar = rest.pop(0) if has_kb else None
        turn = rest.pop(0) if fw.overlap else None
        qid_smem, kid_smem = (rest.pop(0), rest.pop(0)) if fw.has_seg else (None, None)
        _kernel(fw, _Refs(
            q_ref=q_ref, qs_ref=qs_ref, k_ref=k_ref, ks_ref=ks_ref, vt_ref=vt_ref, os_ref=os_ref,
            kb_ref=kb_ref, o_ref=o_ref, lse_ref=lse_ref, q_smem=q_smem, qs_smem=qs_smem,
            os_smem=os_smem, k_smem=k_smem, ks_smem=ks_smem, vt_smem=vt_smem, p_smem=p_smem,
            o_smem=o_smem, lse_smem=lse_smem, kb_smem=kb_smem, q_bar=q_bar, k_bar=k_bar,
            v_bar=v_bar, k_done=k_done, v_done=v_done, kb_bar=kb_bar,
            sched=sched if fw.pingpong else None,  # None: no turn-taking
            turn=turn, qid_ref=qid_ref, kid_ref=kid_ref, qid_smem=qid_smem, kid_smem=kid_smem,
            ones_ref=ones_ref))

    d8 = _swizzled(dp, interp)  # Q and K tiles: rows of dp int8
    pv_t = _swizzled(bk, interp, fw.p_dtype.itemsize)  # P, V^T tiles: rows of bk (P V's contraction)
    # V's tiles: FP8 V^T (dp, bk; with the row sum's ones, dp + 8), or 16-bit V (bk, dp)
    v_tile, v_t = (((fw.acc_cols, bk), pv_t) if fw.p8
                   else ((bk, dp), _swizzled(dp, interp, 2)))
    # O's tile: swizzled rows of dp, or (narrow output) plain rows of d, TMA'd as (rows, d) boxes
    o_t = (() if interp or d_out is not None
           else (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128)))
    scratch = [
        plgpu.SMEM((nq, bq, dp), jnp.int8, transforms=d8),
        plgpu.SMEM((nq, bq), jnp.float32),
        plgpu.SMEM((nq, dp), jnp.float32),
        plgpu.SMEM((stages, bk, dp), jnp.int8, transforms=d8),
        plgpu.SMEM((stages, bk), jnp.float32),
        plgpu.SMEM((stages, *v_tile), fw.p_dtype, transforms=v_t),
    ]
    if not fw.p_regs:
        scratch.append(plgpu.SMEM((2, bq, bk), fw.p_dtype, transforms=pv_t))
    scratch += [
        plgpu.SMEM((2, bq, out_cols), out_dtype, transforms=o_t),
        plgpu.SMEM((2, bq), jnp.float32),
    ]
    if has_kb:
        scratch.append(plgpu.SMEM((stages, bk), jnp.float32))
    scratch += [
        # Q, its row scales, the channel scales (and the row's segment ids)
        plgpu.Barrier(num_arrivals=3 + fw.has_seg, num_barriers=nq),
        # K and its key scales (and the keys' segment ids)
        plgpu.Barrier(num_arrivals=2 + fw.has_seg, num_barriers=stages),
        plgpu.Barrier(num_arrivals=1 + fw.rowsum, num_barriers=stages),  # V^T (and the ones)
        plgpu.Barrier(num_arrivals=2, num_barriers=stages),  # K consumed
        plgpu.Barrier(num_arrivals=2, num_barriers=stages),  # V consumed
        plgpu.Barrier(num_arrivals=2),  # the two warpgroups' schedule barrier
    ]
    if has_kb:
        scratch.append(plgpu.Barrier(num_barriers=stages))
    if fw.overlap:
        scratch.append(plgpu.Barrier(num_barriers=2))  # turn.at[w]: warpgroup w may issue
    if fw.has_seg:
        scratch += [plgpu.SMEM((nq, bq), jnp.int32), plgpu.SMEM((stages, bk), jnp.int32)]

    out_shape = ((batch, heads, sq_pad, out_cols) if fw.out_bnsd
                 else (batch, sq_pad, heads, out_cols))
    out_type = [jax.ShapeDtypeStruct(out_shape, out_dtype),
                jax.ShapeDtypeStruct((batch, heads, sq_pad), jnp.float32)]
    kw = {}
    if interp:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
        kw["interpret"] = InterpretGPUParams()
    call = plgpu.kernel(
        kernel, out_type=out_type, scratch_types=scratch, num_threads=3, thread_name="wg",
        **_grid(cfg, fw, interp),
        compiler_params=plgpu.CompilerParams(approx_math=True), **kw)
    args = (qz.q8, qz.q_scale, qz.k8, qz.k_scale, qz.vt8, qz.out_scale) + ((kb,) if has_kb else ())
    args += tuple(segments) if fw.has_seg else ()
    args += (_rowsum_tile(bk),) if fw.rowsum else ()
    return call(*args)
