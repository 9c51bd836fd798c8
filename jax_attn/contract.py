"""The attention contract, checked once, independent of any array framework.

`validate` reads only shapes and dtype names, so `jax_attn` and `torch_ref` raise the very same
errors for the same bad input. It returns a `Spec`: the static facts every backend decides on.
"""
from __future__ import annotations

import dataclasses
import math

LAYOUTS = ("bnsd", "bsnd")
FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


@dataclasses.dataclass(frozen=True)
class Spec:
    """Static description of one attention call, in `(b, n, s, d)` terms whatever the layout."""

    batch: int
    heads: int
    kv_heads: int
    q_len: int
    kv_len: int
    head_dim: int
    value_dim: int
    dtype: str
    layout: str = "bnsd"
    mask_kind: str = "none"  # "none", "bool" or "bias"
    mask_shape: tuple[int, int, int, int] | None = None  # left-padded to 4 dims
    has_kv_lengths: bool = False
    is_causal: bool = False
    scale: float = 1.0

    @property
    def groups(self) -> int:
        return self.heads // self.kv_heads

    @property
    def can_have_empty_rows(self) -> bool:
        return self.mask_kind != "none" or self.has_kv_lengths

    @property
    def per_key_mask(self) -> bool:
        """True when the mask varies along keys only (one row shared by every query)."""
        return self.mask_shape is not None and self.mask_shape[2] == 1

    def flops(self, backward: bool = False) -> float:
        """Matrix FLOPs of the call (2 matmuls forward, 5 backward); causal counts half."""
        f = 2.0 * self.batch * self.heads * self.q_len * self.kv_len * (self.head_dim + self.value_dim)
        if self.is_causal:
            f /= 2
        return f * 2.5 if backward else f


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def _shape_str(shape) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ")"


def validate(q, k, v, *, attn_mask=None, kv_lengths=None, scale=None, is_causal=False,
             layout="bnsd") -> Spec:
    """Check the arguments of `attention_forward` and describe the call.

    `q`, `k`, `v`, `attn_mask` and `kv_lengths` may be anything with `.shape` and `.dtype`
    (JAX, NumPy or torch arrays, `jax.ShapeDtypeStruct`).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    names = "(b, n, s, d)" if layout == "bnsd" else "(b, s, n, d)"
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            raise TypeError(f"{name} must be an array with a shape and dtype, got {type(x).__name__}")
        if len(x.shape) != 4:
            raise ValueError(f"{name} must have rank 4 {names} for layout={layout!r}, "
                             f"got shape {_shape_str(x.shape)}")
        if _dtype_name(x.dtype) not in FLOAT_DTYPES:
            raise TypeError(f"{name} must have a floating dtype {FLOAT_DTYPES}, got {_dtype_name(x.dtype)}")
    dtypes = {_dtype_name(x.dtype) for x in (q, k, v)}
    if len(dtypes) != 1:
        raise TypeError(f"q, k and v must share one dtype, got q={_dtype_name(q.dtype)}, "
                        f"k={_dtype_name(k.dtype)}, v={_dtype_name(v.dtype)}")

    def bnsd(shape):
        return tuple(shape) if layout == "bnsd" else (shape[0], shape[2], shape[1], shape[3])

    b, n, sq, d = bnsd(q.shape)
    kb, n_kv, skv, kd = bnsd(k.shape)
    vb, vn, vs, dv = bnsd(v.shape)
    if kb != b or vb != b:
        raise ValueError(f"q, k and v must have the same batch size, got q={b}, k={kb}, v={vb}")
    if kd != d:
        raise ValueError(f"k must have q's head dim d={d}, got k shape {_shape_str(k.shape)}")
    if (vn, vs) != (n_kv, skv):
        raise ValueError(f"v must have k's heads and sequence length (n_kv={n_kv}, skv={skv}), "
                         f"got v shape {_shape_str(v.shape)}")
    if min(b, n, sq, d, n_kv, skv, dv) == 0:
        raise ValueError(f"q, k and v must have no zero-sized dimension, got q {_shape_str(q.shape)}, "
                         f"k {_shape_str(k.shape)}, v {_shape_str(v.shape)}")
    if n % n_kv:
        raise ValueError(f"q's heads ({n}) must be a multiple of k/v's heads ({n_kv}) for GQA/MQA")

    mask_kind, mask_shape = "none", None
    if attn_mask is not None:
        if not hasattr(attn_mask, "shape"):
            raise TypeError(f"attn_mask must be an array, got {type(attn_mask).__name__}")
        mdt = _dtype_name(attn_mask.dtype)
        if mdt == "bool":
            mask_kind = "bool"
        elif mdt in FLOAT_DTYPES:
            mask_kind = "bias"
        else:
            raise TypeError(f"attn_mask must be bool (True = attend) or a floating additive bias, got {mdt}")
        full = (b, n, sq, skv)
        if len(attn_mask.shape) > 4:
            raise ValueError(f"attn_mask must have rank <= 4, broadcastable to (b, n, sq, skv) = "
                             f"{_shape_str(full)}, got {_shape_str(attn_mask.shape)}")
        mask_shape = (1,) * (4 - len(attn_mask.shape)) + tuple(attn_mask.shape)
        if any(m not in (1, f) for m, f in zip(mask_shape, full)):
            raise ValueError(f"attn_mask of shape {_shape_str(attn_mask.shape)} is not broadcastable to "
                             f"(b, n, sq, skv) = {_shape_str(full)}")

    if kv_lengths is not None:
        if not hasattr(kv_lengths, "shape"):
            raise TypeError(f"kv_lengths must be an integer array of shape ({b},), "
                            f"got {type(kv_lengths).__name__}")
        if tuple(kv_lengths.shape) != (b,):
            raise ValueError(f"kv_lengths must have shape (b,) = ({b},), got {_shape_str(kv_lengths.shape)}")
        if not _dtype_name(kv_lengths.dtype).startswith(("int", "uint")):
            raise TypeError(f"kv_lengths must have an integer dtype, got {_dtype_name(kv_lengths.dtype)}")

    if scale is None:
        scale = 1.0 / math.sqrt(d)
    else:
        try:
            scale = float(scale)
        except TypeError:
            raise TypeError(f"scale must be a Python number (static), got {type(scale).__name__}") from None
        if not math.isfinite(scale):
            raise ValueError(f"scale must be finite, got {scale}")
    if not isinstance(is_causal, bool):
        raise TypeError(f"is_causal must be a bool, got {type(is_causal).__name__}")

    return Spec(batch=b, heads=n, kv_heads=n_kv, q_len=sq, kv_len=skv, head_dim=d, value_dim=dv,
                dtype=dtypes.pop(), layout=layout, mask_kind=mask_kind, mask_shape=mask_shape,
                has_kv_lengths=kv_lengths is not None, is_causal=is_causal, scale=scale)
