"""stated_kernels: one module per optimizer algorithm (its `Algorithm` spec: state layout and formats,
hyperparameters, CPU update, CUDA kernels, planning, state_dict), and the registry the daemon, the
CUDA runner, the planner and the client look algorithms up in (docs/adding-an-algorithm.md)."""

from __future__ import annotations

import importlib

from stated_kernels.spec import Algorithm

# The algorithm modules, in the order `stated plan` shows them; each lists its specs in SPECS.
# Registering an algorithm is adding its module here.
MODULES = ("adamw", "adamw8bit", "adafactor", "came", "lion", "slimadam", "sgd")

ALGORITHMS: dict[str, Algorithm] = {
    algo.name: algo for module in MODULES for algo in importlib.import_module(f"stated_kernels.{module}").SPECS}


def lookup(name: str) -> Algorithm | None:
    return ALGORITHMS.get(name)


__all__ = ["ALGORITHMS", "Algorithm", "lookup"]
