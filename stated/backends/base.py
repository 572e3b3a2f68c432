"""The small interface between the engine and a device (STYLE.md point 4).

The engine never asks whether it runs on CPU or CUDA. Per page it asks the backend to make the page's
state usable by a kernel (`stage_in`: on CPU the host buffer itself, on CUDA an asynchronous copy into
a staging slot on the copy stream), to run the algorithm's update on the page's segments (`launch`),
and to bring changed state back to the host tier (`stage_out`). `synchronize` waits for everything the
backend has in flight; it is called once per step, never per page.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import Any

import torch

from stated_kernels.spec import Algorithm, Hyperparameters, Segment


class Backend(abc.ABC):
    name: str = ""
    # Whether host pages should be pinned (page-locked) so that copies to a device run asynchronously.
    pin_host_memory: bool = False

    @abc.abstractmethod
    def stage_in(self, page: int, host: torch.Tensor) -> Any:
        """Makes page `page`'s state (in host buffer `host`) available to kernels; returns the buffer
        that segment field views must be cut from."""

    @abc.abstractmethod
    def launch(self, algorithm: Algorithm, segments: Sequence[Segment], hp: Hyperparameters,
               pass_index: int) -> None:
        """Runs one update over segments of one page that share a param group."""

    @abc.abstractmethod
    def stage_out(self, page: int, staged: Any, host: torch.Tensor) -> None:
        """Brings the page's changed state back into its host buffer (a no-op when they are one)."""

    @abc.abstractmethod
    def synchronize(self) -> None:
        """Waits for every copy and kernel this backend has in flight."""
