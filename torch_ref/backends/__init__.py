"""The torch backend registry, in default preference order."""
from __future__ import annotations

from .base import Backend, installed
from .chunked import Chunked
from .external import FlashAttn, SageAttention, XFormers
from .naive import Naive
from .sdpa import SDPA, SDPACuDNN, SDPAEfficient, SDPAFlash, SDPAMath

BACKENDS: dict[str, Backend] = {b.name: b for b in (
    FlashAttn(), XFormers(), SageAttention(), SDPA(), SDPAFlash(), SDPAEfficient(), SDPACuDNN(),
    SDPAMath(), Chunked(), Naive())}

__all__ = ["BACKENDS", "Backend", "installed"]
