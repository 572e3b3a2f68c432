"""One daemon per socket: the socket's directory, the lock beside the socket, and removing at exit only the
sockets this daemon bound (Note [one daemon per socket]).

Note [one daemon per socket]
----------------------------
A daemon takes `flock` on `<socket>.lock` before anything else touches the socket path, and holds it
until it has removed its sockets. Asking whether a socket answers cannot decide a race (two daemons
started together both saw silence, and gRPC unlinks whatever socket is at the path when it binds), the
kernel's lock can: the loser refuses at once, naming the pid written into the lock file. Holding the lock,
a socket file at the path is a dead daemon's and may be replaced.

The lock file is removed at exit while still locked, so whoever takes the lock checks afterwards that the
path still names the file it locked (else it locked a file that its owner has just unlinked, and tries
again). It and every socket are removed only when the path still names the inode this daemon made: if
someone deleted them (a cleaned /tmp, a removed runtime directory) and a successor started there, its
files stay. gRPC unlinks the socket at the path it bound when it stops, so its socket is bound at a
private name and renamed into place (`publish`); what gRPC unlinks then no longer exists.

`--socket` creates a missing directory 0700 (0750 for the group with --group) and never changes the
mode of one that exists (a shared 1777 directory stays 1777); one that others may rewrite gets a warning.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket
import stat

from stated_client.protocol import MAX_SOCKET_PATH

log = logging.getLogger("stated.server.socket_guard")

LOCK_SUFFIX = ".lock"
# Tries to lock a file that is still at the path (each failure: its owner unlinked it meanwhile).
LOCK_ATTEMPTS = 100

Identity = tuple[int, int]  # (st_dev, st_ino)


def identity(path: str) -> Identity:
    st = os.lstat(path)
    return st.st_dev, st.st_ino


def remove_if_ours(path: str, ours: Identity | None) -> None:
    """Unlinks `path` if it still names the file `ours`; a file another daemon put there since stays."""
    if ours is None:
        return
    try:
        if identity(path) != ours:
            log.warning("left %s alone: it is no longer the file this daemon made (another daemon's?)", path)
            return
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:  # at shutdown: say so and go on stopping
        log.warning("could not remove %s: %s", path, exc.strerror or exc)


def prepare_directory(directory: str, gid: int | None) -> None:
    """Creates the socket's directory 0700, or 0750 owned by the group `gid`; leaves an existing one's mode
    alone, warning when others could replace the socket in it or the group cannot reach it."""
    parent = os.path.dirname(os.path.abspath(directory))
    os.makedirs(parent, exist_ok=True)
    try:
        os.mkdir(directory, 0o700)
    except FileExistsError:
        _check_existing(directory, gid)
        return
    if gid is not None:
        os.chown(directory, -1, gid)
    os.chmod(directory, 0o750 if gid is not None else 0o700)  # exact, whatever the umask


def _check_existing(directory: str, gid: int | None) -> None:
    st = os.stat(directory)
    if not stat.S_ISDIR(st.st_mode):
        raise RuntimeError(f"--socket: {directory} exists and is not a directory; pick another --socket")
    mode = stat.S_IMODE(st.st_mode)
    sticky = bool(mode & stat.S_ISVTX)
    if st.st_uid not in (os.geteuid(), 0):
        log.warning("--socket: %s belongs to uid %d, who can replace the socket in it; a directory of this "
                    "user's is safer", directory, st.st_uid)
    elif mode & (stat.S_IWGRP | stat.S_IWOTH) and not sticky:
        log.warning("--socket: others may write %s (mode %04o, not sticky) and so replace the socket; a "
                    "directory only this user may write is safer (left as it is)", directory, mode)
    if gid is not None and not (mode & stat.S_IXGRP and (st.st_gid == gid or mode & stat.S_IXOTH)):
        log.warning("--group: members cannot reach a socket in %s (mode %04o, group %d); give the directory "
                    "to the group with g+x, e.g. chgrp %d and chmod 0750 (left as it is)", directory, mode,
                    st.st_gid, gid, gid)


class SocketGuard:
    """Holds the socket path for this daemon from `acquire` to `release`."""

    def __init__(self, path: str, gid: int | None):
        self.path = path
        self.gid = gid
        self.lock_path = path + LOCK_SUFFIX
        self.lock_fd: int | None = None
        self.lock_identity: Identity | None = None
        self.socket_identity: Identity | None = None

    def acquire(self) -> None:
        """Prepares the directory, takes the lock (RuntimeError naming the holder when another daemon has
        it) and removes a socket file that a daemon which died left at the path."""
        prepare_directory(os.path.dirname(self.path) or ".", self.gid)
        for _ in range(LOCK_ATTEMPTS):
            fd = self._open_lock()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_pid(fd)
                os.close(fd)
                raise RuntimeError(f"another daemon is already serving on {self.path} ({holder} holds "
                                   f"{self.lock_path}); stop it or pick another --socket") from None
            ours = _fd_identity(fd)
            try:
                still_there = identity(self.lock_path) == ours
            except FileNotFoundError:
                still_there = False
            if still_there:
                break
            os.close(fd)  # its owner unlinked it after we opened it: lock the file now at the path
        else:
            raise RuntimeError(f"could not lock {self.lock_path}: it keeps being replaced; is something "
                               f"deleting files in {os.path.dirname(self.lock_path)}?")
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.lock_fd, self.lock_identity = fd, ours
        try:
            _clear_stale_socket(self.path)
        except BaseException:
            self.release()
            raise

    def _open_lock(self) -> int:
        # No symlink followed and no FIFO waited on: the directory may be shared (1777).
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
        try:
            fd = os.open(self.lock_path, flags, 0o600)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise RuntimeError(f"{self.lock_path} is a symbolic link; remove it") from None
            raise
        st = os.fstat(fd)
        problem = ("is not a regular file" if not stat.S_ISREG(st.st_mode) else
                   f"belongs to uid {st.st_uid}, not this user (uid {os.geteuid()})" if st.st_uid != os.geteuid()
                   else None)
        if problem:
            os.close(fd)
            raise RuntimeError(f"{self.lock_path} {problem}; remove it or pick another --socket")
        return fd

    def private_name(self) -> str:
        """Where gRPC binds before `publish` renames its socket to the path (Note [one daemon per socket]);
        the path itself when the private name would be too long for a unix socket."""
        name = os.path.join(os.path.dirname(self.path), f".stated-{os.getpid()}.bind")
        return name if len(os.fsencode(name)) <= MAX_SOCKET_PATH else self.path

    def publish(self, bound: str) -> None:
        """Moves the socket bound at `bound` to the path, and remembers it as this daemon's."""
        self.socket_identity = identity(bound)
        if bound != self.path:
            os.rename(bound, self.path)

    def release(self) -> None:
        """Removes this daemon's socket and lock file (only if the paths still name them), then unlocks."""
        remove_if_ours(self.path, self.socket_identity)
        self.socket_identity = None
        if self.lock_fd is not None:
            remove_if_ours(self.lock_path, self.lock_identity)
            os.close(self.lock_fd)
            self.lock_fd = self.lock_identity = None


def _fd_identity(fd: int) -> Identity:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def _read_pid(fd: int) -> str:
    """'pid N' from the lock file, or 'another process' while its holder has not written it yet."""
    try:
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    except OSError:
        text = ""
    return f"pid {text}" if text.isdigit() else "another process"


def _socket_answers(path: str) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(0.5)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


def _clear_stale_socket(path: str) -> None:
    """With the lock held, a socket file at the path is a dead daemon's; one that answers belongs to a
    daemon that does not take the lock (an older stated), and is left to it."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise RuntimeError(f"{path} exists and is not a socket; remove it or pick another --socket")
    if _socket_answers(path):
        raise RuntimeError(f"another daemon is already serving on {path}; stop it or pick another --socket")
    os.unlink(path)  # left by a daemon that died
