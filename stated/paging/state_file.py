"""The disk tier: one state file per job, each page in a fixed slot, moved with O_DIRECT.

DESIGN.md, "Pages, tiers, eviction, prefetch": pages that do not fit the host budget live in state
files under the state directory. Page `i` of a job sits at `HEADER_BYTES + i * slot_bytes` (a slot is
the page size rounded up to 4096), so a page is one aligned transfer that can never touch another.
The file is preallocated for all of the job's pages when it is created or grown, so a full disk is
reported at registration, not in the middle of a step. Transfers release the GIL (os.preadv,
os.pwritev, xxhash), so a thread pool overlaps them with the kernels (stated.paging.transfers).

Note [O_DIRECT and the page cache]
----------------------------------
Spilled state is bigger than host memory by definition; buffered I/O would make the page cache hold
a second copy of it and evict the host pages' neighbours. O_DIRECT needs the buffer address, file
offset and length aligned to 4096: buffers from `allocate_aligned` (an anonymous mmap, page-aligned)
or torch tensors made over one with `torch.frombuffer` are used as they are; anything else goes
through a per-thread aligned bounce buffer. A file system that refuses O_DIRECT (EINVAL at open or
at the first transfer, e.g. ramfs) gets buffered I/O and one warning per state directory.

Note [page checksums]
---------------------
Every write returns the checksum (64-bit XXH3) of the page's `page_bytes` bytes; every read verifies it and raises
PageCorruptError (gRPC DATA_LOSS) on a mismatch. The checksums are metadata: the page table holds
them and checkpoints write them to manifests. A StateFile also remembers the ones written through it,
so `read` can verify without being told. A write that fails leaves the remembered checksum at the
previous value, so a torn page is reported when it is read rather than returned. A transfer the device
fails (EIO and the like) raises PageIOError, also DATA_LOSS, naming the page and the file.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import mmap
import os
import struct
import threading
import urllib.parse

import numpy as np
import xxhash

from stated.errors import AlreadyExists, DataLoss, FailedPrecondition, ResourceExhausted
from stated.sizes import format_bytes

log = logging.getLogger("stated.paging.state_file")

DIRECT_ALIGN = 4096
HEADER_BYTES = DIRECT_ALIGN
_MAGIC = b"STATEDPG"
_HEADER = struct.Struct("<8sIIQQI")  # magic, version, reserved, page_bytes, slot_bytes, job name bytes
_VERSION = 1
_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)

_warned_dirs: set[str] = set()
_warn_lock = threading.Lock()
_bounce = threading.local()


class PageCorruptError(DataLoss):
    """A page read back does not match the checksum of what was written (Note [page checksums])."""

    def __init__(self, job: str, page: int, path: str, expected: int, found: int):
        self.job, self.page, self.path, self.expected, self.found = job, page, path, expected, found
        super().__init__(f"page {page} of job {job!r} is corrupt in {path}: "
                         f"checksum {found:#010x}, expected {expected:#010x}")


class PageIOError(DataLoss):
    """The state file's device failed a page's transfer (EIO and the like): the page cannot be had."""

    def __init__(self, job: str, page: int, path: str, write: bool, error: OSError):
        self.job, self.page, self.path, self.error = job, page, path, error
        super().__init__(f"{'writing' if write else 'reading'} page {page} of job {job!r} "
                         f"{'to' if write else 'from'} {path} failed: {error.strerror or error}")


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


def checksum_of(data) -> int:
    """The page checksum: 64-bit XXH3 of the bytes."""
    return xxhash.xxh3_64_intdigest(data)


def align_up(n: int, to: int = DIRECT_ALIGN) -> int:
    return -(-n // to) * to


def allocate_aligned(nbytes: int) -> mmap.mmap:
    """Zeroed, page-aligned memory of `nbytes` rounded up to 4096; `torch.frombuffer` makes it a tensor."""
    return mmap.mmap(-1, align_up(max(nbytes, 1)))


# A file name holds at most NAME_MAX bytes; a job's state file and checkpoint directory are named after it.
MAX_NAME_BYTES = 255
STATE_SUFFIX = ".state"


def encoded_job_name(job: str) -> str:
    """`job` as a file name: percent-encoded, so that no job name can leave its directory, with a leading
    dot escaped, so that none is hidden or '..'."""
    name = urllib.parse.quote(job, safe="-_.")
    return "%2E" + name[1:] if name.startswith(".") else name


def state_path(directory: str, job: str) -> str:
    """The state file of `job`, named after it (`encoded_job_name`)."""
    if not isinstance(job, str) or not job:
        raise ValueError(f"invalid job name {job!r}: expected a non-empty string")
    name = encoded_job_name(job) + STATE_SUFFIX
    if len(name.encode()) > MAX_NAME_BYTES:
        raise ValueError(f"invalid job name {job[:40]!r}...: too long for a state file name")
    return os.path.join(directory, name)


def _free_bytes(directory: str) -> int | None:
    """Bytes an unprivileged writer may still allocate, or None where the file system does not say."""
    st = os.statvfs(directory)
    if st.f_blocks == 0:  # ramfs and some virtual file systems report no size at all
        return None
    return st.f_bavail * st.f_frsize


def _warn_buffered(directory: str, error: OSError) -> None:
    with _warn_lock:
        if directory in _warned_dirs:
            return
        _warned_dirs.add(directory)
    log.warning("the file system of %s refuses O_DIRECT (%s); its state files use buffered I/O, so the "
                "page cache may hold a second copy of spilled pages", directory, error.strerror or error)


def _as_array(buffer, writable: bool) -> np.ndarray:
    """A flat uint8 view of a torch CPU tensor, mmap, bytearray or memoryview, without copying."""
    if hasattr(buffer, "data_ptr") and hasattr(buffer, "numpy"):  # a torch tensor; torch is not imported
        if buffer.device.type != "cpu" or not buffer.is_contiguous():
            raise ValueError(f"expected a contiguous CPU tensor, got one on {buffer.device} "
                             f"(contiguous: {buffer.is_contiguous()})")
        arr = buffer.detach().numpy()
    else:
        arr = np.frombuffer(buffer, dtype=np.uint8)
    arr = arr.reshape(-1).view(np.uint8)
    if writable and not arr.flags.writeable:
        raise ValueError("the buffer to read into is read-only")
    return arr


class StateFile:
    """The state file of one job. Thread-safe for transfers of different pages."""

    def __init__(self, path: str, job: str, page_bytes: int, pages: int, directory: str):
        self.path, self.job, self.page_bytes, self.pages = path, job, page_bytes, pages
        self.slot_bytes = align_up(page_bytes)
        self.directory = directory
        self.checksums: list[int | None] = [None] * pages
        self.direct = True
        self._lock = threading.Lock()
        self._fd = self._open_fd()

    @classmethod
    def create(cls, directory: str, job: str, page_bytes: int, pages: int) -> StateFile:
        """A new, preallocated state file for `pages` pages of `page_bytes` (Note [O_DIRECT ...]).

        Raises DiskSpaceError when the file system cannot hold it, StateDirError when the directory
        cannot be written, and AlreadyExists when the job already has a state file there.
        """
        if not isinstance(page_bytes, int) or page_bytes <= 0:
            raise ValueError(f"invalid page_bytes {page_bytes!r}: expected a whole number > 0")
        if not isinstance(pages, int) or pages < 0:
            raise ValueError(f"invalid pages {pages!r}: expected a whole number >= 0")
        path = state_path(directory, job)
        header = _HEADER.pack(_MAGIC, _VERSION, 0, page_bytes, align_up(page_bytes), len(job.encode()))
        header += job.encode()
        if len(header) > HEADER_BYTES:
            raise ValueError(f"invalid job name {job[:40]!r}: too long for a state file header")
        needed = HEADER_BYTES + pages * align_up(page_bytes)
        try:
            os.makedirs(directory, mode=0o700, exist_ok=True)
        except OSError as e:  # FileExistsError here means a non-directory is in the way
            raise _storage_error(e, path, directory, needed) from e
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            raise AlreadyExists(f"job {job!r} already has a state file {path}") from None
        except OSError as e:
            raise _storage_error(e, path, directory, needed) from e
        try:
            try:
                os.pwrite(fd, header.ljust(HEADER_BYTES, b"\0"), 0)
            except OSError as e:
                raise _storage_error(e, path, directory, needed) from e
            _preallocate(fd, path, directory, HEADER_BYTES, pages * align_up(page_bytes), needed)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            os.unlink(path)
            raise
        os.close(fd)
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)  # the new name survives a crash
        finally:
            os.close(dir_fd)
        return cls(path, job, page_bytes, pages, directory)

    def grow(self, pages: int) -> None:
        """Makes room for `pages` pages in all (a job registered more tensors); on failure nothing changes."""
        if pages <= self.pages:
            return
        old_size = HEADER_BYTES + self.pages * self.slot_bytes
        added = (pages - self.pages) * self.slot_bytes
        fd = os.open(self.path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            try:
                _preallocate(fd, self.path, self.directory, old_size, added, added)
            except BaseException:
                os.ftruncate(fd, old_size)  # drop whatever part of the range was allocated
                raise
        finally:
            os.close(fd)
        with self._lock:
            self.checksums.extend([None] * (pages - self.pages))
            self.pages = pages

    def write(self, page: int, buffer) -> int:
        """Writes the first `page_bytes` bytes of `buffer` to page `page`; returns their checksum.

        XXH3 rather than crc32: it hashes at over 10 GB/s where zlib's crc32 manages about 1.3 GB/s, which
        on a two-core machine would cost as much CPU as the disk transfer itself."""
        arr = _as_array(buffer, writable=False)
        self._check(page, arr)
        checksum = checksum_of(arr[: self.page_bytes])
        self._transfer_page(page, arr, write=True)
        self.checksums[page] = checksum
        return checksum

    def read(self, page: int, into, checksum: int | None = None) -> int:
        """Reads page `page` into the first `page_bytes` bytes of `into` and verifies it against
        `checksum` (default: the one remembered from the last write); returns the checksum."""
        arr = _as_array(into, writable=True)
        self._check(page, arr)
        expected = self.checksums[page] if checksum is None else checksum
        if expected is None:
            raise ValueError(f"page {page} of job {self.job!r} was never written: no checksum to verify")
        self._transfer_page(page, arr, write=False)
        found = checksum_of(arr[: self.page_bytes])
        if found != expected:
            raise PageCorruptError(self.job, page, self.path, expected, found)
        return found

    def sync(self) -> None:
        """Makes written pages durable (O_DIRECT bypasses the page cache, not the device's cache)."""
        os.fsync(self._fd)

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    def remove(self) -> None:
        """Closes and deletes the state file (the job was dropped)."""
        self.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def _check(self, page: int, arr: np.ndarray) -> None:
        if not 0 <= page < self.pages:
            raise IndexError(f"page {page} out of range for job {self.job!r} ({self.pages} pages)")
        if arr.nbytes < self.page_bytes:
            raise ValueError(f"buffer of {arr.nbytes} bytes is smaller than a page ({self.page_bytes} bytes)")

    def _open_fd(self) -> int:
        flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            return os.open(self.path, flags | os.O_DIRECT)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            _warn_buffered(self.directory, e)
            self.direct = False
        return os.open(self.path, flags)

    def _transfer_page(self, page: int, arr: np.ndarray, write: bool) -> None:
        """`_transfer`, with a device's failure reported as the page's (PageIOError, DATA_LOSS)."""
        try:
            self._transfer(page, arr, write)
        except OSError as e:
            raise PageIOError(self.job, page, self.path, write, e) from e

    def _transfer(self, page: int, arr: np.ndarray, write: bool) -> None:
        """Moves one slot between `arr` and the file, through the bounce buffer when `arr` is unaligned."""
        offset = HEADER_BYTES + page * self.slot_bytes
        if not self.direct:
            self._io(memoryview(arr)[: self.page_bytes], offset, write)
            return
        aligned = arr.ctypes.data % DIRECT_ALIGN == 0 and arr.nbytes >= self.slot_bytes
        target = arr if aligned else self._bounce()
        if write and not aligned:
            target[: self.page_bytes] = arr[: self.page_bytes]
            target[self.page_bytes : self.slot_bytes] = 0  # no stale bytes of another page on disk
        try:
            self._io(memoryview(target)[: self.slot_bytes], offset, write)
        except OSError as e:
            if e.errno != errno.EINVAL or not self.direct:
                raise
            # The file system took O_DIRECT at open but refuses the transfer: go buffered for good,
            # on the same descriptor (F_SETFL), so transfers in other threads never see it change.
            with self._lock:
                if self.direct:
                    _warn_buffered(self.directory, e)
                    self.direct = False
                    fcntl.fcntl(self._fd, fcntl.F_SETFL, fcntl.fcntl(self._fd, fcntl.F_GETFL) & ~os.O_DIRECT)
            self._io(memoryview(target)[: self.slot_bytes], offset, write)
        if not write and not aligned:
            arr[: self.page_bytes] = target[: self.page_bytes]

    def _io(self, view: memoryview, offset: int, write: bool) -> None:
        done, total = 0, len(view)
        while done < total:
            try:
                if write:
                    n = os.pwritev(self._fd, [view[done:]], offset + done)
                else:
                    n = os.preadv(self._fd, [view[done:]], offset + done)
            except OSError as e:
                if write and e.errno in _SPACE_ERRNOS:
                    raise DiskSpaceError(self.path, total - done, _free_bytes(self.directory)) from e
                raise
            if n == 0 and write:
                raise OSError(errno.EIO, f"write of {total - done} bytes made no progress", self.path)
            if n == 0:  # end of file: a truncated state file; the checksum reports the page
                view[done:] = bytes(total - done)
                return
            done += n

    def _bounce(self) -> np.ndarray:
        buf = getattr(_bounce, "buffer", None)
        if buf is None or len(buf) < self.slot_bytes:
            buf = _bounce.buffer = allocate_aligned(self.slot_bytes)
        return np.frombuffer(buf, dtype=np.uint8)


def _preallocate(fd: int, path: str, directory: str, offset: int, length: int, needed: int) -> None:
    """Reserves [offset, offset + length) so later writes cannot run out of space.

    Note [check before fallocate]: on ext4 and xfs a fallocate larger than the free space allocates
    blocks until the disk is full before it fails, starving every other writer meanwhile; so the
    free space is checked first, and fallocate's own ENOSPC is the backstop for races.
    """
    if length == 0:
        return
    free = _free_bytes(directory)
    if free is not None and free < needed:
        raise DiskSpaceError(path, needed, free)
    try:
        os.posix_fallocate(fd, offset, length)
    except OSError as e:
        if e.errno in (errno.EOPNOTSUPP, errno.ENOSYS):  # no preallocation here: size it, write later
            os.ftruncate(fd, offset + length)
            return
        raise _storage_error(e, path, directory, needed) from e


def _storage_error(e: OSError, path: str, directory: str, needed: int) -> Exception:
    """DiskSpaceError for a full file system or quota, StateDirError for anything else."""
    if e.errno in _SPACE_ERRNOS:
        return DiskSpaceError(path, needed, _free_bytes(directory))
    return StateDirError(path, needed, e.strerror or str(e))
