"""jax-attn as an attention kernel of MaxDiffusion (github.com/AI-Hypercomputer/maxdiffusion).

    import jax_attn.adapters.maxdiffusion as jam
    jam.register()          # then set `attention: jax_attn` (or jax_attn_ulysses, jax_attn_ring)

How MaxDiffusion calls an attention kernel (models/attention_flax.py, checked against the
repository as of August 2026): `AttentionOp` / `NNXAttentionOp.apply_attention` call
`_apply_attention(query, key, value, heads=..., attention_kernel=..., mesh=..., axis_names_q=...,
...)`, which falls back to "dot_product" for that name or for `use_memory_efficient_attention`,
turns the mask into a bool keep mask of shape `[B, K]`, builds a `context` dict and calls
`KERNEL_REGISTRY[attention_kernel](query, key, value, context)`. `kernel` below has exactly that
signature; `register()` adds it to `KERNEL_REGISTRY`. MaxDiffusion releases from before the
registry (April 2026) get `_apply_attention` wrapped instead: our names go to `kernel`, every
other name to the original.

What `kernel` receives and returns:
- q, k, v either `(b, s, heads * d)` (heads merged, the projections' output) or `(b, heads, s, d)`
  (split, as `FlaxWanAttention` passes them after RoPE), all three alike. k/v may have fewer heads
  than q (GQA) in either layout. The output is always `(b, sq, heads * dv)`, as MaxDiffusion's
  kernels return it, in q's dtype.
- `context["scale"]` is the logit scale (MaxDiffusion's flash kernels get it folded into k; we
  pass it to `attention_forward` instead), `context["is_causal"]` (absent = False).
- `context["attention_mask"]`: None or a keep mask `[B|1, K]` (True/nonzero = attend). A key no
  mask keeps is dropped outright (MaxDiffusion's dot-product path adds a -10000 bias); a query
  whose keys are all dropped returns zeros, as MaxDiffusion's flash kernels do.

Mesh: `context["axis_names_q"]` / `["axis_names_kv"]` are logical names `(batch, heads, length,
d_kv)`; they are resolved with `flax.linen.logical_to_mesh_axes` under the logical axis rules in
force, the same way MaxDiffusion's own kernels resolve them (its config installs rules according
to the kernel's name: "ring"/"ulysses" in the name put both q and k/v lengths on `context`, other
names put only the q length there; `jax_attn_ring` and `jax_attn_ulysses` are named so that those
rules apply). Mesh axes of size 1 are ignored. Then, per call:
- q length on a mesh axis and k/v length on the same axis, for self-attention: sequence parallel
  over it (`jax_attn.sequence_parallel`): Ulysses (all-to-all) for "jax_attn_ulysses", the ring
  for "jax_attn_ring", and for "jax_attn" Ulysses when the heads (per head shard) divide by the
  axis size, else the ring (the two compute the same function; only the communication differs).
- cross-attention (k/v length differs from q's: text or image tokens), or k/v length on no mesh
  axis: queries split over the q length axis with k/v whole on every device
  (`jax_attn.shard_local(query_axis=...)`): short text K/V are replicated, not passed round.
- batch and heads split over their axes in both cases (`batch_axis`, `head_axis`). A batch or
  head count that does not divide over its axes is left unsplit on that axis (logged once):
  MaxDiffusion itself only warns there (model evaluation with an odd batch), and the result is the
  same, only its placement differs.
- A `d_kv` dimension on a mesh axis, or q and k/v lengths on different axes, raise `ValueError`.

Not used: `flash_block_sizes`, `use_base2_exp`, `use_experimental_scheduler`, `ulysses_shards`,
`ulysses_attention_chunks`, `dpa_layer`, `float32_qk_product`, `split_head_dim` (tuning and layout
of the TPU/TE kernels; jax-attn picks its own). `mask_padding_tokens=False` lets MaxDiffusion's
splash kernel attend to its own block padding for speed; we add no padding that could be attended
to, so it changes nothing. `residual_checkpoint_name` names the output (`checkpoint_name`) so a
remat policy that saves that name keeps the attention result.
"""
from __future__ import annotations

import importlib
import logging
import math

import jax.numpy as jnp

from ..api import attention_forward
from ..parallel import sequence_parallel, shard_local
from ..parallel.layout import _names

log = logging.getLogger(__name__)

# Kernel names registered by default, and the sequence-parallel method each asks for.
KERNELS = {"jax_attn": "auto", "jax_attn_ulysses": "ulysses", "jax_attn_ring": "ring"}
_logged: set = set()


def _log_once(msg, *args):
    key = (msg,) + args
    if key not in _logged:
        _logged.add(key)
        log.warning(msg, *args)


# ---- layouts --------------------------------------------------------------------------------
def _split(x, name, head_dim, heads=None):
    """(b, s, n*d) -> (b, s, n, d) with n = heads or width // head_dim; rank 4 passes through."""
    b, s, width = x.shape
    if heads is not None:
        if width % heads:
            raise ValueError(f"maxdiffusion kernel: {name} of shape {x.shape} has {width} channels, "
                             f"not divisible by context['heads'] = {heads}")
        return x.reshape(b, s, heads, width // heads)
    if width % head_dim:
        raise ValueError(f"maxdiffusion kernel: {name} of shape {x.shape} has {width} channels, not a "
                         f"multiple of the query head dim {head_dim}")
    return x.reshape(b, s, width // head_dim, head_dim)


def _layout(q, k, v, heads):
    """q, k, v in one of jax_attn's layouts (no transpose) and that layout's name."""
    if not (q.ndim == k.ndim == v.ndim) or q.ndim not in (3, 4):
        raise ValueError("maxdiffusion kernel: query, key and value must all be (b, s, heads*d) or all "
                         f"(b, heads, s, d); got shapes {q.shape}, {k.shape}, {v.shape}")
    if q.ndim == 4:
        if q.shape[1] != heads:
            raise ValueError(f"maxdiffusion kernel: query of shape {q.shape} has {q.shape[1]} heads in "
                             f"axis 1 (b, heads, s, d), context['heads'] = {heads}")
        return q, k, v, "bnsd"
    q = _split(q, "query", None, heads)
    # k/v split with q's head dim for k and their own width over the same head count for v, so
    # GQA (fewer k/v heads) and a value head dim that differs from d both come through.
    k = _split(k, "key", q.shape[-1])
    v_heads = k.shape[2]
    if v.shape[-1] % v_heads:
        raise ValueError(f"maxdiffusion kernel: value of shape {v.shape} does not split into the "
                         f"{v_heads} heads of key")
    v = v.reshape(v.shape[0], v.shape[1], v_heads, v.shape[-1] // v_heads)
    return q, k, v, "bsnd"


def _merge(out, layout):
    """Output in MaxDiffusion's (b, sq, heads * dv)."""
    if layout == "bnsd":
        out = jnp.swapaxes(out, 1, 2)
    return out.reshape(out.shape[0], out.shape[1], -1)


def _keep_mask(mask, batch, kv_len):
    """`[B|1, K]` keep mask -> bool (B|1, 1, 1, K) for attention_forward."""
    if mask is None:
        return None
    if not hasattr(mask, "shape") or mask.ndim != 2:
        raise ValueError("maxdiffusion kernel: context['attention_mask'] must be a [batch, kv_length] keep "
                         f"mask, got shape {getattr(mask, 'shape', type(mask).__name__)}")
    if mask.shape[0] not in (1, batch) or mask.shape[1] != kv_len:
        raise ValueError(f"maxdiffusion kernel: context['attention_mask'] of shape {mask.shape} does not "
                         f"match (batch, kv_length) = ({batch}, {kv_len})")
    if jnp.issubdtype(mask.dtype, jnp.floating):
        # The dispatcher hands non-dot-product kernels a keep mask; a float here would be a bias,
        # which 0/1 semantics would misread.
        raise TypeError(f"maxdiffusion kernel: context['attention_mask'] must be a bool/integer keep mask, "
                        f"got {mask.dtype} (an additive bias?)")
    return (mask != 0)[:, None, None, :]


# ---- mesh -----------------------------------------------------------------------------------
def _mesh_axes(logical, mesh):
    """Logical names (batch, heads, length, d_kv) -> per-dim tuples of mesh axes of size > 1."""
    if logical is None:
        return ((),) * 4
    import flax.linen as nn
    spec = tuple(nn.logical_to_mesh_axes(tuple(logical)))
    spec = spec + (None,) * (4 - len(spec))
    return tuple(tuple(a for a in _names(entry) if mesh.shape.get(a, 1) > 1) for entry in spec[:4])


def _entry(axes):
    return None if not axes else axes[0] if len(axes) == 1 else axes


def _divisible(axes, count, mesh, what):
    size = math.prod(mesh.shape[a] for a in axes)
    if axes and count % size:
        _log_once("jax_attn maxdiffusion kernel: %s %d does not divide over mesh axes %s (size %d); "
                  "left unsplit there", what, count, axes, size)
        return ()
    return axes


def _plan(q, k, layout, context, method):
    """The jax_attn parallel context for this call (or None: one plain call)."""
    mesh = context.get("mesh")
    if mesh is None or mesh.size == 1:
        return None
    q_axes = _mesh_axes(context.get("axis_names_q"), mesh)
    kv_axes = _mesh_axes(context.get("axis_names_kv"), mesh)
    if q_axes[3] or kv_axes[3]:
        raise ValueError("maxdiffusion kernel: the head dim (d_kv) of axis_names_q/axis_names_kv is mapped "
                         f"to mesh axes {q_axes[3] or kv_axes[3]}; attention needs whole heads")
    seq, head = (2, 1) if layout == "bnsd" else (1, 2)
    batch_ax = _divisible(q_axes[0], q.shape[0], mesh, "batch")
    head_ax = _divisible(q_axes[1], math.gcd(q.shape[head], k.shape[head]), mesh, "head count")
    q_seq, kv_seq = q_axes[2], kv_axes[2]
    if set(q_seq) & set(batch_ax + head_ax):  # an axis splits one dimension only
        raise ValueError(f"maxdiffusion kernel: mesh axes {q_seq} split both the query length and the "
                         "batch or heads")
    cross = k.shape[seq] != q.shape[seq]
    # Causal self-attention with only the queries split would need shard_local(query_axis), which
    # cannot place a query against whole keys causally: split k/v with the queries instead.
    causal_self = bool(context.get("is_causal", False)) and not cross
    if q_seq and not cross and (kv_seq or causal_self):
        if kv_seq and kv_seq != q_seq:
            raise ValueError(f"maxdiffusion kernel: query length on mesh axes {q_seq} but key/value length on "
                             f"{kv_seq}; sequence parallelism needs one axis for both")
        if method == "auto":
            size = math.prod(mesh.shape[a] for a in q_seq)
            head_size = math.prod(mesh.shape[a] for a in head_ax)
            method = "ulysses" if (q.shape[head] // head_size) % size == 0 else "ring"
        return sequence_parallel(mesh, _entry(q_seq), method, batch_axis=_entry(batch_ax),
                                 head_axis=_entry(head_ax))
    if not (q_seq or batch_ax or head_ax):
        return None
    return shard_local(mesh, batch_axis=_entry(batch_ax), head_axis=_entry(head_ax),
                       query_axis=_entry(q_seq))


# ---- the kernel -----------------------------------------------------------------------------
def make_kernel(method: str = "auto", backend=None):
    """A MaxDiffusion kernel `fn(query, key, value, context) -> (b, sq, heads * dv)`.

    Args:
      method: sequence parallelism when q and k/v lengths share a mesh axis: "ulysses", "ring" or
        "auto" (Ulysses when the heads divide over the axis, else the ring).
      backend: jax_attn backend choice for each device's share (None = automatic routing).
    """
    if method not in ("auto", "ulysses", "ring"):
        raise ValueError(f"method must be 'auto', 'ulysses' or 'ring', got {method!r}")

    def kernel(query, key, value, context):
        heads = context["heads"]
        q, k, v, layout = _layout(query, key, value, heads)
        seq = 2 if layout == "bnsd" else 1
        mask = _keep_mask(context.get("attention_mask"), q.shape[0], k.shape[seq])
        plan = _plan(q, k, layout, context, method)
        kw = dict(attn_mask=mask, scale=context["scale"], is_causal=bool(context.get("is_causal", False)),
                  layout=layout, backend=backend)
        if plan is None:
            out = attention_forward(q, k, v, **kw)
        else:
            with plan:
                out = attention_forward(q, k, v, **kw)
        out = _merge(out, layout)
        name = context.get("residual_checkpoint_name")
        if name:
            from jax.ad_checkpoint import checkpoint_name
            out = checkpoint_name(out, name)
        return out

    kernel.__name__ = f"jax_attn_kernel_{method}"
    return kernel


kernel = make_kernel()


# ---- registration ---------------------------------------------------------------------------
def _module():
    try:
        return importlib.import_module("maxdiffusion.models.attention_flax")
    except ImportError as e:
        raise ImportError("jax_attn.adapters.maxdiffusion.register() needs MaxDiffusion "
                          "(maxdiffusion.models.attention_flax), which could not be imported: "
                          f"{e}. Install it from github.com/AI-Hypercomputer/maxdiffusion "
                          "(it is not on PyPI).") from e


def register(kernels=None, *, backend=None, module=None):
    """Make jax_attn's kernels selectable by name in MaxDiffusion (`attention: jax_attn`).

    Args:
      kernels: `{name: method}` to register (default `KERNELS`: "jax_attn" (auto),
        "jax_attn_ulysses", "jax_attn_ring").
      backend: jax_attn backend choice for the local attention (None = automatic).
      module: the module holding MaxDiffusion's dispatch (default
        `maxdiffusion.models.attention_flax`; tests pass a stand-in).
    Returns the names registered. Idempotent: registering again replaces our entries.
    Raises ImportError (with the reason) when MaxDiffusion cannot be imported, and ValueError
    when a name is already one of MaxDiffusion's own kernels.
    """
    mod = _module() if module is None else module
    kernels = dict(KERNELS if kernels is None else kernels)
    fns = {name: make_kernel(method, backend) for name, method in kernels.items()}
    registry = getattr(mod, "KERNEL_REGISTRY", None)
    if isinstance(registry, dict):
        for name, fn in fns.items():
            old = registry.get(name)
            if old is not None and not getattr(old, "_jax_attn", False):
                raise ValueError(f"register: {name!r} is already a MaxDiffusion kernel ({old!r}); pick "
                                 "another name")
            fn._jax_attn = True
            registry[name] = fn
        return sorted(fns)
    # A release before the registry: route our names around its if/elif dispatch.
    original = getattr(mod, "_apply_attention", None)
    if original is None:
        raise ImportError(f"{getattr(mod, '__name__', mod)} has neither KERNEL_REGISTRY nor _apply_attention; "
                          "this MaxDiffusion version is not supported by jax_attn.adapters.maxdiffusion")
    original = getattr(original, "_jax_attn_original", original)

    def _apply_attention(query, key, value, *args, **kwargs):
        name = kwargs.get("attention_kernel")
        if name in fns and not args and not kwargs.get("use_memory_efficient_attention", False):
            mask = kwargs.get("attention_mask")
            context = dict(kwargs, attention_mask=mask)
            return fns[name](query, key, value, context)
        return original(query, key, value, *args, **kwargs)

    _apply_attention._jax_attn_original = original
    mod._apply_attention = _apply_attention
    return sorted(fns)


__all__ = ["KERNELS", "kernel", "make_kernel", "register"]
