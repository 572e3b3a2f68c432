"""Device layers the engine drives. `cupy` is imported only inside stated.backends.cuda."""

from stated.backends.base import Backend
from stated.backends.cpu import CpuBackend

__all__ = ["Backend", "CpuBackend"]
