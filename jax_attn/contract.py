"""The attention contract, checked once, independent of any array framework.

`validate` reads only shapes and dtype names, so `jax_attn` and `torch_ref` raise the very same
errors for the same bad input. It returns a `Spec`: the static facts every backend decides on.
"""
from __future__ import annotations

import dataclasses
import math
import numbers

import numpy as np

LAYOUTS = ("bnsd", "bsnd")
FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


@dataclasses.dataclass(frozen=True)
class Spec:
    """Static description of one attention call, in `(b, n, s, d)` terms whatever the layout.

    The masks of a call (`attn_mask`, jax.nn's `bias` and `mask`) are described merged: a key is
    kept where every bool mask keeps it, and the float parts add up (`mask_kind` "bias" when any
    part is float). Unbatched inputs are described with `batch=1`.
    """

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
    has_q_lengths: bool = False
    window: tuple[int | None, int | None] | None = None  # (left, right) keys around each query
    unbatched: bool = False
    # Packed sequences: `q_segment_ids (b, sq)` and `kv_segment_ids (b, skv)` are given; query i
    # of sample b sees key j only where their ids are equal (on top of every other rule).
    has_segment_ids: bool = False

    @property
    def groups(self) -> int:
        return self.heads // self.kv_heads

    @property
    def window_bounds(self) -> tuple[int | None, int | None] | None:
        """`(left, right)`: key j is visible to query i iff `i - left <= j <= i + right` (None =
        unbounded), causal folded in as `right <= 0`; None when neither restricts the keys."""
        if self.window is None and not self.is_causal:
            return None
        left, right = self.window or (None, None)
        if self.is_causal:
            right = 0 if right is None else min(right, 0)
        return left, right

    @property
    def can_have_empty_rows(self) -> bool:
        return (self.mask_kind != "none" or self.has_kv_lengths or self.has_q_lengths
                or self.window is not None or self.has_segment_ids)

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


def _check_lengths(name, x, b, unbatched):
    if x is None:
        return
    want = "()" if unbatched else f"({b},)"
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{name} must be an integer array of shape {want}, got {type(x).__name__}")
    shapes = ((), (1,)) if unbatched else ((b,),)
    if tuple(x.shape) not in shapes:
        raise ValueError(f"{name} must have shape (b,) = {want}, got {_shape_str(x.shape)}")
    if not _dtype_name(x.dtype).startswith(("int", "uint")):
        raise TypeError(f"{name} must have an integer dtype, got {_dtype_name(x.dtype)}")


SEGMENT_NAMES = ("q_segment_ids", "kv_segment_ids")


def _check_segments(q_ids, kv_ids, b, sq, skv, unbatched) -> bool:
    """Both segment-id arrays or neither; integer `(b, s)` (`(s,)` or `(1, s)` unbatched)."""
    given = [name for name, x in zip(SEGMENT_NAMES, (q_ids, kv_ids)) if x is not None]
    if len(given) == 1:
        missing = SEGMENT_NAMES[1 - SEGMENT_NAMES.index(given[0])]
        raise ValueError(f"{given[0]} was given without {missing}: packed sequences need both "
                         "q_segment_ids and kv_segment_ids (or neither)")
    if not given:
        return False
    for name, x, axis, s in (("q_segment_ids", q_ids, "sq", sq), ("kv_segment_ids", kv_ids, "skv", skv)):
        want = f"({axis},) = ({s},)" if unbatched else f"(b, {axis}) = ({b}, {s})"
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            raise TypeError(f"{name} must be an integer array of shape {want}, got {type(x).__name__}")
        shapes = ((s,), (1, s)) if unbatched else ((b, s),)
        if tuple(x.shape) not in shapes:
            raise ValueError(f"{name} must have shape {want}, got {_shape_str(x.shape)}")
        if not _dtype_name(x.dtype).startswith(("int", "uint")):
            raise TypeError(f"{name} must have an integer dtype, got {_dtype_name(x.dtype)}")
    return True


def _check_mask(name, x, kinds, full):
    """Validate one mask argument; returns (kind, shape left-padded to rank 4)."""
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{name} must be an array, got {type(x).__name__}")
    dt = _dtype_name(x.dtype)
    kind = "bool" if dt == "bool" else "bias" if dt in FLOAT_DTYPES else None
    if kind not in kinds:
        want = {("bool", "bias"): "bool (True = attend) or a floating additive bias",
                ("bias",): "a floating additive bias", ("bool",): "bool (True = attend)"}[kinds]
        raise TypeError(f"{name} must be {want}, got {dt}")
    if len(x.shape) > 4:
        raise ValueError(f"{name} must have rank <= 4, broadcastable to (b, n, sq, skv) = "
                         f"{_shape_str(full)}, got {_shape_str(x.shape)}")
    shape = (1,) * (4 - len(x.shape)) + tuple(x.shape)
    if any(m not in (1, f) for m, f in zip(shape, full)):
        raise ValueError(f"{name} of shape {_shape_str(x.shape)} is not broadcastable to "
                         f"(b, n, sq, skv) = {_shape_str(full)}")
    return kind, shape


def normalize_window(window, name="local_window_size", error=TypeError):
    """A window as `(left, right)` of Python ints >= 0 or None, or None when unbounded.

    Accepts an int (symmetric), a `(left, right)` pair (tuple or list) of ints >= 0 or None, or
    None; NumPy integers count as ints, bools and floats do not. Shared by the contract and the
    kernels so that both read a window the same way; `name` and `error` (the exception class)
    let each caller keep its own argument name and error type.
    """
    if window is None:
        return None

    def side(x):
        if x is None:
            return None
        if isinstance(x, bool) or not isinstance(x, numbers.Integral) or x < 0:
            raise error(f"{name} must be an int >= 0 or a (left, right) pair of ints "
                        f">= 0 or None, got {window!r}")
        return int(x)

    if isinstance(window, (tuple, list)):
        if len(window) != 2:
            raise error(f"{name} must be an int or a (left, right) pair, got {window!r}")
        left, right = side(window[0]), side(window[1])
        return None if left is None and right is None else (left, right)
    w = side(window)
    if w is None:
        return None
    return w, w


def _check_window(window):
    """`local_window_size`: an int (symmetric) or `(left, right)` of ints >= 0 or None."""
    return normalize_window(window)


def _check_scale(scale, d):
    if scale is None:
        return 1.0 / math.sqrt(d)
    # A real number known when tracing (Python, NumPy scalar or concrete 0-d array); not a string.
    if isinstance(scale, (str, bytes, bool, complex)) or (
            not isinstance(scale, numbers.Real) and getattr(scale, "shape", None) != ()):
        raise TypeError(f"scale must be a real number (static), got {type(scale).__name__} {scale!r}")
    try:
        value = float(scale)
    except Exception:  # a traced value: the scale is part of the compiled program
        raise TypeError(f"scale must be a real number known at trace time, got {type(scale).__name__}"
                        ) from None
    if not math.isfinite(value):
        raise ValueError(f"scale must be finite, got {value}")
    return value


def validate(q, k, v, *, attn_mask=None, kv_lengths=None, scale=None, is_causal=False,
             layout="bnsd", bias=None, mask=None, query_seq_lengths=None,
             local_window_size=None, q_segment_ids=None, kv_segment_ids=None) -> Spec:
    """Check the arguments of `attention_forward` and describe the call.

    `q`, `k`, `v`, the masks and the lengths may be anything with `.shape` and `.dtype`
    (JAX, NumPy or torch arrays, `jax.ShapeDtypeStruct`).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    names = "(b, n, s, d)" if layout == "bnsd" else "(b, s, n, d)"
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            raise TypeError(f"{name} must be an array with a shape and dtype, got {type(x).__name__}")
        if _dtype_name(x.dtype) not in FLOAT_DTYPES:
            raise TypeError(f"{name} must have a floating dtype {FLOAT_DTYPES}, got {_dtype_name(x.dtype)}")
    ranks = {len(x.shape) for x in (q, k, v)}
    unbatched = ranks == {3}
    if not unbatched:
        for name, x in (("q", q), ("k", k), ("v", v)):
            if len(x.shape) != 4:
                raise ValueError(f"{name} must have rank 4 {names} for layout={layout!r} (or q, k and v "
                                 f"all rank 3 {names.replace('b, ', '')}, unbatched), got shape "
                                 f"{_shape_str(x.shape)}")
    dtypes = {_dtype_name(x.dtype) for x in (q, k, v)}
    if len(dtypes) != 1:
        raise TypeError(f"q, k and v must share one dtype, got q={_dtype_name(q.dtype)}, "
                        f"k={_dtype_name(k.dtype)}, v={_dtype_name(v.dtype)}")

    def bnsd(shape):
        shape = (1, *shape) if unbatched else tuple(shape)
        return shape if layout == "bnsd" else (shape[0], shape[2], shape[1], shape[3])

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

    full = (b, n, sq, skv)
    parts = [_check_mask(name, x, kinds, full) for name, x, kinds in (
        ("attn_mask", attn_mask, ("bool", "bias")), ("bias", bias, ("bias",)), ("mask", mask, ("bool",)))
        if x is not None]
    mask_kind, mask_shape = "none", None
    if parts:
        mask_kind = "bias" if any(kind == "bias" for kind, _ in parts) else "bool"
        mask_shape = tuple(max(dims) for dims in zip(*(shape for _, shape in parts)))

    _check_lengths("kv_lengths", kv_lengths, b, unbatched)
    _check_lengths("query_seq_lengths", query_seq_lengths, b, unbatched)
    has_segment_ids = _check_segments(q_segment_ids, kv_segment_ids, b, sq, skv, unbatched)
    scale = _check_scale(scale, d)
    if isinstance(is_causal, np.bool_):
        is_causal = bool(is_causal)
    if not isinstance(is_causal, bool):
        raise TypeError(f"is_causal must be a bool, got {type(is_causal).__name__} {is_causal!r}")

    return Spec(batch=b, heads=n, kv_heads=n_kv, q_len=sq, kv_len=skv, head_dim=d, value_dim=dv,
                dtype=dtypes.pop(), layout=layout, mask_kind=mask_kind, mask_shape=mask_shape,
                has_kv_lengths=kv_lengths is not None, is_causal=is_causal, scale=scale,
                has_q_lengths=query_seq_lengths is not None, window=_check_window(local_window_size),
                unbatched=unbatched, has_segment_ids=has_segment_ids)

