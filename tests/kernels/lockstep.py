"""Runs a kernel's `harness.Driver` beside the reference optimizer it is tested against: the same
initial values, the same `harness.gradients` step by step, and the state_dict carried across in both
directions. Each algorithm's test keeps what it compares and how closely (its TOLERANCES table).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import pytest
import torch

import harness
from stated_kernels.spec import Algorithm, Hyperparameters


def reference(module: str, name: str, params: Sequence[torch.nn.Parameter], kwargs: Mapping) -> torch.optim.Optimizer:
    """`module.name(params, **kwargs)`; the test skips where the reference package is not installed."""
    return getattr(pytest.importorskip(module), name)(params, **kwargs)


def parameters(values: Sequence[torch.Tensor]) -> list[torch.nn.Parameter]:
    """Fresh parameters holding copies of `values`, for the reference optimizer."""
    return [torch.nn.Parameter(v.clone()) for v in values]


def step_both(opt, refs: Sequence[torch.Tensor], driver: harness.Driver, steps: range) -> None:
    """Steps `opt` (over `refs`, through their .grad) and `driver` on the same gradients; a None
    gradient skips the tensor on both sides."""
    shapes = [t.shape for t in driver.infos]
    for step in steps:
        grads = harness.gradients(shapes, step)
        for p, g in zip(refs, grads):
            p.grad = g
        opt.step()
        driver.step(grads)


def run_both(algorithm: Algorithm, make_reference: Callable[[list[torch.nn.Parameter]], object],
             hp: Hyperparameters, layout: harness.Layout, shapes: Sequence[tuple[int, ...]], steps: int = 100,
             **kwargs) -> tuple[harness.Driver, list[torch.nn.Parameter], object]:
    """(driver, refs, opt) after `steps` steps side by side from `harness.initial_params(shapes)`;
    `make_reference(refs)` builds the reference optimizer; kwargs go to the Driver (names, group_of)."""
    params = harness.initial_params(shapes)
    refs = parameters(params)
    opt = make_reference(refs)
    driver = harness.Driver(algorithm, params, [hp], layout, **kwargs)
    step_both(opt, refs, driver, range(1, steps + 1))
    return driver, refs, opt


def export_into(opt: torch.optim.Optimizer, driver: harness.Driver) -> None:
    """Loads every tensor's state_dict entry of `driver` into `opt`, keeping opt's param_groups."""
    opt.load_state_dict({"state": {i: driver.export(i) for i in range(len(driver.infos))},
                         "param_groups": opt.state_dict()["param_groups"]})


def import_from(driver: harness.Driver, opt: torch.optim.Optimizer, extra: Mapping | None = None) -> None:
    """Loads `opt`'s state of every tensor into `driver` (with `extra` entries added)."""
    for i in range(len(driver.infos)):
        driver.load(i, {**opt.state_dict()["state"][i], **(extra or {})})


def assert_within(tolerances: Mapping[str, tuple[float, float]], actual: torch.Tensor, expected: torch.Tensor,
                  quantity: str, name: str | None = None) -> None:
    """assert_close at the (rtol, atol) that `tolerances` gives `quantity`; a failure names it (and
    the tensor's `name`, when given)."""
    rtol, atol = tolerances[quantity]
    where = quantity if name is None else f"{quantity}, {name}"
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{where}: {m}")
