"""The one interface of a session's pager, which the engine alone drives (stated.engine).

Per pass the engine calls `begin_pass(order)` with the pages the pass needs in the host tier, then for
each page `get(page)` (its host buffer and the seconds waited for it), hands the page to the backend
bound to that buffer, and `done(page, dirty)` once the backend has retired it; `end_pass()` when the
pass is over, or `abort_pass()` when it failed. Between steps it visits pages the same way for state_dict export and import, and calls
`reset(page)` to zero them. Backends and the store never call a pager: they see bound pages only.

Two implementations: `ResidentPager` (every page in host memory) and `DiskPager` (a host budget, the
rest in the job's state file). The daemon-wide `Paging` (stated.paging.daemon_paging) makes them,
feeds them state-file pages and budget, and closes them.
"""

from __future__ import annotations

import abc
from typing import Callable

import torch

from stated.paging.host_pool import HostPool, Pinner


class Pager(abc.ABC):
    """Where a session's pages live in host memory and how they get there."""

    pool: HostPool
    # Counters for Stats and the step's reply: host-tier faults and bytes moved to and from disk.
    faults: int = 0
    bytes_read: int = 0
    bytes_written: int = 0

    @abc.abstractmethod
    def begin_pass(self, order: list[int]) -> None:
        """A pass will `get` the pages of `order`, in that order (what a pager reads ahead)."""

    @abc.abstractmethod
    def get(self, page: int) -> tuple[torch.Tensor, float]:
        """The page's host buffer, resident until `done(page)`, and the seconds waited for it."""

    @abc.abstractmethod
    def done(self, page: int, dirty: bool = True) -> None:
        """The page's buffer is free to move again; `dirty` when its contents changed."""

    @abc.abstractmethod
    def end_pass(self) -> float:
        """The pass is over: waits for its transfers and returns the seconds waited."""

    def abort_pass(self) -> None:
        """The pass failed (every page got was given back with `done`): drop what it had under way, so
        that no slot stays taken and nothing read for it is used later. Never raises."""

    @abc.abstractmethod
    def reset(self, page: int) -> None:
        """Fresh (zero) state for the page, as before its first step."""

    @property
    @abc.abstractmethod
    def resident_bytes(self) -> int:
        """Bytes of pages held in host memory now."""

    @property
    @abc.abstractmethod
    def resident_pages(self) -> int:
        """Pages this pager keeps resident in host memory (its share, or all of them)."""

    @property
    def disk_bytes(self) -> int:
        """Bytes of pages with a copy in a state file."""
        return 0

    @property
    def can_freeze(self) -> bool:
        """Whether `freeze_pages` can make a checkpoint's pages of its state file (a DiskPager's)."""
        return False

    def freeze_pages(self, pages: list[int], link: str, check: Callable[[], None]) -> tuple[dict[int, list[int]], int]:
        """A checkpoint's pages without copying those on disk (Note [frozen state files] in
        stated.paging.state_file): writes those of `pages` the state file does not hold as they are,
        then freezes it as `link`. Returns {page: [checksum, offset in the file]} for `pages` and the
        bytes written; `check()` runs before each page written and before the freeze, to give up."""
        raise NotImplementedError(f"{type(self).__name__} has no state file to freeze")

    def pin_host_pages(self, pinner: Pinner) -> None:
        """The session's pages feed a GPU: page-lock every host buffer, now and as it is made."""
        self.pool.set_pinner(pinner)

    def close(self) -> None:
        self.pool.close()
