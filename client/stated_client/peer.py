"""Whom the client talks to: the daemon's peer credentials, the users it may trust, and the default socket
directory's owner and mode.

Note [whom the client talks to]: the optimizer state a trainer hands its daemon is its model's weights,
so before any call the client reads who holds the socket's other end (SO_PEERCRED on a plain connection
to the same path, for gRPC's own connection does not tell). A daemon run by the trainer's own user or by
root is trusted; any other user only when named in STATED_TRUST_UIDS (a shared daemon under a system
account, deploy/README.md). The default socket sits in a directory anyone could have made first
(/tmp/stated-<uid> without XDG_RUNTIME_DIR), so that directory must be the user's or root's and closed to
writers other than its owner. The check and gRPC's connection are two connections: a directory that no
one else may write is what keeps the socket between them the same.
"""

from __future__ import annotations

import os
import pwd
import socket
import stat
import struct
from dataclasses import dataclass

from stated_client.errors import InvalidArgumentError, PermissionDeniedError

ENV_TRUST_UIDS = "STATED_TRUST_UIDS"
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
CHECK_TIMEOUT = 5.0


@dataclass(frozen=True)
class Credentials:
    pid: int
    uid: int
    gid: int


def user_name(uid: int) -> str | None:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return None


def describe(uid: int) -> str:
    """`uid 65534 (nobody)`, for errors."""
    name = user_name(uid)
    return f"uid {uid} ({name})" if name else f"uid {uid}"


def own_uids() -> set[int]:
    """The users that are trusted without being named: this process's own, and root."""
    return {os.getuid(), os.geteuid(), 0}


def trusted_uids() -> set[int]:
    """own_uids(), plus the uids and user names of STATED_TRUST_UIDS (comma-separated)."""
    uids = own_uids()
    for item in os.environ.get(ENV_TRUST_UIDS, "").split(","):
        item = item.strip()
        if item.isdigit():
            uids.add(int(item))
        elif item:
            try:
                uids.add(pwd.getpwnam(item).pw_uid)
            except KeyError:
                raise InvalidArgumentError(f"{ENV_TRUST_UIDS} names {item!r}, which is neither a uid nor a user "
                                           f"on this machine; give uids or user names, separated by commas") from None
    return uids


def credentials(sock: socket.socket) -> Credentials:
    """The pid, uid and gid of the process at the other end of a connected unix socket."""
    return Credentials(*_UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)))


def check_peer(sock: socket.socket, path: str) -> Credentials:
    """The peer of `sock` (connected to `path`); PermissionDeniedError unless its user is trusted."""
    peer = credentials(sock)
    if peer.uid in trusted_uids():
        return peer
    trust = user_name(peer.uid) or peer.uid
    raise PermissionDeniedError(
        f"the stated daemon at {path} runs as {describe(peer.uid)}, pid {peer.pid}: neither you "
        f"({describe(os.geteuid())}) nor root, so stated will not hand it your model's state. If that daemon is "
        f"the one you mean (a shared daemon under a system account), trust its user with {ENV_TRUST_UIDS}={trust} "
        f"(uids or user names, separated by commas); otherwise start your own with `stated serve`")


def check_daemon(path: str) -> Credentials | None:
    """Checks the daemon listening at `path` (check_peer); None when nothing can be reached there, which
    gRPC's own connection then finds too."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(CHECK_TIMEOUT)
        try:
            sock.connect(path)
        except OSError:
            return None
        return check_peer(sock, path)


def check_default_directory(directory: str) -> None:
    """PermissionDeniedError when the default socket's directory (or a symlink to it) belongs to someone
    other than this user or root, or when its group or others may write it; nothing when it is missing
    (no daemon listens there, and `stated serve` creates it 0700)."""
    try:
        link = os.lstat(directory)
        if stat.S_ISLNK(link.st_mode):
            _check_owner(directory, link, "is a symlink that ")
        target = os.stat(directory)
    except FileNotFoundError:
        return
    _check_owner(directory, target, "")
    writable = stat.S_IMODE(target.st_mode) & (stat.S_IWGRP | stat.S_IWOTH)
    if writable:
        writers = {stat.S_IWGRP: "its group", stat.S_IWOTH: "others"}.get(writable, "its group and others")
        raise PermissionDeniedError(
            f"the default socket directory {directory} has mode {stat.S_IMODE(target.st_mode):04o}: {writers} "
            f"may write it, and so put their own daemon's socket in place of yours. Make it private "
            f"(`chmod 700 {directory}`) or remove it, or give address= or STATED_ADDRESS")


def _check_owner(directory: str, st: os.stat_result, what: str) -> None:
    if st.st_uid not in own_uids():
        raise PermissionDeniedError(
            f"the default socket directory {directory} {what}belongs to {describe(st.st_uid)}, not to "
            f"you ({describe(os.geteuid())}) or root: whoever made it could run a daemon there and receive your "
            f"model's state. Remove it (`rm -r {directory}`, as root if need be), point XDG_RUNTIME_DIR at a "
            f"directory of your own, or give address= or STATED_ADDRESS")
