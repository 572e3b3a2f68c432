"""The one interface of a session's pager, which the engine alone drives (stated.engine).

Per pass the engine calls `begin_pass(order)` with the pages the pass needs in the host tier, then for
each page `get(page)` (its host buffer and the seconds waited for it), hands the page to the backend
bound to that buffer, and `done(page, dirty)` once the backend has retired it; `end_pass()` when the
pass is over, or `abort_pass()` when it failed. Between steps it visits pages the same way for
state_dict export and import and for checkpoints (a DiskPager's state file frozen: `freeze_pages` in
the engine), and calls `reset(page)` to zero them. Backends and the store never call a pager: they see
bound pages only.

Two implementations: `ResidentPager` (every page in host memory) and `DiskPager` (a host budget, the
rest in the session's state file). The daemon-wide `Paging` (stated.paging.daemon_paging) makes them,
feeds them state-file pages and budget, and closes them.
"""

from __future__ import annotations

import abc

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

    # A checkpoint's pages without copying those on disk (Note [frozen state files] in
    # stated.paging.state_file), driven by the engine's `freeze_pages`; a DiskPager's only.
    @property
    def can_freeze(self) -> bool:
        """Whether the pager has a state file to freeze."""
        return False

    def placed_in_file(self, pages: list[int]) -> tuple[dict[int, list[int]], list[int]]:
        """{page: [checksum, offset in the state file]} of those of `pages` the state file holds as
        they are, and the others."""
        raise NotImplementedError(f"{type(self).__name__} has no state file")

    def write_now(self, page: int, buffer: torch.Tensor) -> list[int]:
        """Writes the page (`get` gave it `buffer`) to the state file; returns [checksum, offset]."""
        raise NotImplementedError(f"{type(self).__name__} has no state file")

    def freeze(self, link: str) -> None:
        """The state file as it stands becomes `link` too, for good; writes go to a fresh one."""
        raise NotImplementedError(f"{type(self).__name__} has no state file")

    def pin_host_pages(self, pinner: Pinner) -> None:
        """The session's pages feed a GPU: page-lock every host buffer, now and as it is made."""
        self.pool.set_pinner(pinner)

    def close(self) -> None:
        self.pool.close()
