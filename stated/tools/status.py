"""`stated status`: what a running daemon holds, one line per session; totals only for a caller who cannot
read the daemon's admin token (Note [who sees what] in stated.server.admin_file)."""

from __future__ import annotations

import sys

from stated.tools.admin_token import read_admin_token
from stated.v1 import state_service_pb2 as pb
from stated_client.address import resolve
from stated_client.connection import Connection
from stated_client.errors import StatedError


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


def render(stats: pb.GetStatsResponse, target: str, why_totals: str = "") -> str:
    """The status text; `why_totals` says why a reply with totals only has no sessions in it."""
    lines = [f"stated {stats.daemon_version} at {target}: {stats.live_sessions} sessions, "
             f"{format_bytes(stats.state_bytes)} of state ({format_bytes(stats.resident_bytes)} resident in host "
             f"memory), page size {format_bytes(stats.page_bytes)}"]
    if stats.sessions:
        lines.append(f"{'job':24s} {'rank':>4s} {'algorithm':10s} {'pid':>7s} {'params':>14s} {'state':>12s} "
                     f"{'B/param':>8s} {'steps':>8s}")
        for s in sorted(stats.sessions, key=lambda s: (s.job, s.rank)):
            lines.append(f"{s.job[:24]:24s} {s.rank:4d} {s.algorithm:10s} {s.pid:7d} {s.parameters:14,d} "
                         f"{format_bytes(s.state_bytes):>12s} {s.state_bytes_per_parameter:8.3f} {s.steps:8d}")
            if s.inconsistent:  # steps are refused until the state is restored (stated.inconsistency)
                lines.append(f"  inconsistent: {s.inconsistency}")
    if stats.scope == pb.STATS_SCOPE_TOTALS:
        lines.append(totals_only(why_totals))
    return "\n".join(lines)


def totals_only(why: str) -> str:
    return (f"(totals only: job names, pids and sessions are shown to the daemon's user and root, who can read its "
            f"admin token; {why or 'this command sent none'})")


def get_stats(connection: Connection, target: str, timeout: float) -> tuple[pb.GetStatsResponse, str]:
    """GetStats with the daemon's admin token when this process can read it: the reply, and why it holds totals
    only (when it does)."""
    token, why = read_admin_token(target)
    return connection.call("GetStats", pb.GetStatsRequest(admin_token=token), timeout=timeout), why


def show_status(address: str | None, out=None) -> int:
    target = resolve(address)
    connection = Connection(target)
    try:
        stats, why = get_stats(connection, target, timeout=5)
    except StatedError as error:
        print(f"stated status: no daemon answers at {target} ({error.code}: {error})", file=sys.stderr)
        return 1
    finally:
        connection.close()
    print(render(stats, target, why), file=out or sys.stdout)
    return 0
