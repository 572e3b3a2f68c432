"""The daemon's unix sockets (gRPC's and the step channel's) are private to its user, or its group.

A socket bound inside `private_socket` is born 0600 (umask 0177), so there is no moment when others could
connect; afterwards, with a group, it is opened to that group (0660), as the directory is when the daemon
creates it (stated.server.socket_guard.prepare_directory).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator


@contextlib.contextmanager
def private_socket(path: str, gid: int | None) -> Iterator[None]:
    """Bind the socket at `path` inside this block; when it succeeds, the group `gid` (if any) may connect."""
    old_umask = os.umask(0o177)
    try:
        yield
    finally:
        os.umask(old_umask)
    if gid is not None:
        os.chown(path, -1, gid)
        os.chmod(path, 0o660)
