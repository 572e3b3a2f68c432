"""`stated jobs` and `stated drop`: the (job, rank)s a running daemon holds, and removing retained ones."""

from __future__ import annotations

import sys

from stated.tools.status import format_bytes
from stated.v1 import state_service_pb2 as pb
from stated_client.address import resolve
from stated_client.connection import Connection
from stated_client.errors import StatedError


def _retention(seconds: float) -> str:
    if seconds < 0:
        return "never ends"
    if seconds == 0:
        return "-"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def render(jobs: list[pb.JobStats]) -> str:
    if not jobs:
        return "no jobs: nothing is live, retained or recovered"
    # Names in full, however long: `stated drop` takes the name as shown.
    width = max(24, *(len(j.job) for j in jobs))
    lines = [f"{'job':{width}s} {'rank':>4s} {'state':9s} {'algorithm':10s} {'step':>8s} {'durable':>8s} "
             f"{'memory':>11s} {'disk':>11s} {'retained for':>12s}"]
    for j in jobs:
        durable = str(j.durable_step) if j.durable else "none"
        flag = "  (inconsistent: steps refused)" if j.inconsistent else ""
        lines.append(f"{j.job:{width}s} {j.rank:4d} {j.state:9s} {j.algorithm:10s} {j.step:8d} {durable:>8s} "
                     f"{format_bytes(j.memory_bytes):>11s} {format_bytes(j.disk_bytes):>11s} "
                     f"{_retention(j.retention_seconds_left):>12s}{flag}")
    return "\n".join(lines)


def _call(address: str | None, method: str, request, command: str):
    target = resolve(address)
    connection = Connection(target)
    try:
        return connection.call(method, request, timeout=60)
    except StatedError as error:
        print(f"stated {command}: {error}", file=sys.stderr)
        return None
    finally:
        connection.close()


def show_jobs(address: str | None, out=None) -> int:
    stats = _call(address, "GetStats", pb.GetStatsRequest(), "jobs")
    if stats is None:
        return 1
    print(render(list(stats.jobs)), file=out or sys.stdout)
    return 0


def drop(address: str | None, job: str, rank: int | None, out=None) -> int:
    request = pb.DropRequest(job=job) if rank is None else pb.DropRequest(job=job, rank=rank)
    reply = _call(address, "Drop", request, "drop")
    if reply is None:
        return 1
    for j in reply.dropped:
        print(f"dropped job {j.job!r} rank {j.rank} ({j.state} at step {j.step}; {format_bytes(j.memory_bytes)} of "
              f"memory, {format_bytes(j.disk_bytes)} on disk freed)", file=out or sys.stdout)
    return 0
