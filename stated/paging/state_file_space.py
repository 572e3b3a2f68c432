"""Room for state files: creating one preallocated, and the errors of a full or unusable directory.

Note [check before fallocate]
-----------------------------
On ext4 and xfs a fallocate larger than the free space allocates blocks until the disk is full before
it fails, starving every other writer meanwhile; so the free space is checked first, and fallocate's
own ENOSPC is the backstop for races.
"""

from __future__ import annotations

import errno
import os
import struct

from stated.errors import AlreadyExists, FailedPrecondition, ResourceExhausted
from stated.sizes import format_bytes

DIRECT_ALIGN = 4096
HEADER_BYTES = DIRECT_ALIGN
_MAGIC = b"STATEDPG"
_HEADER = struct.Struct("<8sIIQQI")  # magic, version, reserved, page_bytes, slot_bytes, job name bytes
_VERSION = 1
SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def align_up(n: int, to: int = DIRECT_ALIGN) -> int:
    return -(-n // to) * to


class DiskSpaceError(ResourceExhausted):
    """The state directory's file system has no room for a job's pages."""

    def __init__(self, path: str, needed: int, free: int | None = None):
        self.path, self.needed, self.free = path, needed, free
        have = "" if free is None else f", {format_bytes(free)} free"
        super().__init__(f"no space for state file {path}: {format_bytes(needed)} ({needed} bytes) needed{have}")


class StateDirError(FailedPrecondition):
    """The state directory cannot hold a state file (missing, read-only, not a directory, no access)."""

    def __init__(self, path: str, needed: int, reason: str):
        self.path, self.needed, self.reason = path, needed, reason
        super().__init__(f"cannot write state file {path} ({format_bytes(needed)}, {needed} bytes): {reason}")


def free_bytes(directory: str) -> int | None:
    """Bytes an unprivileged writer may still allocate, or None where the file system does not say."""
    st = os.statvfs(directory)
    if st.f_blocks == 0:  # ramfs and some virtual file systems report no size at all
        return None
    return st.f_bavail * st.f_frsize


def check_sizes(page_bytes: int, pages: int) -> None:
    if not isinstance(page_bytes, int) or page_bytes <= 0:
        raise ValueError(f"invalid page_bytes {page_bytes!r}: expected a whole number > 0")
    if not isinstance(pages, int) or pages < 0:
        raise ValueError(f"invalid pages {pages!r}: expected a whole number >= 0")


def make_state_file(path: str, directory: str, job: str, page_bytes: int, pages: int, exclusive: bool = True) -> None:
    """Creates a state file at `path` (replacing a leftover when not `exclusive`): its header, and room
    for `pages` slots, fsynced. On failure nothing is left at `path`."""
    header = _HEADER.pack(_MAGIC, _VERSION, 0, page_bytes, align_up(page_bytes), len(job.encode()))
    header += job.encode()
    if len(header) > HEADER_BYTES:
        raise ValueError(f"invalid job name {job[:40]!r}: too long for a state file header")
    needed = HEADER_BYTES + pages * align_up(page_bytes)
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_EXCL if exclusive else os.O_TRUNC)
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        raise AlreadyExists(f"job {job!r} already has a state file {path}") from None
    except OSError as e:
        raise storage_error(e, path, directory, needed) from e
    try:
        try:
            os.pwrite(fd, header.ljust(HEADER_BYTES, b"\0"), 0)
        except OSError as e:
            raise storage_error(e, path, directory, needed) from e
        preallocate(fd, path, directory, HEADER_BYTES, pages * align_up(page_bytes), needed)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(path)
        raise
    os.close(fd)


def sync_directory(directory: str) -> None:
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def preallocate(fd: int, path: str, directory: str, offset: int, length: int, needed: int) -> None:
    """Reserves [offset, offset + length) so later writes cannot run out of space (Note [check before
    fallocate])."""
    if length == 0:
        return
    free = free_bytes(directory)
    if free is not None and free < needed:
        raise DiskSpaceError(path, needed, free)
    try:
        os.posix_fallocate(fd, offset, length)
    except OSError as e:
        if e.errno in (errno.EOPNOTSUPP, errno.ENOSYS):  # no preallocation here: size it, write later
            os.ftruncate(fd, offset + length)
            return
        raise storage_error(e, path, directory, needed) from e


def storage_error(e: OSError, path: str, directory: str, needed: int) -> Exception:
    """DiskSpaceError for a full file system or quota, StateDirError for anything else."""
    if e.errno in SPACE_ERRNOS:
        return DiskSpaceError(path, needed, free_bytes(directory))
    return StateDirError(path, needed, e.strerror or str(e))
