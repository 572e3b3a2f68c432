"""The daemon's admin token: a random secret in a file beside the socket that only the daemon's user (and
root) can read, which `stated status`, `stated jobs` and `stated drop` send to see every job and to drop
any (Note [who sees what]).

Note [who sees what]
--------------------
Anyone who can reach the socket may call GetStats, and without proof of who they are they get totals
only: counts and bytes, no job names, pids or session ids (a session id is half of what a session's calls
carry, and a job name and pid say who trains what). gRPC over a unix socket gives the servicer no peer
credentials to decide by, so the proof is a token:

- a session's own reference (id and token) shows that session's job: its sessions and (job, rank)s;
- the admin token shows everything. The daemon draws it at start (32 random bytes) and writes it, in hex,
  to `<socket>.admin`, mode 0600, owned by the daemon's user, so that reading it is what being that user
  or root means here. The file is written at a private name (O_EXCL, no symlink followed) and renamed
  into place, so nobody ever reads it half-written or with a wider mode, and it is removed at stop only
  if the path still names the file this daemon made (as the socket is: stated.server.socket_guard).

Drop changes what another job finds when it resumes, so it needs the same proof: the admin token, or a
live session of the job being dropped (its trainer, which could close it anyway).
"""

from __future__ import annotations

import errno
import hmac
import logging
import os
import secrets

from stated.errors import PermissionDenied
from stated.server.socket_guard import Identity, identity, remove_if_ours
from stated_client.protocol import ADMIN_TOKEN_BYTES, admin_path

log = logging.getLogger("stated.server.admin_file")


class AdminFile:
    """The admin token of the daemon serving on `socket`, and its file from `create` to `remove`."""

    def __init__(self, socket: str):
        self.path = admin_path(socket)
        self.token = secrets.token_bytes(ADMIN_TOKEN_BYTES)
        self._identity: Identity | None = None

    def create(self) -> None:
        """Writes the token's file (with the socket's lock held); RuntimeError naming the path if it cannot."""
        private = os.path.join(os.path.dirname(self.path), f".stated-{os.getpid()}.admin")
        try:
            fd = _create_exclusive(private)
            try:
                os.write(fd, self.token.hex().encode() + b"\n")
                os.fchmod(fd, 0o600)  # exact, whatever the umask
            finally:
                os.close(fd)
            self._identity = identity(private)
            os.rename(private, self.path)
        except OSError as exc:
            remove_if_ours(private, self._identity)
            self._identity = None
            raise RuntimeError(f"cannot write the admin token file {self.path}: {exc.strerror or exc}; give the "
                               f"daemon a --socket directory it may write") from None

    def remove(self) -> None:
        """Removes the file if the path still names this daemon's (a successor's stays)."""
        remove_if_ours(self.path, self._identity)
        self._identity = None

    def matches(self, token: bytes) -> bool:
        return hmac.compare_digest(token, self.token)

    def check(self, token: bytes, field: str) -> None:
        """Raises PermissionDenied unless `token` (the request's `field`) is this daemon's admin token."""
        if not self.matches(token):
            raise PermissionDenied(f"{field} is not this daemon's admin token; read it from {self.path} (as the "
                                   f"daemon's user or root): a restarted daemon writes a new one")


def _create_exclusive(path: str) -> int:
    """A new file at `path`, 0600; one a dead daemon of the same pid left there is replaced once."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        return os.open(path, flags, 0o600)
    except FileExistsError:
        pass
    try:
        os.unlink(path)  # holding the socket's lock, a file at our private name is a dead daemon's
    except OSError as exc:
        if exc.errno != errno.ENOENT:
            raise
    return os.open(path, flags, 0o600)
