"""autotune: find how a network should combine Dropout and BatchNorm."""

from __future__ import annotations

__version__ = "0.1.0"
