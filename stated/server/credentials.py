"""Credentials: how the daemon learns which user attaches, when gRPC cannot tell it.

The credential is how a job gets its owner: Note [job owners] in stated.job_owners.
"""

from __future__ import annotations

import secrets
import socket
import struct
import threading
import time
from collections import OrderedDict

from stated.errors import PermissionDenied

CREDENTIAL_SECONDS = 60.0
CREDENTIAL_BYTES = 16
# Unredeemed credentials kept per uid at most: a client that asks and never attaches must not grow the
# table, nor push out another user's credential between its request and its Attach.
MAX_OUTSTANDING_PER_UID = 64


class Credentials:
    """Credentials handed out and not yet redeemed; used from step-channel threads and the event loop."""

    def __init__(self):
        self.outstanding: OrderedDict[bytes, tuple[int, float]] = OrderedDict()
        self.guard = threading.Lock()

    def issue(self, uid: int) -> bytes:
        token = secrets.token_bytes(CREDENTIAL_BYTES)
        now = time.monotonic()
        with self.guard:
            self._expire(now)
            mine = [t for t, (owner, _) in self.outstanding.items() if owner == uid]
            for old in mine[: max(0, len(mine) - MAX_OUTSTANDING_PER_UID + 1)]:
                del self.outstanding[old]  # this uid's oldest go first
            self.outstanding[token] = (uid, now + CREDENTIAL_SECONDS)
        return token

    def redeem(self, token: bytes) -> int | None:
        """The uid `token` stands for (once), None for an Attach without one; PERMISSION_DENIED for a
        credential that is unknown, used, or expired."""
        if not token:
            return None
        with self.guard:
            self._expire(time.monotonic())
            # A dict lookup: the keys are random, so its timing tells a guesser nothing.
            found = self.outstanding.pop(bytes(token), None)
        if found is not None:
            return found[0]
        raise PermissionDenied(f"AttachRequest.credential is not one this daemon handed out in the last "
                               f"{CREDENTIAL_SECONDS:.0f} s, or was used already (each is good for one Attach)")

    def _expire(self, now: float) -> None:
        while self.outstanding:
            token, (_, deadline) = next(iter(self.outstanding.items()))
            if deadline > now:
                return
            del self.outstanding[token]


def peer_uid(conn) -> int:
    """The uid of the process at the other end of a unix socket (SO_PEERCRED)."""
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]
