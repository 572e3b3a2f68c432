"""stated_kernels: one module per optimizer algorithm (state layout, hyperparameters, CPU update,
CUDA source), and the registry the daemon looks algorithms up in."""

from __future__ import annotations

from stated_kernels.adafactor import Adafactor
from stated_kernels.adamw import Adam, AdamW
from stated_kernels.adamw8bit import AdamW8bit
from stated_kernels.came import CAME
from stated_kernels.lion import Lion
from stated_kernels.sgd import SGD
from stated_kernels.slimadam import SlimAdam
from stated_kernels.spec import Algorithm

ALGORITHMS: dict[str, Algorithm] = {algo.name: algo for algo in (
    AdamW(), Adam(), SGD(), AdamW8bit(), Adafactor(), CAME(), Lion(), SlimAdam())}


def lookup(name: str) -> Algorithm | None:
    return ALGORITHMS.get(name)


__all__ = ["ALGORITHMS", "Algorithm", "lookup"]
