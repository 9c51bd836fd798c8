"""What the bench's `tokamax` peer row needs to run tokamax 0.0.12 inside `jax-attn bench`.

Two things stop that release there, neither in its kernels (H200, round 9):

- tokamax reads absl flags and, on first use, parses `sys.argv` as them; the bench's own
  arguments (`--shapes ...`) are not its flags, so it raised `UnrecognizedFlagError`. The flags
  are marked parsed (their defaults) when nothing parsed them yet.
- Its Mosaic GPU kernels call `plgpu.kernel(..., out_shape=..., scratch_shapes=...)`, names JAX
  0.11.2 removed (0.11.1 still took them as deprecated aliases of `out_type` / `scratch_types`).
  Where the installed JAX lacks them, tokamax's modules get a `plgpu` whose `kernel` renames the
  two; JAX's own module is left as it is.
"""
from __future__ import annotations

import importlib
import inspect
import logging
import sys

log = logging.getLogger(__name__)

RENAMED = {"out_shape": "out_type", "scratch_shapes": "scratch_types"}
# tokamax 0.0.12's Hopper forward and backward (what `implementation="mosaic"` runs on sm90)
KERNEL_MODULES = ("tokamax._src.ops.attention.pallas_mosaic_gpu_kernel_sm90",
                  "tokamax._src.ops.attention.pallas_mosaic_gpu_vjp_kernel_sm90")


class _RenamingPlgpu:
    """`jax.experimental.pallas.mosaic_gpu` as tokamax calls it: `kernel` takes the old names."""

    def __init__(self, plgpu):
        self._plgpu = plgpu

    def __getattr__(self, name):
        return getattr(self._plgpu, name)

    def kernel(self, *args, **kwargs):
        for old, new in RENAMED.items():
            if old in kwargs:
                kwargs[new] = kwargs.pop(old)
        return self._plgpu.kernel(*args, **kwargs)


def kernel_needs_renames(plgpu) -> bool:
    """Whether this JAX's `plgpu.kernel` lacks the keywords tokamax 0.0.12 passes."""
    params = inspect.signature(plgpu.kernel).parameters
    return any(old not in params and new in params for old, new in RENAMED.items())


def prepare():
    """Import tokamax ready for the bench; returns the module."""
    from absl import flags
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    import tokamax
    from jax.experimental.pallas import mosaic_gpu as plgpu
    if kernel_needs_renames(plgpu):
        shim = _RenamingPlgpu(plgpu)
        patched = []
        for name in KERNEL_MODULES:  # loaded now, so that the loop below finds them
            try:
                importlib.import_module(name)
            except ImportError as e:
                log.warning("tokamax: %s not importable (%s)", name, e)
        for name, module in list(sys.modules.items()):
            if name.startswith("tokamax") and getattr(module, "plgpu", None) is plgpu:
                module.plgpu = shim
                patched.append(name)
        if patched:  # a later call finds them patched already
            log.info("tokamax: this JAX's plgpu.kernel no longer takes %s; renamed for %d "
                     "tokamax modules", ", ".join(RENAMED), len(patched))
    return tokamax
