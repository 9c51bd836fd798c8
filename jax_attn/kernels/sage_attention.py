"""`sage_attention`: the 8-bit (INT8 Q K^T; FP8 P V, or 16-bit with `SageConfig(pv_bits=16)`)
Hopper attention forward, for inference.

The entry point around `sage_forward.py`'s kernel: it validates the call, runs the quantization
pre-pass (`sage_prepass.quantize`: Q and K to INT8 in one Pallas pass each, the K mean and V's
FP8 cast and transpose in jnp; `jax_attn.quantization.quantize`, all jnp, for per-block scales;
counted in every timing since it runs inside this call),
folds per-key masks, `kv_lengths` and the padded key tail into one 0/-inf key-bias vector, runs
the kernel, slices the padding off and adds the smoothing shift back to the lse.

Lossy and forward-only: there is no backward kernel. Differentiating it raises (the custom VJP's
backward names backend='sage'), so no gradient is ever silently zero or wrong.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from .. import quantization
from . import sage_prepass
from .mosaic_config import available
from .sage_forward import SageConfig, sage_call


def sim_flags(cfg: SageConfig) -> dict:
    """`quantization.sage_reference` / `simulate` keyword arguments that mirror `cfg`'s kernel
    (`cfg` as `sage_attention` takes it, for scale > 0)."""
    cfg = cfg.resolved(64)  # the flags below do not depend on the head dim
    pv16 = cfg.pv_bits == 16
    return dict(fused_softmax=cfg.fused_softmax, v_key_perm=cfg.p_in_registers and not pv16,
                pv16=pv16, k_tile_scale=cfg.k_scale_per_tile, rowsum_p8=cfg.rowsum_mma)

HEAD_DIMS = (64, 128)  # what the kernel runs at; smaller head dims are zero-padded up


def head_dim_padded(d: int) -> int | None:
    for dp in HEAD_DIMS:
        if d <= dp:
            return dp
    return None


def unsupported(*, dtype, d, dv) -> list[str]:
    """Why the kernel cannot serve these inputs (empty when it can)."""
    why = []
    if available() is not None:
        why.append(f"Mosaic GPU Pallas is not importable ({available()})")
    if jnp.dtype(dtype).name not in ("bfloat16", "float16"):
        why.append(f"dtype {jnp.dtype(dtype).name} (sage takes bfloat16/float16)")
    if head_dim_padded(d) is None:
        why.append(f"head dim {d} > {HEAD_DIMS[-1]}")
    if dv != d:
        why.append(f"dv ({dv}) != d ({d})")
    return why


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _no_grad(name, run, q, k, v, kb, segments):
    return run(q, k, v, kb, segments)


def _no_grad_fwd(name, run, q, k, v, kb, segments):
    return run(q, k, v, kb, segments), None


def _no_grad_bwd(name, run, res, g):
    raise ValueError(f"backend={name!r} is forward-only (8-bit inference attention, no backward "
                     "kernel) and this call is differentiated; use another backend for training "
                     "or wrap the inputs in jax.lax.stop_gradient")


_no_grad.defvjp(_no_grad_fwd, _no_grad_bwd)


def sage_attention(q, k, v, *, kv_lengths=None, key_mask=None, scale=None, layout="bnsd",
                   return_lse=False, config: SageConfig | None = None, q_rows: int = 1,
                   k_rows: int = 1, interpret: bool = False, q_segment_ids=None,
                   kv_segment_ids=None):
    """8-bit attention on Hopper: out in q's dtype and layout, and with `return_lse` the float32
    natural-log lse `(b, n, sq)` (-inf for a row with no key).

    q `(b, n, sq, d)`, k, v `(b, n_kv, skv, d)` (or `bsnd`), bf16/fp16, d <= 128, `n % n_kv == 0`.
    `key_mask`: bool broadcastable to `(b, 1|n, 1, skv)`, True = attend. `kv_lengths (b,)`.
    `q_segment_ids (b, sq)`, `kv_segment_ids (b, skv)` (int32; both or neither): packed
    sequences, a key counts for a query only where their ids are equal.
    `q_rows`, `k_rows`: rows per INT8 scale (1 = per token; see `jax_attn.quantization`); they
    must divide the kernel's blocks. With `SageConfig.k_scale_per_tile` (the default where the
    fused softmax runs) K's scale is per key block whatever `k_rows` says (1 or the block).
    """
    if available() is not None:
        raise RuntimeError(f"Mosaic GPU Pallas is unavailable: {available()}")
    if layout not in ("bnsd", "bsnd"):
        raise ValueError(f"layout must be 'bnsd' or 'bsnd', got {layout!r}")
    bnsd = (lambda s: tuple(s)) if layout == "bnsd" else (lambda s: (s[0], s[2], s[1], s[3]))
    b, n, sq, d = bnsd(q.shape)
    _, n_kv, skv, _ = bnsd(k.shape)
    why = unsupported(dtype=q.dtype, d=d, dv=v.shape[-1])
    if why:
        raise ValueError("sage_attention cannot serve these inputs: " + "; ".join(why))
    if n % n_kv:
        raise ValueError(f"q heads ({n}) must be a multiple of k/v heads ({n_kv})")
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    dp = head_dim_padded(d)
    cfg = config or SageConfig()
    if scale <= 0:  # the fused softmax folds the row scale into exp2 via max(t * qs) =
        if cfg.k_scale_per_tile:  # max(t) * qs: it needs qs > 0 (this raises, naming scale)
            quantization.tile_k_rows(k_rows, 1, scale, "SageConfig.k_scale_per_tile")
        # the plain softmax, per-key scales (and what builds on the fused one resolves off)
        cfg = dataclasses.replace(cfg, fused_softmax=False, k_scale_per_tile=False)
    cfg = cfg.resolved(dp)
    if cfg.k_scale_per_tile:  # one K scale per key block: what the kernel's tile scalar reads
        k_rows = quantization.tile_k_rows(k_rows, cfg.block_kv, scale, "SageConfig.k_scale_per_tile")
    if cfg.block_q % q_rows or cfg.block_kv % k_rows:
        raise ValueError(f"q_rows ({q_rows}) and k_rows ({k_rows}) must divide block_q "
                         f"({cfg.block_q}) and block_kv ({cfg.block_kv})")
    sq_pad = -(-sq // (2 * cfg.block_q)) * (2 * cfg.block_q)  # two warpgroups' rows per CTA
    skv_pad = -(-skv // cfg.block_kv) * cfg.block_kv

    km = None
    if key_mask is not None:
        km = jnp.asarray(key_mask)
        km = km.reshape((1,) * (4 - km.ndim) + km.shape)
        if (km.shape[2] != 1 or km.shape[0] not in (1, b) or km.shape[1] not in (1, n)
                or km.shape[3] not in (1, skv)):
            raise ValueError(f"key_mask must be broadcastable to ({b}, 1|{n}, 1, {skv}), got {km.shape}")
        km = km[:, :, 0, :]
        km = jnp.broadcast_to(km, km.shape[:2] + (skv,))
    if kv_lengths is not None:
        kv_lengths = jnp.asarray(kv_lengths, jnp.int32)
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("give both q_segment_ids and kv_segment_ids (or neither)")
    segments = None
    if q_segment_ids is not None:
        if tuple(q_segment_ids.shape) != (b, sq) or tuple(kv_segment_ids.shape) != (b, skv):
            raise ValueError(f"q_segment_ids {tuple(q_segment_ids.shape)} and kv_segment_ids "
                             f"{tuple(kv_segment_ids.shape)} must be ({b}, {sq}) and ({b}, {skv})")
        segments = quantization.padded_segments(q_segment_ids, kv_segment_ids, sq_pad, skv_pad)
    kb = quantization.key_bias(skv, skv_pad, km, kv_lengths)
    kdims = None
    if kb is not None:  # which of (b, n) the bias varies over: the producer indexes only those
        kdims = (kb.shape[0] != 1, kb.shape[1] != 1)

    def run(q, k, v, kb, segments):  # arrays as arguments: a custom VJP must not close over tracers
        kw = dict(layout=layout, scale=scale, dp=dp, sq_pad=sq_pad, skv_pad=skv_pad,
                  v_key_perm=sim_flags(cfg)["v_key_perm"],
                  pv_dtype=quantization.pv16_dtype(q.dtype) if cfg.pv_bits == 16 else None)
        if q_rows == 1 and (k_rows == 1 or k_rows == cfg.block_kv):  # one Pallas pass each
            qz = sage_prepass.quantize(q, k, v, interpret=interpret, k_rows=k_rows,
                                       v_pallas=cfg.v_pallas, **kw)
        else:
            qz = quantization.quantize(q, k, v, q_rows=q_rows, k_rows=k_rows, **kw)
        out, lse = sage_call(cfg, qz, kb, out_dtype=q.dtype, out_layout=layout, groups=n // n_kv,
                             key_bias_dims=kdims, interpret=interpret, segments=segments, d=d)
        out = out[:, :, :sq, :d] if layout == "bnsd" else out[:, :sq, :, :d]
        return out, lse[:, :, :sq] + qz.lse_shift  # -inf stays -inf: the shift is finite

    name = "sage16" if cfg.pv_bits == 16 else "sage"  # the backend that runs this config
    out, lse = _no_grad(name, run, q, k, v, kb, segments)
    return (out, lse) if return_lse else out
