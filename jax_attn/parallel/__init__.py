"""Attention over several devices, on JAX's own SPMD machinery (`Mesh`, `shard_map`, collectives).

Inputs sharded over batch and/or heads (a `NamedSharding`, under `jit`) need no context: every
backend then runs shard-local with no all-gather of q, k, v, forward and backward. `xla`,
`chunked` and `naive` are plain jnp, which XLA's partitioner splits by itself; the `pallas` Triton
kernel carries its own `custom_partitioning` rules (`jax_attn/kernels/sharding.py`: batch/heads
stay split, GQA when the head shards divide `n_kv`, sequences and head dims gathered with a logged
warning); `cudnn` goes through JAX's cuDNN binding, which has partitioning rules of its own (batch
and heads only: JAX rejects sequence-sharded inputs there). Checked on 8 CPU devices by the
compiled HLO, under Shardy and GSPMD (tests/test_pallas_sharding.py; cudnn only by JAX's source).
The Mosaic GPU variant of `pallas` (`JAX_ATTN_PALLAS_KERNEL`) is not wrapped: give it
`shard_local`.

Two contexts change what `attention_forward` does with the arrays it is given; outside them it
costs one context-variable lookup and nothing else.

- `shard_local(mesh, batch_axis=..., head_axis=..., query_axis=...)`: each device runs the chosen
  backend on its own batch/head (and optionally query) shard inside `shard_map`, no communication.
- `sequence_parallel(mesh, axis_name, method="ulysses" | "ring")`: q, k, v split along the
  sequence; "ulysses" trades sequence shards for head shards with `all_to_all`, "ring" passes
  key/value blocks round with `ppermute` and merges by log-sum-exp.
  `sequence_parallel(mesh, axis_name, ring_axis=...)`: both, over two mesh axes (Ulysses over
  `axis_name`, a ring over `ring_axis`).

The modules:

- `context`: the two contexts, the `Plan` they install, and `sequence_parallel_forward`, the hook
  `attention_forward` calls.
- `sharded`: wrapping one call in `shard_map` (specs, padding, validation), or running it inside
  the caller's own `shard_map`.
- `ulysses`, `ring`, `hybrid`: the sequence-parallel methods, run per device inside the `shard_map`.
- `ring_backward`: the ring's per-block backward from the global (out, lse), by backend.
- `layout`: small helpers the others share (mesh axis names, layout axes, padding, local calls).
"""
from .context import METHODS, Plan, current_plan, sequence_parallel, sequence_parallel_forward, shard_local
from .ring import _grad_backend, _merge, _ring, _Ring, _ring_fn
from .sharded import _manual, _shard_map, _sharded
from .ulysses import _ulysses

__all__ = ["METHODS", "Plan", "current_plan", "sequence_parallel", "sequence_parallel_forward", "shard_local"]
