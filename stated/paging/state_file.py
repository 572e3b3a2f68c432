"""The disk tier: one state file per (job, rank), each page in a fixed slot, moved with O_DIRECT.

DESIGN.md, "Pages, tiers, eviction, prefetch": pages that do not fit the host budget live in state
files under the state directory. Page `i` of a session sits at `HEADER_BYTES + i * slot_bytes` (a slot
is the page size rounded up to 4096), so a page is one aligned transfer that can never touch another.
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

Note [frozen state files]
-------------------------
A paged session's checkpoint does not copy its spilled pages: they are already on disk, in this file.
`freeze` makes the file as it stands part of the checkpoint (a hard link in the rank's checkpoint
directory, stated.durability.checkpoint) and puts a fresh, preallocated file under the state file's
name for the writes from then on. The frozen file is never written again; a page not written since is
read from it (its descriptor stays open, as long as any page is still read from it, whatever happens to
its names), a page written since from the new file. Each file is a generation; `_source` says which
holds each page's last write. Disk use stays what copying cost: the live file plus the files the
checkpoints kept read, one each where copying wrote one `.pages` file each.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import mmap
import os
import threading
import urllib.parse

import numpy as np
import xxhash

from stated.errors import DataLoss
from stated.paging.state_file_space import (DIRECT_ALIGN, HEADER_BYTES, SPACE_ERRNOS, DiskSpaceError, align_up,
                                            check_sizes, free_bytes, make_state_file, preallocate, storage_error,
                                            sync_directory)

log = logging.getLogger("stated.paging.state_file")


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


def checksum_of(data) -> int:
    """The page checksum: 64-bit XXH3 of the bytes."""
    return xxhash.xxh3_64_intdigest(data)


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


# Room a state file name keeps for its rank: "." and up to 10 digits (a rank is a uint32).
RANK_NAME_BYTES = 11


def state_path(directory: str, job: str, rank: int = 0) -> str:
    """The state file of (`job`, `rank`): `<job, encoded_job_name>.<rank>.state`. The rank is the last
    dot-separated part before the suffix and all digits, so no two (job, rank)s share a name."""
    if not isinstance(job, str) or not job:
        raise ValueError(f"invalid job name {job!r}: expected a non-empty string")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 0:
        raise ValueError(f"invalid rank {rank!r}: expected a whole number >= 0")
    name = f"{encoded_job_name(job)}.{rank}{STATE_SUFFIX}"
    if len(name.encode()) > MAX_NAME_BYTES:
        raise ValueError(f"invalid job name {job[:40]!r}...: too long for a state file name")
    return os.path.join(directory, name)


# The name a state file's next generation is made under before it takes the state file's name (Note
# [frozen state files]): it ends in STATE_SUFFIX, so a daemon that dies half-way leaves nothing the next
# one's clean-up misses, and never in ".<digits>.state", so it is no (job, rank)'s name.
NEXT_SUFFIX = ".next" + STATE_SUFFIX


def next_generation_path(path: str) -> str:
    return path[: -len(STATE_SUFFIX)] + NEXT_SUFFIX


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
        self._fd = self._open_fd(path)
        # Note [frozen state files]: the generation that holds each page's last write; the current one's
        # number; and each frozen generation still read from, its descriptor and how many pages it holds.
        self._source = [0] * pages
        self._generation = 0
        self._frozen: dict[int, list[int]] = {}

    @classmethod
    def create(cls, directory: str, job: str, page_bytes: int, pages: int, rank: int = 0,
               replace: bool = False) -> StateFile:
        """A new, preallocated state file for `pages` pages of `page_bytes` (Note [O_DIRECT ...]).

        Raises DiskSpaceError when the file system cannot hold it, StateDirError when the directory
        cannot be written, and AlreadyExists when the (job, rank) already has a state file there,
        unless `replace`: then the new file takes the name, and the old one lives on for whoever still
        has it open (a session being replaced by one built from a checkpoint).
        """
        check_sizes(page_bytes, pages)
        path = state_path(directory, job, rank)
        try:
            os.makedirs(directory, mode=0o700, exist_ok=True)
        except OSError as e:  # FileExistsError here means a non-directory is in the way
            raise storage_error(e, path, directory, HEADER_BYTES + pages * align_up(page_bytes)) from e
        if replace:
            made = next_generation_path(path)
            make_state_file(made, directory, job, page_bytes, pages, exclusive=False)
            os.rename(made, path)
        else:
            make_state_file(path, directory, job, page_bytes, pages)
        sync_directory(directory)  # the new name survives a crash
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
                preallocate(fd, self.path, self.directory, old_size, added, added)
            except BaseException:
                os.ftruncate(fd, old_size)  # drop whatever part of the range was allocated
                raise
        finally:
            os.close(fd)
        with self._lock:
            self.checksums.extend([None] * (pages - self.pages))
            self._source.extend([self._generation] * (pages - self.pages))
            self.pages = pages

    def offset_of(self, page: int) -> int:
        """Where page `page` starts in the file (in every generation of it)."""
        return HEADER_BYTES + page * self.slot_bytes

    def holds_current(self, page: int) -> bool:
        """Whether the page's last write is in the file under the state file's name now, not in a frozen
        generation (Note [frozen state files])."""
        return self.checksums[page] is not None and self._source[page] == self._generation

    def freeze(self, link: str) -> None:
        """Makes the file as it stands durable and names it `link` too, then carries on in a fresh
        generation (Note [frozen state files]). On failure nothing changes: DiskSpaceError or StateDirError
        for the next generation, OSError for the link (EXDEV: another file system). The caller syncs
        `link`'s directory."""
        os.fsync(self._fd)
        next_path = next_generation_path(self.path)
        make_state_file(next_path, self.directory, self.job, self.page_bytes, self.pages, exclusive=False)
        try:
            fd = self._open_fd(next_path)
        except BaseException:
            os.unlink(next_path)
            raise
        try:
            os.link(self.path, link)
            os.rename(next_path, self.path)
        except BaseException:
            os.close(fd)
            os.unlink(next_path)
            raise
        sync_directory(self.directory)
        with self._lock:
            held = sum(1 for p in range(self.pages) if self.holds_current(p))
            if held:
                self._frozen[self._generation] = [self._fd, held]
            else:
                os.close(self._fd)
            self._fd, self._generation = fd, self._generation + 1

    def write(self, page: int, buffer) -> int:
        """Writes the first `page_bytes` bytes of `buffer` to page `page`; returns their checksum.

        XXH3 rather than crc32: it hashes at over 10 GB/s where zlib's crc32 manages about 1.3 GB/s, which
        on a two-core machine would cost as much CPU as the disk transfer itself."""
        arr = _as_array(buffer, writable=False)
        self._check(page, arr)
        checksum = checksum_of(arr[: self.page_bytes])
        self._transfer_page(page, arr, write=True)
        with self._lock:
            self.checksums[page] = checksum
            self._moved_to_current(page)
        return checksum

    def _moved_to_current(self, page: int) -> None:
        """The page's last write is in the current generation now; a frozen one it leaves may close."""
        old, self._source[page] = self._source[page], self._generation
        frozen = self._frozen.get(old) if old != self._generation else None
        if frozen is not None:
            frozen[1] -= 1
            if frozen[1] == 0:
                os.close(self._frozen.pop(old)[0])

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
            for fd, _held in self._frozen.values():
                os.close(fd)
            self._frozen.clear()

    def remove(self) -> None:
        """Closes and deletes the state file (its session is gone), unless another file has taken its
        name meanwhile (`create` with `replace`)."""
        with self._lock:
            try:
                mine = self._fd >= 0 and os.path.samestat(os.fstat(self._fd), os.stat(self.path))
            except FileNotFoundError:
                mine = False
        self.close()
        if mine:
            os.unlink(self.path)

    def _check(self, page: int, arr: np.ndarray) -> None:
        if not 0 <= page < self.pages:
            raise IndexError(f"page {page} out of range for job {self.job!r} ({self.pages} pages)")
        if arr.nbytes < self.page_bytes:
            raise ValueError(f"buffer of {arr.nbytes} bytes is smaller than a page ({self.page_bytes} bytes)")

    def _open_fd(self, path: str) -> int:
        flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC
        if self.direct:
            try:
                return os.open(path, flags | os.O_DIRECT)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                _warn_buffered(self.directory, e)
                self.direct = False
        return os.open(path, flags)

    def _transfer_page(self, page: int, arr: np.ndarray, write: bool) -> None:
        """`_transfer`, with a device's failure reported as the page's (PageIOError, DATA_LOSS)."""
        try:
            self._transfer(page, arr, write)
        except OSError as e:
            raise PageIOError(self.job, page, self.path, write, e) from e

    def _transfer(self, page: int, arr: np.ndarray, write: bool) -> None:
        """Moves one slot between `arr` and the file, through the bounce buffer when `arr` is unaligned.
        A read is from the generation that holds the page (Note [frozen state files]), a write to the
        current one."""
        offset = self.offset_of(page)
        with self._lock:
            source = self._source[page]
            fd = self._fd if write or source == self._generation else self._frozen[source][0]
        if not self.direct:
            self._io(fd, memoryview(arr)[: self.page_bytes], offset, write)
            return
        aligned = arr.ctypes.data % DIRECT_ALIGN == 0 and arr.nbytes >= self.slot_bytes
        target = arr if aligned else self._bounce()
        if write and not aligned:
            target[: self.page_bytes] = arr[: self.page_bytes]
            target[self.page_bytes : self.slot_bytes] = 0  # no stale bytes of another page on disk
        try:
            self._io(fd, memoryview(target)[: self.slot_bytes], offset, write)
        except OSError as e:
            if e.errno != errno.EINVAL or not self.direct:
                raise
            # The file system took O_DIRECT at open but refuses the transfer: go buffered for good,
            # on the same descriptor (F_SETFL), so transfers in other threads never see it change.
            with self._lock:
                if self.direct:
                    _warn_buffered(self.directory, e)
                    self.direct = False
                    for each in [self._fd] + [frozen[0] for frozen in self._frozen.values()]:
                        fcntl.fcntl(each, fcntl.F_SETFL, fcntl.fcntl(each, fcntl.F_GETFL) & ~os.O_DIRECT)
            self._io(fd, memoryview(target)[: self.slot_bytes], offset, write)
        if not write and not aligned:
            arr[: self.page_bytes] = target[: self.page_bytes]

    def _io(self, fd: int, view: memoryview, offset: int, write: bool) -> None:
        done, total = 0, len(view)
        while done < total:
            try:
                if write:
                    n = os.pwritev(fd, [view[done:]], offset + done)
                else:
                    n = os.preadv(fd, [view[done:]], offset + done)
            except OSError as e:
                if write and e.errno in SPACE_ERRNOS:
                    raise DiskSpaceError(self.path, total - done, free_bytes(self.directory)) from e
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
