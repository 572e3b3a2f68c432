"""Paged step time of stated.AdamW at several host budgets, against the disk's measured ceiling.

In one run: the O_DIRECT sequential read and write bandwidth of the file system that holds the state
files (stated.paging.disk_bandwidth.measure_bandwidth), then for each budget (100%, 50%, 25%, 10% of the state) a daemon
with that --host-memory, a few steps of a model, and the bytes its pager moved (GetStats). Reported per
budget: the step time, the disk bandwidth achieved (bytes moved / step time) over the ceiling
(bytes moved at the rate measured for reads and writes in flight together), and the step time over the lower bound
max(kernel time at 100% budget, bytes moved / measured bandwidth), which is near 1 when transfers and
kernels overlap.

    python bench/paging.py [--params 200M] [--budgets 1,0.5,0.25,0.1] [--page-size 16MiB] [--steps 4]

Targets (issue 3): at least 0.8 of the ceiling when disk-bound; step time within 1.25x of the bound.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

from common import BenchDaemon, human  # noqa: E402
from cpu_step import make_params, parse_count  # noqa: E402


def concurrent_bandwidth(directory: str, page_bytes: int, pages: int, readers: int, writers: int):
    """O_DIRECT bandwidth of `directory` with the pager's own access pattern: whole pages through a
    StateFile, `writers` writes and `readers` reads in flight at once (a single sequential stream
    understates what the device gives several queued requests). Returns (read, write) bytes/s."""
    import concurrent.futures as cf

    import numpy as np

    from stated.paging.state_file import StateFile, allocate_aligned

    f = StateFile.create(directory, "bandwidth-probe", page_bytes, pages)
    try:
        buffers = [np.frombuffer(allocate_aligned(f.slot_bytes), dtype=np.uint8) for _ in range(max(readers, writers))]
        for b in buffers:
            b[:] = np.random.default_rng(0).integers(0, 255, b.size, dtype=np.uint8)
        with cf.ThreadPoolExecutor(writers) as pool:
            t0 = time.perf_counter()
            list(pool.map(lambda i: f.write(i, buffers[i % writers]), range(pages)))
            f.sync()
            write = pages * page_bytes / (time.perf_counter() - t0)
        with cf.ThreadPoolExecutor(readers) as pool:
            t0 = time.perf_counter()
            list(pool.map(lambda i: f.read(i, buffers[i % readers]), range(pages)))
            read = pages * page_bytes / (time.perf_counter() - t0)
        # Mixed, as a paged step runs: reads of one half while the other half is written back.
        half = pages // 2
        scratch = [np.frombuffer(allocate_aligned(f.slot_bytes), dtype=np.uint8) for _ in range(readers)]
        with cf.ThreadPoolExecutor(readers) as rpool, cf.ThreadPoolExecutor(writers) as wpool:
            t0 = time.perf_counter()
            reads = [rpool.submit(f.read, i, scratch[i % readers]) for i in range(half)]
            writes = [wpool.submit(f.write, i, buffers[i % writers]) for i in range(half, 2 * half)]
            cf.wait(reads + writes)
            mixed = 2 * half * page_bytes / (time.perf_counter() - t0)
        return read, write, mixed
    finally:
        f.remove()


def session_stats(opt):
    from stated.v1 import state_service_pb2 as pb

    stats = opt._connection.call("GetStats", pb.GetStatsRequest(session=opt._session))
    return [s for s in stats.sessions if s.id == opt.session_id][0]


def run_budget(n: int, fraction: float | None, page_size: str, steps: int, state_dir: str):
    import stated

    extra = ["--page-size", page_size, "--state-dir", state_dir]
    if fraction is not None:
        extra += ["--host-memory", str(int(8 * n * fraction))]
    daemon = BenchDaemon(*extra)
    try:
        params = make_params(n)
        opt = stated.AdamW(params, lr=1e-3, address=daemon.address, job="paging-bench")
        opt.step()  # the first step creates every page (and writes the spilled ones)
        opt.step()
        before = session_stats(opt)
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            opt.step()
            times.append(time.perf_counter() - t0)
        after = session_stats(opt)
        moved = (after.bytes_read - before.bytes_read + after.bytes_written - before.bytes_written) / steps
        stall = (after.stall_seconds - before.stall_seconds) / steps
        opt.close()
        del params
        return statistics.median(times), moved, stall, after.pages, after.resident_capacity
    finally:
        daemon.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="200M", help="parameter count (default 200M)")
    parser.add_argument("--budgets", default="1,0.5,0.25,0.1", help="host budgets as fractions of the state")
    parser.add_argument("--page-size", default="64MiB", help="--page-size for the daemon (default 64MiB, its default)")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per budget (default 4)")
    parser.add_argument("--state-dir", default=None, help="where state files go (default: a temp dir on /tmp)")
    args = parser.parse_args()
    import tempfile

    from stated.paging.disk_bandwidth import measure_bandwidth

    n = parse_count(args.params)
    state_dir = args.state_dir or tempfile.mkdtemp(prefix="stated-paging-bench-", dir="/var/tmp")
    from stated.sizes import parse_size

    page_bytes = parse_size(args.page_size)
    print(f"measuring O_DIRECT bandwidth in {state_dir} ...", flush=True)
    seq = measure_bandwidth(state_dir, total_bytes=1 << 30, chunk_bytes=16 << 20)
    read_bw, write_bw, mixed_bw = concurrent_bandwidth(state_dir, page_bytes, max(8, (2 << 30) // page_bytes), 4, 2)
    print(f"disk, one stream: read {seq.read_bytes_per_s / 1e9:.2f} GB/s, write {seq.write_bytes_per_s / 1e9:.2f} GB/s "
          f"(O_DIRECT: {seq.direct}); whole pages, 4 reads / 2 writes in flight (the ceiling used below): "
          f"read {read_bw / 1e9:.2f} GB/s, write {write_bw / 1e9:.2f} GB/s, reads and writes together "
          f"{mixed_bw / 1e9:.2f} GB/s", flush=True)
    rows = []
    kernel_time = None
    print(f"{'budget':>7s} {'pages':>6s} {'resident':>8s} {'step s':>8s} {'stall s':>8s} {'GB moved':>9s} "
          f"{'disk GB/s':>9s} {'of ceiling':>10s} {'vs bound':>8s}", flush=True)
    for text in args.budgets.split(","):
        fraction = float(text)
        seconds, moved, stall, pages, resident = run_budget(
            n, None if fraction >= 1 else fraction, args.page_size, args.steps, state_dir)
        if fraction >= 1:
            kernel_time = seconds
        # The ceiling: the device's rate for reads and writes in flight together, as in a paged step.
        ceiling_time = moved / mixed_bw
        of_ceiling = ceiling_time / seconds if moved else float("nan")
        bound = max(kernel_time or 0.0, ceiling_time)
        rows.append((fraction, seconds, moved, of_ceiling, seconds / bound if bound else float("nan")))
        print(f"{fraction:7.0%} {pages:6d} {resident:8d} {seconds:8.3f} {stall:8.3f} {moved / 1e9:9.2f} "
              f"{moved / seconds / 1e9:9.2f} {of_ceiling:10.2f} {rows[-1][4]:8.2f}", flush=True)
    for fraction, seconds, moved, of_ceiling, vs_bound in rows:
        print(f"adamw paging {human(n)} params at {fraction:.0%} budget: step {seconds:.3f} s, "
              f"{of_ceiling:.2f} of disk ceiling, {vs_bound:.2f}x the bound")
    return 0


if __name__ == "__main__":
    sys.exit(main())
