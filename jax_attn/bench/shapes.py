"""Benchmark shapes and the named shape sets.

A `Shape` is one `(b, n, sq, skv, d)` problem with its dtype; it knows its FLOP count (for
TFLOP/s), the bytes one call touches (for sizing input rotation against the L2 cache) and the
size of its score matrix (to skip materializing backends that could not fit). `SHAPE_SETS` are the
named sets `--shapes` picks from; `select_shapes` turns parsed options into the list a run covers.
Kept apart so every other part of the bench (runners, gate, report) can share one notion of a
shape without importing JAX or torch.
"""
from __future__ import annotations

import dataclasses
import math

MODES = ("fwd", "fwd+bwd")
MiB, GiB = 2.0 ** 20, 2.0 ** 30


@dataclasses.dataclass(frozen=True)
class Shape:
    """One benchmark shape, `(b, n, sq, skv, d)` with `n_kv = n` and `dv = d`, in `(b, n, s, d)`."""

    b: int
    n: int
    sq: int
    skv: int
    d: int
    dtype: str = "bfloat16"

    @property
    def name(self) -> str:
        return f"{self.b}x{self.n}x{self.sq}x{self.skv}x{self.d}"

    def spec(self):
        from ..contract import Spec
        return Spec(self.b, self.n, self.n, self.sq, self.skv, self.d, self.d, self.dtype,
                    scale=1.0 / math.sqrt(self.d))

    def flops(self, mode: str) -> float:
        """Matmul FLOPs: 4*b*n*sq*skv*d forward; forward+backward 3.5x that (backward is 2.5x)."""
        spec = self.spec()
        return spec.flops(False) + (spec.flops(True) if mode == "fwd+bwd" else 0.0)

    def set_bytes(self, mode: str) -> int:
        """Bytes one call reads and writes at least (q, k, v, out; plus dout and dq, dk, dv)."""
        item = 4 if self.dtype == "float32" else 8 if self.dtype == "float64" else 2
        qo = 2 * self.b * self.n * self.sq * self.d
        kv = 2 * self.b * self.n * self.skv * self.d
        return item * ((qo + kv) * (2 if mode == "fwd+bwd" else 1) + (qo // 2 if mode == "fwd+bwd" else 0))

    def score_bytes(self) -> int:
        return self.b * self.n * self.sq * self.skv * 4


SHAPE_SETS = {
    # Stable Diffusion 1.x/2.x (d=40, 64) self- and cross-attention at 64x64 latents, SD3/Flux-like
    # joint attention (d=128), and a video/high-resolution 16k-token sequence.
    "diffusion": [Shape(2, 8, 4096, 4096, 40), Shape(2, 8, 4096, 77, 40), Shape(2, 10, 4096, 4096, 64),
                  Shape(2, 10, 4096, 77, 64), Shape(1, 24, 4608, 4608, 128), Shape(1, 40, 16384, 16384, 128)],
    # Seconds on a CPU: for CI and smoke tests.
    "tiny": [Shape(1, 2, 128, 128, 32, "float32"), Shape(1, 2, 128, 77, 40, "float32"),
             Shape(2, 2, 256, 256, 64, "float32")],
    # Memory against sequence length (use with --memory-only): linear vs quadratic backends.
    "seqsweep": [Shape(1, 8, s, s, 64) for s in (1024, 2048, 4096, 8192, 16384)],
}


def select_shapes(args) -> list[Shape]:
    import jax
    default_dtype = args.dtype or ("bfloat16" if jax.default_backend() == "gpu" else "float32")
    shapes = []
    for name in args.shapes or ():
        shapes += [dataclasses.replace(s, dtype=args.dtype) if args.dtype else s for s in SHAPE_SETS[name]]
    shapes += [Shape(*dims, default_dtype) for dims in args.shape or ()]
    if not shapes:
        shapes = list(SHAPE_SETS["diffusion" if jax.default_backend() == "gpu" else "tiny"])
    return list(dict.fromkeys(shapes))
