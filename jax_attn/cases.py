"""The `check` cases, once for both frameworks: shapes and masking, and their inputs as NumPy.

This module imports no array framework. Inputs are NumPy, already rounded to the dtype checked;
`python -m jax_attn check` (`jax_attn.cli`) converts them to jnp and `torch_ref.check` to torch,
so both frameworks see the very same numbers, and `expected` gives the float64 reference both
are measured against.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from . import reference


@dataclasses.dataclass(frozen=True)
class Case:
    """One `check` configuration, (b, n, n_kv, sq, skv, d, dv) plus masking."""

    name: str
    b: int
    n: int
    n_kv: int
    sq: int
    skv: int
    d: int
    dv: int
    mask: str = "none"  # "none", "key" (bool, per key), "bias" (float, full), "key_bias" (float, per key)
    causal: bool = False
    kv_lengths: bool = False
    layout: str = "bnsd"
    window: tuple | None = None  # local_window_size
    q_lengths: bool = False  # query_seq_lengths (one sample with padding queries)
    poison: bool = False  # NaN in k and v at the keys kv_lengths drops (they must not matter)
    segments: bool = False  # packed sequences: q_segment_ids / kv_segment_ids (one query segment keyless)

    @property
    def bias_grad(self) -> bool:
        """The case differentiates its float bias too."""
        return self.mask in ("bias", "key_bias")

    def scaled(self, factor: int) -> "Case":
        return dataclasses.replace(self, sq=max(1, self.sq // factor), skv=max(1, self.skv // factor))


CASES = (
    Case("self-attention", 2, 4, 4, 1024, 1024, 64, 64),
    Case("self-attention, bsnd layout", 2, 4, 4, 1024, 1024, 64, 64, layout="bsnd"),
    Case("cross-attention, 77 padded keys", 2, 4, 4, 1024, 77, 40, 40, kv_lengths=True),
    Case("GQA, causal", 1, 8, 2, 512, 512, 128, 128, causal=True),
    Case("per-key bool mask", 2, 4, 4, 256, 160, 72, 72, mask="key"),
    Case("additive bias", 1, 4, 4, 256, 256, 64, 64, mask="bias"),
    Case("value dim != head dim", 1, 2, 2, 128, 96, 64, 32),
    Case("per-key bias", 2, 4, 4, 512, 300, 64, 64, mask="key_bias"),
    Case("additive bias, d=128", 1, 4, 4, 512, 512, 128, 128, mask="bias"),
    Case("sliding window, causal", 1, 4, 4, 1024, 1024, 64, 64, causal=True, window=(128, 0)),
    Case("sliding window, two-sided, GQA", 1, 4, 2, 512, 512, 128, 128, window=(64, 32)),
    Case("query and key padding", 2, 4, 4, 256, 77, 64, 64, kv_lengths=True, q_lengths=True),
    Case("NaN in padded keys", 2, 4, 4, 1024, 77, 40, 40, kv_lengths=True, poison=True),
    Case("NaN in padded keys, self-attention", 2, 4, 4, 1024, 1024, 64, 64, kv_lengths=True, poison=True),
    Case("packed sequences (segment ids), causal", 2, 4, 4, 1024, 1024, 64, 64, causal=True, segments=True),
    Case("packed cross-attention (segment ids), GQA", 2, 8, 2, 768, 320, 128, 128, segments=True),
)


def packed_ids(rng, b: int, sq: int, skv: int):
    """`(q_ids, kv_ids)`, int32 `(b, sq)` and `(b, skv)`: each sample packs 3-5 prompts of random
    lengths in order; the last query segment has no keys (its rows must come back as zeros)."""
    q_ids, kv_ids = np.zeros((b, sq), np.int32), np.zeros((b, skv), np.int32)
    for i in range(b):
        parts = int(rng.integers(3, 6))
        q_cuts = np.sort(rng.choice(np.arange(1, sq), parts - 1, replace=False))
        kv_cuts = np.sort(rng.choice(np.arange(1, skv), parts - 2, replace=False))
        q_ids[i] = np.searchsorted(q_cuts, np.arange(sq), side="right")
        kv_ids[i] = np.searchsorted(kv_cuts, np.arange(skv), side="right")  # segments 0..parts-2
    return q_ids, kv_ids


def numpy_dtype(name: str):
    """The NumPy dtype named `name` ("bfloat16" is ml_dtypes', as JAX uses)."""
    if name == "bfloat16":
        import ml_dtypes
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def inputs(case: Case, dtype: str, seed: int, convert: Callable | None = None):
    """`(q, k, v, kw)` for `case`: q, k, v in bnsd and `attention_forward`'s keyword arguments.

    NumPy arrays: floats (q, k, v, a float `attn_mask`) drawn in float64 and rounded to `dtype`
    as NumPy rounds (what `jnp.asarray(x, dtype)` does), lengths int32, bool masks. `convert`
    (e.g. `jnp.asarray`), when given, is applied to each array.
    """
    rng = np.random.default_rng(seed)
    rounded = lambda x: x.astype(numpy_dtype(dtype))  # noqa: E731
    shape = lambda n, s, e: (case.b, n, s, e)  # noqa: E731
    q = rng.standard_normal(shape(case.n, case.sq, case.d))
    k = rng.standard_normal(shape(case.n_kv, case.skv, case.d))
    v = rng.standard_normal(shape(case.n_kv, case.skv, case.dv))
    kw = {"is_causal": case.causal, "layout": case.layout}
    if case.kv_lengths:  # one sample fully padded: its rows must come back as zeros
        lengths = np.r_[rng.integers(1, case.skv + 1, case.b - 1), 0]
        kw["kv_lengths"] = lengths.astype(np.int32)
        if case.poison:  # garbage in the padding, as uninitialized text-encoder outputs hold
            pad = np.arange(case.skv)[None, None, :] >= lengths[:, None, None]
            k, v = (np.where(pad[..., None], np.nan, x) for x in (k, v))
    q, k, v = (rounded(x) for x in (q, k, v))
    if case.q_lengths:
        kw["query_seq_lengths"] = np.r_[rng.integers(1, case.sq + 1, case.b - 1), case.sq].astype(np.int32)
    if case.window is not None:
        kw["local_window_size"] = case.window
    if case.segments:
        kw["q_segment_ids"], kw["kv_segment_ids"] = packed_ids(rng, case.b, case.sq, case.skv)
    if case.mask == "key":
        kw["attn_mask"] = rng.random((case.b, 1, 1, case.skv)) < 0.8
    elif case.mask == "bias":
        kw["attn_mask"] = rounded(rng.standard_normal((1, case.n, case.sq, case.skv)))
    elif case.mask == "key_bias":
        kw["attn_mask"] = rounded(rng.standard_normal((case.b, 1, 1, case.skv)))
    if convert is not None:
        q, k, v = (convert(x) for x in (q, k, v))
        kw = {name: convert(x) if isinstance(x, np.ndarray) else x for name, x in kw.items()}
    return q, k, v, kw


def output_cotangent(case: Case, seed: int) -> np.ndarray:
    """The float64 `(b, n, sq, dv)` cotangent the outputs are differentiated against."""
    return np.random.default_rng(seed + 1).standard_normal((case.b, case.n, case.sq, case.dv))


def expected(case: Case, q, k, v, d_out, attn_mask=None, kv_lengths=None, query_seq_lengths=None,
             q_segment_ids=None, kv_segment_ids=None, **_):
    """The float64 reference for the inputs of `case` (any arrays NumPy reads, in bnsd; the other
    keywords of `inputs` are read from `case`): `(out, lse, grads)`, `grads` those of q, k, v,
    and, when the case differentiates its float bias, the bias' summed over the dims it
    broadcasts along."""
    as_np = lambda x: None if x is None else np.asarray(x)  # noqa: E731
    mask, lengths, q_lengths = as_np(attn_mask), as_np(kv_lengths), as_np(query_seq_lengths)
    if mask is not None and mask.dtype != bool:
        mask = mask.astype(np.float64)
    extra = dict(q_lengths=q_lengths, window=case.window, q_segment_ids=as_np(q_segment_ids),
                 kv_segment_ids=as_np(kv_segment_ids))
    out, lse = reference.attention(q, k, v, mask, lengths, case.causal, return_lse=True, **extra)
    *grads, d_bias = reference.attention_vjp(q, k, v, d_out, mask, lengths, case.causal, **extra)
    if case.bias_grad:
        grads.append(d_bias.sum(tuple(i for i, s in enumerate(mask.shape) if s == 1), keepdims=True))
    return out, lse, grads
