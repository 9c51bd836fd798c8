"""`tpu`: JAX's own Pallas TPU flash-attention kernel (`jax.experimental.pallas.ops.tpu.flash_attention`).

MaxDiffusion's users run on TPUs, where the other backends offer only XLA and the chunked path.
This backend hands such calls to the kernel JAX ships for TPUs, after mapping our contract onto it:

- sequences are padded to the kernel's 128-row blocks; the kernel's segment ids carry both the
  caller's packed sequences (renumbered to ranks 0, 1, ...; 0 for every query without them) and
  the hidden keys (padding, `kv_lengths`, a per-key bool mask: id -1, which no query holds); the
  kernel masks by them tile by tile but skips no tile for them, so a packed batch costs what the
  unpacked one does (JAX's splash kernel would skip; a per-head key mask folds heads into batch);
- GQA repeats K/V heads (the kernel needs as many K/V heads as query heads);
- rows with no visible key are zeroed here (the kernel averages the masked values there);
- the lse comes from a second run that saves the kernel's softmax statistics, without gradient.

Declined, with a reason `explain()` shows: float biases and full `(sq, skv)` masks (the kernel
would read a materialized `(b, n, sq, skv)` bias), local windows, `dv != d`, float16.
Its speed is unmeasured: this project has no TPU. On the CPU, `JAX_ATTN_INTERPRET=1` runs it in
Pallas TPU interpret mode, which is how the tests check it.
"""
from __future__ import annotations

import importlib.util

import jax
import jax.numpy as jnp

from ..arrays import pad_to
from ..inputs import _renumber
from .base import Backend, platform
from .pallas import ENV_INTERPRET, interpreting

BLOCK = 128  # the kernel's default block sizes; padded lengths are multiples of it


def _kernel_module():
    from jax.experimental.pallas.ops.tpu import flash_attention
    return flash_attention


def _visible_keys(inputs, skv_pad: int):
    """bool (b', skv_pad): key j is visible (kv_lengths, a per-key mask, padding), with b' = b, or
    b * n when the key mask differs per head; None when every real key is visible and no padding."""
    spec = inputs.spec
    pos = jnp.arange(skv_pad)
    if inputs.mask is None and inputs.kv_lengths is None and skv_pad == spec.kv_len:
        return None
    visible = jnp.broadcast_to(pos < spec.kv_len, (spec.batch, 1, skv_pad))
    if inputs.kv_lengths is not None:
        visible = visible & (pos[None, None, :] < inputs.kv_lengths[:, None, None])
    if inputs.mask is not None:  # (b|1, n|1, 1, skv), bool
        key_mask = pad_to(inputs.mask[:, :, 0, :], 2, skv_pad)
        visible = visible & key_mask
    if visible.shape[1] > 1:  # per-head keys: fold heads into the batch
        return jnp.broadcast_to(visible, (spec.batch, spec.heads, skv_pad)).reshape(-1, skv_pad)
    return visible[:, 0]


def _kernel_segment_ids(inputs, visible, n_rows: int, sq_pad: int, skv_pad: int):
    """int32 `(n_rows, sq_pad)` query ids and `(n_rows, skv_pad)` key ids for the kernel, or None
    when every key is visible and there are no packed sequences. Query ids are >= 0 (ranks of the
    caller's ids, else 0); a hidden key is -1. `n_rows` is b, or b * n when heads are folded."""
    if visible is None and inputs.segments is None:
        return None
    if inputs.segments is None:
        q_ids = jnp.zeros((n_rows, sq_pad), jnp.int32)
        return q_ids, jnp.where(visible, 0, -1).astype(jnp.int32)
    q_ids, kv_ids = _renumber(*inputs.segments)  # padded queries' ids do not matter: sliced off
    q_ids, kv_ids = pad_to(q_ids, 1, sq_pad), pad_to(kv_ids, 1, skv_pad, -1)
    if n_rows != q_ids.shape[0]:  # heads folded into the batch, b-major
        q_ids, kv_ids = (jnp.repeat(x, n_rows // x.shape[0], axis=0) for x in (q_ids, kv_ids))
    if visible is not None:
        kv_ids = jnp.where(visible, kv_ids, -1)
    return q_ids, kv_ids


def _nonempty_rows(spec, ids, sq_pad: int):
    """bool (rows, 1, sq_pad): the query row sees at least one key of its segment (causal is
    top-left aligned, as in the contract: query i sees keys j <= i). From each id's earliest
    visible key, so never an (sq, skv) array."""
    if ids is None:
        return None
    q_ids, kv_ids = ids
    n_ids = q_ids.shape[1] + kv_ids.shape[1]  # ranks are below this; bucket n_ids holds hidden keys
    none = jnp.iinfo(jnp.int32).max

    def rows(q, kv):
        first = jax.ops.segment_min(jnp.arange(kv.shape[0]), jnp.where(kv >= 0, kv, n_ids),
                                    num_segments=n_ids + 1)
        first = first[q]
        return first <= jnp.arange(sq_pad) if spec.is_causal else first < none

    return jax.vmap(rows)(q_ids, kv_ids)[:, None, :]


class TPU(Backend):
    name = "tpu"
    description = "JAX's Pallas TPU flash-attention kernel (speed unmeasured here); O(s) memory"
    platforms = ("tpu",)
    dtypes = ("bfloat16", "float32")
    value_dim_differs = False
    supports_bias = False
    supports_bias_grad = False
    supports_lse_grad = False  # the lse comes from the kernel's saved statistics, without gradient
    supports_segment_ids = True  # masked tile by tile, no tile skipped (module docstring)

    @property
    def automatic(self) -> bool:
        return not interpreting()  # interpret mode is for tests only

    def unavailable(self) -> list[str]:
        if importlib.util.find_spec("jax.experimental.pallas.ops.tpu") is None:
            return ["jax.experimental.pallas.ops.tpu is missing from this jax"]
        if platform() == "tpu" or interpreting():
            return []
        return [f"needs a TPU: the default JAX platform is {platform()} (on the CPU, {ENV_INTERPRET}=1 "
                "runs it in Pallas TPU interpret mode, for tests)"]

    def reasons(self, spec, needs=None):
        why = super().reasons(spec, needs)
        if spec.mask_kind == "bool" and not spec.per_key_mask:
            why.append("a bool attn_mask that varies along queries is not supported (the kernel would read "
                       "it as a materialized (b, n, sq, skv) bias); per-key masks (b, n|1, 1, skv) are")
        return why

    def _forward(self, inputs, return_lse):
        fa = _kernel_module()
        spec = inputs.spec
        q, k, v = inputs.bnsd()
        if spec.groups > 1:
            k, v = (jnp.repeat(x, spec.groups, axis=1) for x in (k, v))
        b, n, sq, d = q.shape
        sq_pad, skv_pad = (-(-s // BLOCK) * BLOCK for s in (sq, spec.kv_len))
        q, k, v = pad_to(q, 2, sq_pad), pad_to(k, 2, skv_pad), pad_to(v, 2, skv_pad)
        visible = _visible_keys(inputs, skv_pad)
        folded = visible is not None and visible.shape[0] != b
        if folded:
            q, k, v = (x.reshape(b * n, 1, -1, d) for x in (q, k, v))
        ids = _kernel_segment_ids(inputs, visible, q.shape[0], sq_pad, skv_pad)
        segments = None if ids is None else fa.SegmentIds(q=ids[0], kv=ids[1])
        blocks = fa.BlockSizes.get_default(*q.shape[:3], skv_pad, d)
        kw = dict(causal=spec.is_causal, sm_scale=float(spec.scale))
        attend = lambda q, k, v: fa.flash_attention(q, k, v, None, segments, block_sizes=blocks, **kw)  # noqa: E731
        out = _interpreted(attend)(q, k, v) if platform() != "tpu" else attend(q, k, v)
        lse = None
        if return_lse:
            def statistics(q, k, v):
                with _interpret_context():
                    _, l, m = fa._flash_attention(q, k, v, None, segments, True, spec.is_causal,
                                                  float(spec.scale), blocks, False)
                return (m + jnp.log(l)).reshape(m.shape[:3]).astype(jnp.float32)
            lse = _without_gradient(statistics)(q, k, v)
        rows = _nonempty_rows(spec, ids, sq_pad)
        if rows is not None:
            out = jnp.where(rows[..., None], out, jnp.zeros((), out.dtype))
            if lse is not None:
                lse = jnp.where(rows, lse, -jnp.inf)
        out = out.reshape(b, n, sq_pad, d)[:, :, :sq]
        out = inputs.from_bnsd(out.astype(inputs.q.dtype))
        if not return_lse:
            return out
        return out, lse.reshape(b, n, sq_pad)[:, :, :sq]


def _without_gradient(f):
    """`f(q, k, v)` kept on the autodiff graph with a zero VJP, so that `api`'s guard on a backend
    whose lse has no gradient (`supports_lse_grad=False`) sees the lse differentiated and raises,
    instead of the lse silently reading as a constant."""
    @jax.custom_vjp
    def run(q, k, v):
        return f(q, k, v)

    run.defvjp(lambda q, k, v: (f(q, k, v), (q, k, v)),
               lambda res, g: tuple(jnp.zeros_like(x) for x in res))
    return run


def _interpreted(f):
    """`f` with its forward and its backward kernels traced in Pallas TPU interpret mode: the
    backward's kernels are built when the gradient is traced, after a plain `with` would end."""
    @jax.custom_vjp
    def run(q, k, v):
        with _interpret_context():
            return f(q, k, v)

    def fwd(q, k, v):
        with _interpret_context():
            return jax.vjp(f, q, k, v)

    def bwd(vjp, g):
        with _interpret_context():
            return vjp(g)

    run.defvjp(fwd, bwd)
    return run


def _interpret_context():
    """Pallas TPU interpret mode on the CPU (tests), else nothing."""
    import contextlib
    if platform() == "tpu":
        return contextlib.nullcontext()
    from jax.experimental.pallas import tpu as pltpu
    return pltpu.force_tpu_interpret_mode()
