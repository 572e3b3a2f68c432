"""How fast a state directory moves pages: sequential write and read bandwidth through a state file.

Used by bench/paging.py (the sequential ceiling its paged runs are compared with), never by a step. It
measures the path pages take (preallocated slots, O_DIRECT where the file system allows it), without
checksums, so it drives the state file's raw transfers.
"""

from __future__ import annotations

import dataclasses
import os
import time

import numpy as np

from stated.paging.state_file import StateFile, allocate_aligned


@dataclasses.dataclass(frozen=True)
class DiskBandwidth:
    """Sequential bandwidth of one state directory, in bytes per second."""

    write_bytes_per_s: float  # including the fsync at the end
    read_bytes_per_s: float
    total_bytes: int
    chunk_bytes: int
    direct: bool  # False where the file system refused O_DIRECT


def measure_bandwidth(directory: str, total_bytes: int = 256 << 20, chunk_bytes: int = 4 << 20) -> DiskBandwidth:
    """Writes `total_bytes` of random data in `chunk_bytes` pages to a preallocated state file with
    O_DIRECT, fsyncs, reads it back, and deletes the file: the path pages take, without checksums."""
    chunks = max(1, -(-total_bytes // chunk_bytes))
    job = f"stated-bandwidth-probe-{os.getpid()}-{os.urandom(4).hex()}"
    f = StateFile.create(directory, job, chunk_bytes, chunks)
    try:
        buf = np.frombuffer(allocate_aligned(chunk_bytes), dtype=np.uint8)
        buf[:chunk_bytes] = np.frombuffer(os.urandom(chunk_bytes), dtype=np.uint8)
        start = time.perf_counter()
        for page in range(chunks):
            f._transfer(page, buf, write=True)
        f.sync()
        wrote = time.perf_counter() - start
        start = time.perf_counter()
        for page in range(chunks):
            f._transfer(page, buf, write=False)
        read = time.perf_counter() - start
        moved = chunks * f.slot_bytes
        return DiskBandwidth(moved / wrote, moved / read, moved, chunk_bytes, f.direct)
    finally:
        f.remove()
