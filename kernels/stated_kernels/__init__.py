"""stated_kernels: one module per optimizer algorithm (state layout, hyperparameters, CPU update,
CUDA source), and the registry the daemon looks algorithms up in."""

from __future__ import annotations

from stated_kernels.adamw import Adam, AdamW
from stated_kernels.sgd import SGD
from stated_kernels.spec import Algorithm

ALGORITHMS: dict[str, Algorithm] = {algo.name: algo for algo in (AdamW(), Adam(), SGD())}


def lookup(name: str) -> Algorithm | None:
    return ALGORITHMS.get(name)


__all__ = ["ALGORITHMS", "Algorithm", "lookup"]
