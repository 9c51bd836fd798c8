"""The backend registry, in default preference order."""
from __future__ import annotations

from .base import Backend, Needs, gpu_compute_capability, platform
from .chunked import Chunked
from .cudnn import CuDNN
from .fa4 import FA4
from .naive import Naive
from .pallas import Pallas
from .sage import Sage, Sage16
from .tpu import TPU
from .xla import XLA

BACKENDS: dict[str, Backend] = {b.name: b for b in (
    Pallas(),
    FA4(),
    CuDNN(),
    TPU(),
    XLA(),
    Chunked(),
    Naive(),
    Sage(),  # lossy: never chosen automatically
    Sage16(),  # lossy (less): never chosen automatically
)}

__all__ = ["BACKENDS", "Backend", "Needs", "gpu_compute_capability", "platform"]
