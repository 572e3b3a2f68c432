"""Moves pages between tiers in background threads, ahead of the pager's cursor and behind it.

The engine walks its pages in a known order (DESIGN.md, "One step") and tells the disk pager that
order at the start of each pass; the pager asks the residency policy
which pages ahead will fault (`ResidencyPolicy.plan`), starts their reads here, and hands the pages it
evicts back here to be written. The mover knows nothing about disks or tiers: a transfer is any
callable, e.g. `StateFile.read` with its buffer and checksum. The callables release the GIL
(os.preadv and os.pwritev, zlib.crc32, torch copies), so the threads overlap with the kernels.

- Reads are bounded: at most `depth` reads are in flight, counting each from `submit_read` until the
  pager has `wait`ed for it, because each holds a staging buffer until then (Note [capacity and
  staging] in stated.paging.residency). `submit_read` returns None when there is no room; that is not an
  error, the pager tries again after its next `wait`.
- Writes are not bounded here: each holds the slot of the page being written, so the pager's slots
  bound them. Their errors come back from `drain`, which a step calls before it replies.
- Reads and writes have separate pools, so a burst of write-back never delays a read the pager
  is about to wait for.

At each page the pager tops up its reads from the plan (a page already being read is not read twice,
so the same plan can be submitted again at every step of the cursor):

    for page in policy.plan(itertools.islice(cycle_from_cursor, window), mover.depth):
        if mover.submit_read(page, state_file.read, page, staging_buffer(page)) is None:
            break

Note [same-page ordering]
-------------------------
Transfers of one page run in the order they were submitted: a page evicted and soon needed again
must not be read before its write lands. The later transfer waits for the earlier one inside its
worker. That cannot deadlock: a transfer only waits for one submitted before it, each pool takes work
first in first out, so the transfer waited for has already been taken by a worker (or is done), and
a chain of waits always ends at one that is running. When a write fails, the page's copy on disk is
in doubt: later transfers of that page, submitted before or after the failure, fail with TransferError
instead of running, until `drain` has reported the error (the pager then still holds the page in
memory and decides what to do). A failed read changes nothing on disk and blocks nothing.
"""

from __future__ import annotations

import concurrent.futures as cf
import threading
import time
from collections.abc import Callable, Hashable
from typing import Any

Page = Hashable


class TransferError(RuntimeError):
    """A transfer that was not run because an earlier transfer of the same page failed."""


class Mover:
    """Background reads ahead of a cursor and writes behind it, per page in submission order."""

    def __init__(self, depth: int = 4, read_workers: int | None = None, write_workers: int = 2,
                 name: str = "stated-io"):
        if not isinstance(depth, int) or depth < 1:
            raise ValueError(f"invalid depth {depth!r}: expected a whole number of reads >= 1")
        self.depth = depth
        self._read_pool = cf.ThreadPoolExecutor(read_workers or depth, thread_name_prefix=f"{name}-read")
        self._write_pool = cf.ThreadPoolExecutor(write_workers, thread_name_prefix=f"{name}-write")
        self._lock = threading.Lock()
        self._reads: dict[Page, cf.Future] = {}  # submitted and not yet waited for
        self._writes: set[cf.Future] = set()  # not yet finished
        # The latest transfer of each page while it runs, and failed writes until drain reports them.
        self._last: dict[Page, tuple[cf.Future, bool]] = {}
        self._errors: list[BaseException] = []  # of finished writes, for drain
        self._closed = False
        self.stall_seconds = 0.0  # total time spent in wait() and drain()

    @property
    def reads_in_flight(self) -> int:
        return len(self._reads)

    @property
    def writes_in_flight(self) -> int:
        with self._lock:
            return len(self._writes)

    def room(self) -> int:
        """How many more reads may be submitted now."""
        return self.depth - len(self._reads)

    def reading(self, page: Page) -> bool:
        """Whether a read of `page` was submitted and not yet waited for."""
        return page in self._reads

    def submit_read(self, page: Page, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> cf.Future | None:
        """Starts `fn(*args, **kwargs)` to bring `page` in; None when `depth` reads are in flight.

        A page already being read is not read twice: its future is returned.
        """
        if page in self._reads:
            return self._reads[page]
        if len(self._reads) >= self.depth:
            return None
        future = self._submit(self._read_pool, page, False, fn, args, kwargs)
        self._reads[page] = future
        return future

    def submit_write(self, page: Page, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> cf.Future:
        """Starts `fn(*args, **kwargs)` to write `page` back; its result (e.g. a checksum) is the future's."""
        future = self._submit(self._write_pool, page, True, fn, args, kwargs)
        with self._lock:
            self._writes.add(future)
        future.add_done_callback(self._write_done)
        return future

    def wait(self, page: Page) -> float:
        """Waits for the read of `page`; returns the seconds spent waiting (the step's stall).

        Raises what the read raised (e.g. PageCorruptError); the read no longer counts as in flight.
        """
        try:
            future = self._reads.pop(page)
        except KeyError:
            raise KeyError(f"no read of page {page!r} in flight") from None
        start = time.perf_counter()
        try:
            cf.wait([future])
        finally:
            waited = time.perf_counter() - start
            self.stall_seconds += waited
        future.result()
        return waited

    def drain(self) -> float:
        """Waits until every submitted transfer has finished; raises the first write error since the
        last drain. Returns the seconds spent waiting. Reads stay in flight until `wait`ed for."""
        start = time.perf_counter()
        with self._lock:
            pending = set(self._writes) | {f for f, _ in self._last.values()}
        cf.wait(pending | set(self._reads.values()))
        waited = time.perf_counter() - start
        self.stall_seconds += waited
        with self._lock:
            errors, self._errors = self._errors, []
            for page in [p for p, (f, _) in self._last.items() if f.done()]:
                del self._last[page]
        if errors:
            raise errors[0]
        return waited

    def close(self) -> None:
        """Finishes every submitted transfer and stops the threads; write errors are dropped, so call
        `drain` first to see them. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._read_pool.shutdown(wait=True)
        self._write_pool.shutdown(wait=True)
        self._reads.clear()

    def __enter__(self) -> Mover:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _submit(self, pool: cf.ThreadPoolExecutor, page: Page, write: bool, fn, args, kwargs) -> cf.Future:
        if self._closed:
            raise RuntimeError("the mover is closed")
        with self._lock:
            before = self._last.get(page)
            future = pool.submit(_run_after, before, page, fn, args, kwargs)
            self._last[page] = (future, write)
        future.add_done_callback(lambda f: self._forget(page, f, write))
        return future

    def _forget(self, page: Page, future: cf.Future, write: bool) -> None:
        with self._lock:
            entry = self._last.get(page)
            if entry is not None and entry[0] is future and not _poisons(future, write):
                del self._last[page]

    def _write_done(self, future: cf.Future) -> None:
        with self._lock:
            self._writes.discard(future)
            if _failed(future):
                self._errors.append(future.exception())


def _failed(future: cf.Future) -> bool:
    return future.done() and not future.cancelled() and future.exception() is not None


def _poisons(future: cf.Future, write: bool) -> bool:
    """Whether later transfers of the page must not run: a failed write, or one refused after it."""
    return _failed(future) and (write or isinstance(future.exception(), TransferError))


def _run_after(before: tuple[cf.Future, bool] | None, page: Page, fn, args, kwargs):
    """Runs in a worker: first the earlier transfer of the page (Note [same-page ordering]), then fn."""
    if before is not None:
        future, write = before
        cf.wait([future])
        if _poisons(future, write):
            raise TransferError(f"transfer of page {page!r} not run: an earlier write of it failed "
                                f"({future.exception()})")
    return fn(*args, **kwargs)
