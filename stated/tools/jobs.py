"""`stated jobs` and `stated drop`: the (job, rank)s a running daemon holds, and removing retained ones. Both
send the daemon's admin token when this process can read it (Note [who sees what] in
stated.server.admin_file): without it `stated jobs` shows counts only and `stated drop` is refused."""

from __future__ import annotations

import sys

from stated.tools.admin_token import read_admin_token
from stated.tools.status import format_bytes, get_stats, totals_only
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


def render_totals(stats: pb.GetStatsResponse, why: str) -> str:
    return (f"{stats.live_sessions} live sessions and {stats.retained_ranks} retained or recovered (job, rank)s "
            f"{totals_only(why)}")


def show_jobs(address: str | None, out=None) -> int:
    target = resolve(address)
    connection = Connection(target)
    try:
        stats, why = get_stats(connection, target, timeout=60)
    except StatedError as error:
        print(f"stated jobs: {error}", file=sys.stderr)
        return 1
    finally:
        connection.close()
    text = render_totals(stats, why) if stats.scope == pb.STATS_SCOPE_TOTALS else render(list(stats.jobs))
    print(text, file=out or sys.stdout)
    return 0


def drop(address: str | None, job: str, rank: int | None, out=None) -> int:
    target = resolve(address)
    token, why = read_admin_token(target)
    request = pb.DropRequest(job=job, admin_token=token)
    if rank is not None:
        request.rank = rank
    connection = Connection(target)
    try:
        reply = connection.call("Drop", request, timeout=60)
    except StatedError as error:
        print(f"stated drop: {error}" + (f" ({why})" if why else ""), file=sys.stderr)
        return 1
    finally:
        connection.close()
    for j in reply.dropped:
        print(f"dropped job {j.job!r} rank {j.rank} ({j.state} at step {j.step}; {format_bytes(j.memory_bytes)} of "
              f"memory, {format_bytes(j.disk_bytes)} on disk freed)", file=out or sys.stdout)
    return 0
