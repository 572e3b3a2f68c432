"""Checkpoint data files: written once, front to back, with O_DIRECT; read back the same way.

A checkpoint's pages and parameters are far bigger than the page cache should hold twice (Note [O_DIRECT
and the page cache] in stated.paging.state_file), and a checkpoint is only durable once its bytes are on
the device, so they bypass the cache and `finish` fsyncs. Buffers that are 4096-aligned (page pool
slots, shared-memory arenas) go to the device as they are; an unaligned tail goes through a bounce
buffer. A file system that refuses O_DIRECT gets buffered I/O, which fsync makes just as durable.

Note [transfers in flight]
--------------------------
One buffer moves in CHUNK pieces, IN_FLIGHT of them at a time on a shared pool of threads, and the call
returns once every piece is done. Several requests queued keep the device busy across each request's
completion, and reading into memory never touched before (a resumed job's new arenas) is bound by the
page faults, which then run on more than one core. One piece at a time, a restarted daemon read a
resumed 200M job's param arena at 0.36 GB/s (bench/checkpoint.py, profiled); on their own, 8 MiB
reads into fresh shared memory ran at 0.33-0.41 GB/s one at a time and 0.60-0.66 GB/s four at a time.
Only whole 4096-byte blocks of an aligned buffer go to the pool; an unaligned buffer goes through the
bounce buffer one piece at a time, as before.
"""

from __future__ import annotations

import concurrent.futures as cf
import errno
import fcntl
import os

import numpy as np

from stated.errors import DataLoss
from stated.paging.state_file import allocate_aligned
from stated.paging.state_file_space import DIRECT_ALIGN, DiskSpaceError, StateDirError, align_up

_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# Bytes moved per system call: large enough for the device's full speed, small enough for a bounce.
CHUNK = 8 << 20
IN_FLIGHT = 4  # Note [transfers in flight]
_movers = cf.ThreadPoolExecutor(max_workers=IN_FLIGHT, thread_name_prefix="stated-direct-io")


class CheckpointIOError(DataLoss):
    """The device failed a checkpoint file's transfer (EIO and the like)."""

    def __init__(self, path: str, write: bool, error: OSError):
        self.path, self.error = path, error
        super().__init__(f"{'writing' if write else 'reading'} checkpoint file {path} failed: "
                         f"{error.strerror or error}")


def _view(buffer) -> np.ndarray:
    """A flat uint8 view of a torch CPU tensor, mmap or bytes-like object, without copying."""
    if hasattr(buffer, "numpy"):
        return buffer.detach().reshape(-1).numpy().view(np.uint8)
    return np.frombuffer(buffer, dtype=np.uint8)


class DirectFile:
    """One checkpoint data file, opened to write it (`create`) or to read it (`open`)."""

    def __init__(self, path: str, fd: int, write: bool):
        self.path, self._fd, self.write_mode = path, fd, write
        self.direct = bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT)
        self._bounce = np.frombuffer(allocate_aligned(CHUNK), dtype=np.uint8)
        self.size = 0

    @classmethod
    def create(cls, path: str, nbytes: int) -> DirectFile:
        """A new file of `nbytes` (reserved now, so that a full disk fails here and not half-way)."""
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            try:
                fd = os.open(path, flags | os.O_DIRECT, 0o600)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                fd = os.open(path, flags, 0o600)
        except OSError as e:
            raise storage_error(e, path, nbytes, write=True) from e
        try:
            if nbytes:
                os.posix_fallocate(fd, 0, align_up(nbytes))
        except OSError as e:
            os.close(fd)
            os.unlink(path)
            if e.errno in (errno.EOPNOTSUPP, errno.ENOSYS):
                return cls.create_unreserved(path)
            raise storage_error(e, path, nbytes, write=True) from e
        return cls(path, fd, write=True)

    @classmethod
    def create_unreserved(cls, path: str) -> DirectFile:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        return cls(path, fd, write=True)

    @classmethod
    def open(cls, path: str) -> DirectFile:
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            try:
                fd = os.open(path, flags | os.O_DIRECT)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                fd = os.open(path, flags)
        except OSError as e:
            raise storage_error(e, path, 0, write=False) from e
        f = cls(path, fd, write=False)
        f.size = os.fstat(fd).st_size
        return f

    def write_at(self, offset: int, buffer, nbytes: int) -> None:
        """Writes the first `nbytes` of `buffer` at `offset` (a multiple of 4096); the slot's padding
        up to the next 4096 is written as zeros."""
        self._move(offset, _view(buffer)[:nbytes], write=True)

    def read_at(self, offset: int, buffer, nbytes: int) -> None:
        """Reads `nbytes` at `offset` (a multiple of 4096) into the first `nbytes` of `buffer`."""
        if offset + nbytes > self.size:
            raise DataLoss(f"checkpoint file {self.path} is {self.size} bytes, too short for "
                           f"{nbytes} bytes at {offset}: it was cut short")
        self._move(offset, _view(buffer)[:nbytes], write=False)

    def _move(self, offset: int, arr: np.ndarray, write: bool) -> None:
        if offset % DIRECT_ALIGN:
            raise ValueError(f"offset {offset} is not a multiple of {DIRECT_ALIGN}")
        try:
            whole = arr.nbytes - arr.nbytes % DIRECT_ALIGN if arr.ctypes.data % DIRECT_ALIGN == 0 else 0
            if not self.direct:
                whole = arr.nbytes
            self._move_in_flight(offset, arr[:whole], write)
            for done in range(whole, arr.nbytes, CHUNK):  # the unaligned rest, through the bounce buffer
                self._bounced(offset + done, arr[done: done + CHUNK], write)
            if write:
                self.size = max(self.size, offset + align_up(arr.nbytes))
        except OSError as e:
            raise storage_error(e, self.path, arr.nbytes, write) from e

    def _move_in_flight(self, offset: int, arr: np.ndarray, write: bool) -> None:
        """Moves `arr` (whole blocks) in CHUNK pieces, IN_FLIGHT at a time; returns when all are done,
        raising the first error (no piece is still moving when it raises)."""
        pieces = [(arr[done: done + CHUNK], offset + done) for done in range(0, arr.nbytes, CHUNK)]
        if len(pieces) <= 1:
            for piece, at in pieces:
                self._io(piece, at, write)
            return
        futures = [_movers.submit(self._io, piece, at, write) for piece, at in pieces]
        cf.wait(futures)
        for future in futures:
            future.result()

    def _bounced(self, offset: int, piece: np.ndarray, write: bool) -> None:
        """Moves `piece` (at most CHUNK bytes) through the bounce buffer, padded to whole blocks."""
        n = piece.nbytes
        bounce = self._bounce[:align_up(n)]
        if write:
            bounce[:n] = piece
            bounce[n:] = 0
            self._io(bounce, offset, write)
        else:
            self._io(bounce, offset, write, allow_short=True)
            piece[:] = bounce[:n]

    def _io(self, arr: np.ndarray, offset: int, write: bool, allow_short: bool = False) -> None:
        view, done = memoryview(arr), 0
        while done < len(view):
            if write:
                n = os.pwritev(self._fd, [view[done:]], offset + done)
            else:
                n = os.preadv(self._fd, [view[done:]], offset + done)
            if n == 0:
                if not write and allow_short:
                    view[done:] = bytes(len(view) - done)
                    return
                raise OSError(errno.EIO, "transfer made no progress (file cut short?)", self.path)
            done += n

    def finish(self) -> None:
        """Makes what was written durable and closes the file."""
        try:
            if self.write_mode:
                os.fsync(self._fd)
        except OSError as e:
            raise storage_error(e, self.path, 0, write=True) from e
        finally:
            self.close()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def storage_error(e: OSError, path: str, nbytes: int, write: bool) -> Exception:
    """The error that names a failed file operation: disk full, the device's failure, or the directory."""
    if isinstance(e, DataLoss):
        return e
    if e.errno in _SPACE_ERRNOS:
        directory = os.path.dirname(path)
        st = os.statvfs(directory) if os.path.isdir(directory) else None
        return DiskSpaceError(path, nbytes, st.f_bavail * st.f_frsize if st and st.f_blocks else None)
    if e.errno in (errno.EIO, errno.EROFS, errno.ENXIO) or not write and e.errno != errno.ENOENT:
        return CheckpointIOError(path, write, e)
    return StateDirError(path, nbytes, e.strerror or str(e))
