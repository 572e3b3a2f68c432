"""`stated status`: what a running daemon holds, one line per session."""

from __future__ import annotations

import sys

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


def render(stats: pb.GetStatsResponse, target: str) -> str:
    lines = [f"stated {stats.daemon_version} at {target}: {len(stats.sessions)} sessions, "
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
    return "\n".join(lines)


def show_status(address: str | None, out=sys.stdout) -> int:
    target = resolve(address)
    connection = Connection(target)
    try:
        stats = connection.call("GetStats", pb.GetStatsRequest(), timeout=5)
    except StatedError as error:
        print(f"stated status: no daemon answers at {target} ({error.code}: {error})", file=sys.stderr)
        return 1
    finally:
        connection.close()
    print(render(stats, target), file=out)
    return 0
