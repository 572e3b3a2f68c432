"""The daemon's admin token as `stated status`, `stated jobs` and `stated drop` read it: from the file beside
its socket, which only the daemon's user and root can read (Note [who sees what] in
stated.server.admin_file). Without it they get what anyone may see, and say how to see more."""

from __future__ import annotations

import os
import pwd
import stat

from stated_client.address import socket_path
from stated_client.protocol import ADMIN_TOKEN_BYTES, admin_path


def _user(uid: int) -> str:
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


def read_admin_token(target: str) -> tuple[bytes, str]:
    """(token, "") when this process may read the admin token of the daemon at `target`, else (b"", why not,
    as a sentence that says who may)."""
    path = socket_path(target)
    if path is None:
        return b"", f"{target} is not a unix socket, and only a unix socket's daemon writes an admin token"
    where = admin_path(path)
    try:
        owner = os.stat(path).st_uid
    except OSError as exc:
        return b"", f"cannot see the socket {path}: {exc.strerror or exc}"
    who = f"the daemon's user ({_user(owner)}) or root"
    try:
        fd = os.open(where, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except PermissionError:
        return b"", f"{where} is readable only by {who}: run the command as one of them"
    except OSError as exc:
        return b"", f"cannot read {where} ({exc.strerror or exc}); run the command as {who}"
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != owner:
            # Not the daemon's own file: whoever put it there would learn nothing, but a token from it is no use.
            return b"", f"{where} is not the daemon's file (not a regular file of {_user(owner)}); left unread"
        text = os.read(fd, 4 * ADMIN_TOKEN_BYTES).decode(errors="replace").strip()
    finally:
        os.close(fd)
    try:
        token = bytes.fromhex(text)
    except ValueError:
        token = b""
    if len(token) != ADMIN_TOKEN_BYTES:
        return b"", f"{where} does not hold an admin token ({2 * ADMIN_TOKEN_BYTES} hex digits)"
    return token, ""
