"""O *= alpha per row, skipped by the threads whose rows' alpha are all 1 (Mosaic GPU kernels).

The online softmax rescales its float32 accumulator O (a warpgroup's `(rows, d)` wgmma
accumulator) by alpha = exp2(m_old - m_new) per row after every key block. Once a row's running
max stops growing, alpha is exactly 1 and the multiply changes nothing, but it still costs one
instruction per element of O: at d = 128 with 128-key blocks as many as the block has logits.
Here each thread tests the alphas of the rows it holds and multiplies only if one differs from
1, behind a per-thread branch. A warp whose threads all skip issues none of the multiplies. The
result is the same bits as the plain multiply (x * 1.0 == x), so nothing downstream changes.

Pallas has no per-thread control flow, so the branch is written in Mosaic GPU's own terms through
`plgpu.inline_mgpu` (an `scf.if` over the thread's registers). Interpret mode multiplies.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax import lax

from .mosaic_config import plgpu


def rescale_rows(acc, alpha, *, skip_ones: bool, interp: bool):
    """acc `(rows, d)` float32 times alpha `(rows,)` broadcast along d. With `skip_ones` on a
    GPU, each thread multiplies only where one of its rows' alpha is not 1 (same result)."""
    if interp or not skip_ones:
        return acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
    return _skipping_rescale(acc, alpha)


def _skipping_rescale(acc, alpha):
    from jax.experimental.mosaic import gpu as mgpu
    from jaxlib.mlir import ir
    from jaxlib.mlir.dialects import arith, scf, vector

    shape = acc.shape

    @plgpu.inline_mgpu(arg_types=(plgpu.Layout.WGMMA, plgpu.Layout.WGMMA.reduce(1)),
                       return_type=plgpu.ShapeDtypeStruct(shape, jnp.float32, plgpu.Layout.WGMMA))
    def rescale(ctx, o, a):
        del ctx
        f32 = ir.F32Type.get()
        one = arith.constant(f32, 1.0)
        differs = None  # this thread's: does any of its rows' alpha differ from 1?
        for reg in a.registers.flat:
            for i in range(ir.VectorType(reg.type).shape[0]):
                x = vector.extract(reg, dynamic_position=[], static_position=[i])
                ne = arith.cmpf(arith.CmpFPredicate.UNE, x, one)  # NaN: multiply too
                differs = ne if differs is None else arith.ori(differs, ne)
        regs = o.registers
        flat = list(regs.flat)
        branch = scf.IfOp(differs, [r.type for r in flat], has_else=True)
        with ir.InsertionPoint(branch.then_block):
            scaled = o * a.broadcast_in_dim(shape, (0,), o.layout)
            scf.yield_(list(scaled.registers.flat))
        with ir.InsertionPoint(branch.else_block):
            scf.yield_(flat)
        out = np.empty(regs.shape, dtype=object)
        out.flat[:] = list(branch.results)
        return mgpu.FragmentedArray(_registers=out, _layout=o.layout, _is_signed=None)

    return rescale(acc, alpha)
