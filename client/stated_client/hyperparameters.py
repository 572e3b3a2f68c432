"""A param group as the wire's GroupHyperparameters, packed by the algorithm's spec (stated_kernels).

Each `HyperSpec` of the algorithm names the param-group key it comes from and, for a tuple such as
`betas`, its position; the values are checked in the daemon, which names a bad one. A client class
only says which algorithm it is (`algorithm`), what it sets itself (`_fixed_hyperparameters`: Lion's
`init_lr`) and, if it must, how a malformed tuple is reported (`_bad_tuple`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

import stated_kernels
from stated.v1 import state_service_pb2 as pb
from stated_client.errors import InvalidArgumentError
from stated_client.optimizer import StatedOptimizer


def as_float(value) -> float:
    return float(value.item()) if isinstance(value, torch.Tensor) else float(value)


def _tuple_sizes(specs) -> dict[str, int]:
    sizes: dict[str, int] = {}
    for spec in specs:
        if spec.index is not None:
            sizes[spec.group_key] = max(sizes.get(spec.group_key, 0), spec.index + 1)
    return sizes


def tuple_error(key: str, size: int, value: Any) -> str:
    return f"{key} must be a tuple of {size} numbers, got {value!r}"


def pack(algorithm: str, group: Mapping[str, Any], fixed: Mapping[str, Any] = {},
         bad_tuple: Callable[[str, int, Any], str] = tuple_error) -> pb.GroupHyperparameters:
    """The GroupHyperparameters of `group` for `algorithm`: every hyperparameter of its spec, from
    `fixed` when the client sets it, else from the group. `bad_tuple(key, size, value)` gives the
    sentence for a tuple-valued key of the wrong shape."""
    specs = stated_kernels.lookup(algorithm).hyperparameters
    sizes = _tuple_sizes(specs)
    for key, size in sizes.items():
        value = group[key]
        if not isinstance(value, (tuple, list)) or len(value) != size:
            raise InvalidArgumentError(bad_tuple(key, size, value))
    scalars, flags = {}, {}
    for spec in specs:
        if spec.in_group:
            value = group[spec.group_key]
            value = value if spec.index is None else value[spec.index]
        else:
            value = fixed[spec.name]
        if value is None and spec.none_as is not None:
            value = spec.none_as
        if spec.is_flag:
            flags[spec.name] = bool(value)
        else:
            scalars[spec.name] = as_float(value)
    return pb.GroupHyperparameters(scalars=scalars, flags=flags)


class SpecOptimizer(StatedOptimizer):
    """A StatedOptimizer whose hyperparameters its algorithm's spec packs."""

    def _fixed_hyperparameters(self) -> dict[str, Any]:
        """Hyperparameters the optimizer sets itself rather than a param-group key."""
        return {}

    def _bad_tuple(self, key: str, size: int, value: Any) -> str:
        return tuple_error(key, size, value)

    def _hyperparameters(self, group: dict[str, Any]) -> pb.GroupHyperparameters:
        return pack(self.algorithm, group, self._fixed_hyperparameters(), self._bad_tuple)
