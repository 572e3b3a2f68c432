"""The CPU backend: kernels run with torch directly on the host pages and the shared-memory arenas.

Host pages are the kernels' own buffers, so staging is the identity and there is nothing to wait for.
The algorithms' CPU updates use torch's fused CPU kernels, which reach the memory-bandwidth ceiling
(PERFORMANCE.md).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from stated.backends.base import Backend
from stated_kernels.spec import Algorithm, Hyperparameters, Segment


class CpuBackend(Backend):
    name = "cpu"

    def stage_in(self, page: int, host: torch.Tensor) -> torch.Tensor:
        return host

    def launch(self, algorithm: Algorithm, segments: Sequence[Segment], hp: Hyperparameters,
               pass_index: int) -> None:
        algorithm.update(segments, hp, pass_index)

    def stage_out(self, page: int, staged: torch.Tensor, host: torch.Tensor) -> None:
        pass

    def synchronize(self) -> None:
        pass
