"""The backend registry, in default preference order."""
from __future__ import annotations

from .base import Backend, Needs, gpu_compute_capability, platform
from .chunked import Chunked
from .cudnn import CuDNN
from .naive import Naive
from .pallas import Pallas
from .xla import XLA

BACKENDS: dict[str, Backend] = {b.name: b for b in (Pallas(), CuDNN(), XLA(), Chunked(), Naive())}

__all__ = ["BACKENDS", "Backend", "Needs", "gpu_compute_capability", "platform"]
