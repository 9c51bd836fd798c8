"""Sharding rules for the flash-attention kernels: batch/head-sharded inputs run shard by shard.

A `pallas_call` is an opaque custom call to XLA's SPMD partitioner, whose default for one is to
replicate it: under `jit`, q, k, v sharded over batch or heads would be all-gathered onto every
device first. Each kernel invocation (the forward, producing `(out, lse)`, and the backward,
producing `(dq, dk, dv)`) is therefore wrapped in `jax.experimental.custom_partitioning`, with
rules for both partitioners (GSPMD: `infer_sharding_from_operands` + `partition`; Shardy:
`sharding_rule`), so that:

- the batch and head dimensions of every operand and result keep the operands' sharding (q's,
  else k's) and each device runs the kernel on its local shard, with no communication. Masks,
  biases, `kv_lengths` and segment ids follow on the dimensions they have; their size-1
  (broadcast) dimensions stay replicated;
- GQA: q heads and k/v heads are split by the same shard count, which must divide `n_kv`
  (shard i then holds q heads `[i*n/P, (i+1)*n/P)` and exactly the k/v heads they read);
  otherwise the head dimension is replicated;
- sequence and head-dim (d) dimensions are always replicated: if they were sharded, the rule asks
  for replication, which makes XLA all-gather them (correct, slower). Every such fallback is
  logged once, with its reason (logger `jax_attn.kernels.sharding`, level WARNING).

The kernels read their batch/head extents from the (local) shapes, and nothing in `KernelCall`
(or Mosaic's `MosaicCall`) depends on them, so the local call is the unsharded kernel on smaller
arrays (the per-block segment-id ranges are computed inside it, from the local ids). On one
device, or inside a `shard_map` over every mesh axis (`jax_attn.shard_local`),
`custom_partitioning` lowers to the kernel directly; with a single device in the process the
wrapper is skipped altogether.

`custom_partitioning` has no `vmap` rule, so the wrapped call carries a `custom_vmap` whose rule
vmaps the plain kernel call (as before this module existed): batched calls are not partitioned.
"""
from __future__ import annotations

import functools
import logging

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

try:  # present in every JAX this package supports; guarded so a missing one only loses sharding
    from jax.experimental.custom_partitioning import custom_partitioning
    from jax.experimental.custom_partitioning import ArrayMapping, SdyShardingRule
except ImportError:  # pragma: no cover
    custom_partitioning = None

log = logging.getLogger(__name__)
_logged: set = set()

# What each operand/result of the kernels is, by role. "q": q-like (b, n, sq, d) in the call's
# layout ("o": same with dv: out, do); "k"/"v": (b, n_kv, skv, d|dv); "row": (b, n, sq) (lse,
# its cotangent); "key_bias": (b|1, n|1, skv); "bias": (b|1, n|1, sq, skv); "len": (b,);
# "qseg"/"kseg": segment ids (b, sq) / (b, skv). The segment ids come last (after the backward's
# o/row operands too) so that kernels without them (Mosaic) keep their argument order.
_MASKS = ("key_bias", "bias", "len")
_SEGMENTS = ("qseg", "kseg")
_FWD_IN = ("q", "k", "v") + _MASKS + _SEGMENTS
_FWD_OUT = ("o", "row")
_BWD_IN = ("q", "k", "v") + _MASKS + ("o", "row", "o", "row") + _SEGMENTS
_BWD_OUT = ("q", "k", "v")


def triton_operands(st):
    """Which optional operands a call of the Triton kernels gets: `{role: passed}`."""
    return {"key_bias": bool(st.key_bias_dims), "bias": bool(st.bias_dims),
            "len": st.has_kv_lengths, "qseg": st.has_segments, "kseg": st.has_segments}


def _present(passed, roles):
    """The roles of the operands actually passed (None masks are dropped by pytree flattening).
    A segment role `operands` does not mention is absent (kernels that predate them)."""
    return tuple(r for r in roles if passed.get(r, r not in _SEGMENTS))


def _positions(role, layout):
    """`{meaning: dim}`: b (batch), n (q heads), m (k/v heads), s (queries), t (keys), d, e."""
    seq, head = (2, 1) if layout == "bnsd" else (1, 2)
    if role in ("q", "o"):
        return {"b": 0, "n": head, "s": seq, ("d" if role == "q" else "e"): 3}
    if role in ("k", "v"):
        return {"b": 0, "m": head, "t": seq, ("d" if role == "k" else "e"): 3}
    return {"row": {"b": 0, "n": 1, "s": 2}, "key_bias": {"b": 0, "n": 1, "t": 2},
            "bias": {"b": 0, "n": 1, "s": 2, "t": 3}, "len": {"b": 0},
            "qseg": {"b": 0, "s": 1}, "kseg": {"b": 0, "t": 1}}[role]


def _warn_once(msg):
    if msg not in _logged:
        _logged.add(msg)
        log.warning("flash_attention sharding fallback: %s", msg)


def _spec(sharding, ndim):
    spec = getattr(sharding, "spec", None)
    if spec is None:
        return (None,) * ndim
    return tuple(spec) + (None,) * (ndim - len(spec))


def _names(entry):
    if entry is None:
        return ()
    return tuple(entry) if isinstance(entry, (tuple, list)) else (entry,)


def _size(mesh, entry):
    size = 1
    for a in _names(entry):
        size *= mesh.shape[a]
    return size


def _plan(st, mesh, arg_shapes, roles):
    """`(batch_entry, head_entry)`: the mesh axes the batch and the heads stay split over.

    `roles`: those of the operands passed, in order."""
    shapes = {}
    for role, a in zip(roles, arg_shapes):
        shapes.setdefault(role, (a.shape, _spec(a.sharding, len(a.shape))))
    pos_q, pos_k = _positions("q", st.layout), _positions("k", st.layout)
    (q_shape, q_spec), (k_shape, k_spec) = shapes["q"], shapes["k"]
    batch = q_spec[0] if q_spec[0] is not None else k_spec[0]
    head = q_spec[pos_q["n"]] if q_spec[pos_q["n"]] is not None else k_spec[pos_k["m"]]
    b, n, n_kv = q_shape[0], q_shape[pos_q["n"]], k_shape[pos_k["m"]]

    # Whatever is sharded beyond batch and heads gets gathered: say so, once per reason.
    for role, a in zip(roles, arg_shapes):
        spec = _spec(a.sharding, len(a.shape))
        for meaning, dim in _positions(role, st.layout).items():
            if meaning in ("s", "t", "d", "e") and spec[dim] is not None:
                what = {"s": "query sequence", "t": "key sequence", "d": "head dim",
                        "e": "value head dim"}[meaning]
                _warn_once(f"the {what} (dim {dim} of a {role!r} operand) is sharded over "
                           f"{spec[dim]!r}; the kernel needs it whole, so it is all-gathered")
    if batch is not None and b % _size(mesh, batch):
        _warn_once(f"batch {b} does not divide over {batch!r} (size {_size(mesh, batch)}): "
                   "batch replicated")
        batch = None
    if head is not None:
        shards = _size(mesh, head)
        if n_kv % shards or n % shards:
            _warn_once(f"heads (q {n}, k/v {n_kv}) do not divide over {head!r} (size {shards}); "
                       "q and k/v heads must split alike: head dim replicated")
            head = None
        elif set(_names(head)) & set(_names(batch)):
            _warn_once(f"batch ({batch!r}) and heads ({head!r}) share mesh axes: "
                       "head dim replicated")
            head = None
    return batch, head


def _sharding(mesh, role, shape, layout, batch, head):
    spec = [None] * len(shape)
    for meaning, dim in _positions(role, layout).items():
        if shape[dim] == 1:
            continue  # a broadcast dimension: the same values on every shard
        if meaning == "b":
            spec[dim] = batch
        elif meaning in ("n", "m"):
            spec[dim] = head
    return NamedSharding(mesh, P(*spec))


def _shardings(st, mesh, shapes, roles, batch, head):
    return [_sharding(mesh, r, s, st.layout, batch, head) for r, s in zip(roles, shapes)]


def _unflatten(template, flat):
    """`flat` laid out like `template`'s non-None entries (None masks stay None)."""
    it = iter(flat)
    return tuple(None if t is None else next(it) for t in template)


def _shapes(tree):
    return [x.shape for x in jax.tree.leaves(tree)]


def _make(local, roles_in, roles_out, operands):
    """`local(st, *arrays)` wrapped in custom_partitioning (static `st`) and custom_vmap."""

    def ins(st):
        return _present(operands(st), roles_in)

    def infer(st, mesh, arg_shapes, result_shape):
        batch, head = _plan(st, mesh, jax.tree.leaves(arg_shapes), ins(st))
        return tuple(_shardings(st, mesh, _shapes(result_shape), roles_out, batch, head))

    def partition(st, mesh, arg_shapes, result_shape):
        flat = jax.tree.leaves(arg_shapes)
        batch, head = _plan(st, mesh, flat, ins(st))
        arg_sh = _unflatten(arg_shapes, _shardings(st, mesh, [a.shape for a in flat], ins(st),
                                                   batch, head))
        out_sh = tuple(_shardings(st, mesh, _shapes(result_shape), roles_out, batch, head))
        return mesh, functools.partial(local, st), out_sh, arg_sh

    def rule(st, mesh, operand_types, result_types):
        """Shardy: batch and heads pass through; sequences and head dims must be whole."""
        unique = iter(f"u{i}" for i in range(10_000))

        def mapping(role, ty):
            names = ["?"] * len(ty.shape)
            for meaning, dim in _positions(role, st.layout).items():
                broadcast = ty.shape[dim] == 1 and meaning in ("b", "n", "m")
                names[dim] = next(unique) if broadcast else meaning  # size 1: its own factor
            return ArrayMapping(*names)

        in_maps = tuple(mapping(r, t) for r, t in zip(ins(st), operand_types))
        outs = tuple(mapping(r, t) for r, t in zip(roles_out, result_types))
        order = list(dict.fromkeys(f for m in in_maps + outs for f in m))  # Shardy's factor indices
        return SdyShardingRule(in_maps, outs, need_replication_factors=tuple(
            f for f in order if f in ("s", "t", "d", "e")))

    cp = custom_partitioning(local, static_argnums=(0,))
    cp.def_partition(partition=partition, infer_sharding_from_operands=infer, sharding_rule=rule)

    def call(st, *args):
        if jax.device_count() == 1 or _inside_shard_map():
            return local(st, *args)

        @jax.custom_batching.custom_vmap
        def f(*args):
            return cp(st, *args)

        @f.def_vmap
        def _(axis_size, in_batched, *args):
            axes = jax.tree.map(lambda b: 0 if b else None, tuple(in_batched))
            out = jax.vmap(functools.partial(local, st), in_axes=axes)(*args)
            return out, jax.tree.map(lambda _: True, out)

        return f(*args)

    return call


def _inside_shard_map() -> bool:
    """True while tracing inside a `shard_map` (some mesh axis manual): the arrays are local.

    Over every axis (`shard_local`, `sequence_parallel`) custom_partitioning would lower to the
    plain call anyway; over some of them, its GSPMD callbacks cannot read the partly manual
    shardings (a fatal error in XLA), so the kernel is called as it was before this module.
    """
    get = getattr(jax.sharding, "get_abstract_mesh", None)
    if get is None:  # an older JAX: its shard_map lowers custom_partitioning to the plain call
        return False
    try:
        return bool(getattr(get(), "manual_axes", ()))
    except Exception:  # pragma: no cover - no mesh machinery to ask
        return False


def partitioned(local, kind, operands=triton_operands):
    """The kernel call `local(st, *arrays)` made shard-aware; `kind` is "fwd" or "bwd".

    `local` takes the operands of `_FWD_IN` (or `_BWD_IN`) in that order, an absent mask as None;
    `operands(st)` says which optional ones (`key_bias`, `bias`, `len`, `qseg`, `kseg`) a call
    gets, and a kernel without a role's parameter at all (Mosaic has no full bias) reports it
    absent (segment roles it does not mention count as absent).
    """
    if custom_partitioning is None:  # pragma: no cover
        return local
    roles = (_FWD_IN, _FWD_OUT) if kind == "fwd" else (_BWD_IN, _BWD_OUT)
    return _make(local, *roles, operands)
