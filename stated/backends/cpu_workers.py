"""The daemon's CPU kernel threads: page updates cut into pieces that whichever thread is free runs next.

Note [dynamic CPU scheduling]: torch's fused CPU kernels split every tensor statically between their
OpenMP threads, so a step lasts as long as its slowest thread. When a trainer shares the daemon's
cores, one of the trainer's threads is often still spinning after its last parallel region (libgomp
spins about 300,000 times before it sleeps, some 8 ms here), the daemon thread on that core runs at half
speed, and with a static split the whole step waits for it: 1.16 to 1.20 times torch's own step at 50M
parameters on 2 cores (BENCHMARKS.md). Here every thread runs torch with one OpenMP thread and pulls the
next piece of the pages in flight, so a slowed thread simply takes fewer pieces. Pieces shrink towards
the end of each page, so that the last ones of a step finish together.

Only algorithms whose update of any slice of a segment touches that slice alone can be cut this way
(`Algorithm.independent_segments`); the others keep torch's own threads.

Note [OpenMP threads per thread]: torch.set_num_threads sets the calling thread's OpenMP team size and
a process-wide default that threads adopt at their first parallel region. The workers set 1 and make
their first parallel call at once, then the creator restores the default, so threads made later (the
step threads, which run the algorithms that are not cut) still get one OpenMP thread per core.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import threading
from collections.abc import Callable, Sequence

import torch

from stated_kernels.spec import Segment

# Elements per piece: large enough that torch's per-call cost (some 20 us) stays well under 1% of the
# piece's time, small enough that the pieces of two pages in flight even out between threads. Chosen
# on 2 cores with bench/cpu_step.py's 50M model, daemons with each size stepping interleaved in one run
# (BENCHMARKS.md): 1M, 2M and 4M gave 1.10, 1.07 and 1.22 times torch's step (means of 4, 4, 2 runs).
LARGEST_PIECE = 2 << 20
SMALLEST_PIECE = 1 << 18
# torch's CPU kernels run the last `length % vector width` elements of a call through scalar code, which
# can round differently (Adam's L2 path does). Cutting a segment only at multiples of 64 elements from
# its start leaves those elements where one call over the whole segment has them (torch's own threads
# split at cache-line multiples too), so pieces change no bit.
VECTOR_ALIGN = 64


class Ticket:
    """The pieces of one submission: `wait` returns when all have run, raising the first error."""

    def __init__(self, count: int):
        self._left = count
        self._error: BaseException | None = None
        self._lock = threading.Lock()
        self._done = threading.Event()
        if count == 0:
            self._done.set()

    def _finish(self, error: BaseException | None) -> None:
        with self._lock:
            if error is not None and self._error is None:
                self._error = error
            self._left -= 1
            if self._left == 0:
                self._done.set()

    def wait(self) -> None:
        self._done.wait()
        if self._error is not None:
            raise self._error


class CpuWorkers:
    """`threads` threads that run submitted callables in submission order, one OpenMP thread each.
    `largest` and `smallest` are the piece sizes `cut` gives the CPU backend (elements)."""

    def __init__(self, threads: int, largest: int = LARGEST_PIECE, smallest: int = SMALLEST_PIECE):
        if threads < 1:
            raise ValueError(f"CPU worker threads must be at least 1, got {threads}")
        self.largest, self.smallest = largest, smallest
        self._queue: collections.deque = collections.deque()
        self._ready = threading.Condition()
        self._closed = False
        default = torch.get_num_threads()
        started = threading.Barrier(threads + 1)
        self._threads = [threading.Thread(target=self._loop, args=(started,), name=f"stated-cpu-{i}", daemon=True)
                         for i in range(threads)]
        for thread in self._threads:
            thread.start()
        started.wait()
        torch.set_num_threads(default)  # Note [OpenMP threads per thread]

    @property
    def threads(self) -> int:
        return len(self._threads)

    def submit(self, tasks: Sequence[Callable[[], None]]) -> Ticket:
        ticket = Ticket(len(tasks))
        with self._ready:
            if self._closed:
                raise RuntimeError("the CPU worker threads have been stopped")
            self._queue.extend((task, ticket) for task in tasks)
            self._ready.notify(len(tasks))
        return ticket

    def close(self) -> None:
        with self._ready:
            self._closed = True
            self._ready.notify_all()
        for thread in self._threads:
            thread.join(timeout=30)

    def _loop(self, started: threading.Barrier) -> None:
        torch.set_num_threads(1)
        torch.get_num_threads()  # the thread's first use of OpenMP: its team size is fixed from here on
        started.wait()
        while True:
            with self._ready:
                while not self._queue and not self._closed:
                    self._ready.wait()
                if not self._queue:
                    return
                task, ticket = self._queue.popleft()
            try:
                task()
            except BaseException as exc:  # noqa: BLE001 - handed to whoever waits on the ticket
                ticket._finish(exc)
            else:
                ticket._finish(None)
            # Not kept while this thread waits: the task's views would keep a dropped session's arenas
            # mapped (Note [arenas as file descriptors]).
            del task, ticket


def piece_sizes(total: int, block: int = 1, largest: int = LARGEST_PIECE, smallest: int = SMALLEST_PIECE) -> list[int]:
    """Sizes that add up to `total`, largest first, halving down to two of `smallest` at the end; all
    whole blocks of `block` elements but the last, which ends with the partial block if there is one."""
    largest, smallest = max(1, largest // block), max(1, smallest // block)  # in blocks from here on
    blocks = -(-total // block)
    sizes, left, size = [], blocks, smallest
    while left > 0:
        for _ in range(2):
            take = min(size, left)
            if take:
                sizes.append(take)
                left -= take
        size = min(largest, size * 2)
    sizes = [n * block for n in sorted(sizes, reverse=True)]
    if sizes:
        sizes[-1] -= blocks * block - total
    return sizes


def cut(segments: Sequence[Segment], block: int = 1, largest: int = LARGEST_PIECE,
        smallest: int = SMALLEST_PIECE) -> list[list[Segment]]:
    """A page's segments (of one group) as pieces: lists of consecutive segments or slices of them.

    Small segments are packed together; a large one is cut at multiples of VECTOR_ALIGN and of `block`
    elements from its start (segments start on block boundaries, so 8-bit blocks stay whole). A field
    with one value per `block` elements is cut at the same boundaries."""
    block_fields, block = block, math.lcm(block, VECTOR_ALIGN)
    sizes = piece_sizes(sum(s.length for s in segments), block, largest, smallest)
    pieces: list[list[Segment]] = []
    current: list[Segment] = []
    room = sizes.pop(0) if sizes else 0
    for segment in segments:
        begin = 0
        while begin < segment.length:
            end = min(segment.length, begin + room)
            if end % block and end < segment.length:
                end = min(segment.length, end + block - end % block)  # a block is never split
            current.append(segment if (begin, end) == (0, segment.length)
                           else _slice(segment, begin, end, block_fields))
            room -= end - begin
            begin = end
            if room <= 0:
                pieces.append(current)
                current, room = [], sizes.pop(0) if sizes else 0
    if current:
        pieces.append(current)
    return pieces


def _slice(segment: Segment, begin: int, end: int, block: int) -> Segment:
    fields = {}
    for name, view in segment.fields.items():
        if view.numel() == segment.length:
            fields[name] = view[begin:end]
        else:  # one value per block (8-bit absmax)
            fields[name] = view[begin // block: -(-end // block)]
    return dataclasses.replace(segment, start=segment.start + begin, param=segment.param[begin:end],
                               grad=segment.grad[begin:end], fields=fields)
