"""Real file systems for the drills, as root: a small tmpfs (a disk that fills up), and ext4 on a loop
device whose end can be cut off and given back (a device that fails with EIO).

Note [a failing loop device]
----------------------------
This machine's kernel has no device-mapper (no `error` or `flakey` target), so the failing device is a
loop device whose size limit (LOOP_SET_STATUS64's lo_sizelimit) is lowered below blocks that files
live on: the block layer then fails every read and write of those blocks with EIO ("attempt to access
beyond end of device"), O_DIRECT transfers included, while the blocks below the limit (ext4's
metadata, files written earlier) still work. Raising the limit again brings the blocks back intact: the
device failed, the data on it did not go. FIEMAP says which blocks a file lives on, so a drill cuts
exactly below a file it wants to fail, or just above everything written so far to fail what comes next.
"""

from __future__ import annotations

import array
import fcntl
import os
import shutil
import struct
import subprocess
from contextlib import contextmanager

import pytest

_LOOP_GET_STATUS64, _LOOP_SET_STATUS64 = 0x4C05, 0x4C04
_LOOP_INFO64 = struct.Struct("=QQQQQIIII64s64s32s2Q")  # struct loop_info64; lo_sizelimit is field 4
_FS_IOC_FIEMAP = 0xC020660B
_FIEMAP = struct.Struct("=QQIIII")  # struct fiemap, then fm_extent_count struct fiemap_extent
_EXTENT = struct.Struct("=QQQQQIIII")
_FIEMAP_FLAG_SYNC = 1
_MAX_EXTENTS = 512


def _need_root(tool: str) -> None:
    if os.geteuid() != 0:
        pytest.skip(f"needs root to {tool}; this test runs as uid {os.geteuid()}")


def _run(*command: str) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


@contextmanager
def tmpfs(path: str, size: int):
    """A tmpfs of `size` bytes mounted at `path` (created), unmounted at the end."""
    _need_root("mount a tmpfs")
    os.makedirs(path, exist_ok=True)
    done = _run("mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", path)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield path
    finally:
        _run("umount", "-l", path)


class LoopDisk:
    """ext4 on a loop device over an image file, mounted at `path`."""

    def __init__(self, device: str, image: str, path: str):
        self.device, self.image, self.path = device, image, path

    def limit(self, nbytes: int) -> None:
        """Fails every block from byte `nbytes` on with EIO (0: the whole device works again)."""
        fd = os.open(self.device, os.O_RDWR)
        try:
            info = bytearray(_LOOP_INFO64.size)
            fcntl.ioctl(fd, _LOOP_GET_STATUS64, info)
            fields = list(_LOOP_INFO64.unpack(info))
            fields[4] = nbytes
            fcntl.ioctl(fd, _LOOP_SET_STATUS64, _LOOP_INFO64.pack(*fields))
        finally:
            os.close(fd)
        expected = nbytes or os.path.getsize(self.image)
        with open(f"/sys/block/{os.path.basename(self.device)}/size") as f:
            if int(f.read()) * 512 != expected:
                raise RuntimeError(f"{self.device} did not take the size limit {nbytes}")


def extents(path: str) -> list[tuple[int, int]]:
    """(first byte, length) on the device of every extent of the file `path`."""
    request = bytearray(_FIEMAP.size + _MAX_EXTENTS * _EXTENT.size)
    _FIEMAP.pack_into(request, 0, 0, 0xFFFFFFFFFFFFFFFF, _FIEMAP_FLAG_SYNC, 0, _MAX_EXTENTS, 0)
    buffer = array.array("B", request)
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.ioctl(fd, _FS_IOC_FIEMAP, buffer, True)
    finally:
        os.close(fd)
    mapped = _FIEMAP.unpack_from(buffer, 0)[3]
    found = []
    for i in range(mapped):
        _logical, physical, length, *_rest = _EXTENT.unpack_from(buffer, _FIEMAP.size + i * _EXTENT.size)
        found.append((physical, length))
    return found


def end_of_data(root: str) -> int:
    """The device byte just past the last block any regular file under `root` lives on."""
    files = [os.path.join(directory, name) for directory, _dirs, names in os.walk(root) for name in names]
    ends = [start + length for path in files if os.path.isfile(path) and not os.path.islink(path)
            for start, length in extents(path)]
    return max(ends, default=0)


@contextmanager
def loop_ext4(path: str, size: int):
    """ext4 (4 KiB blocks, no journal, errors=continue) on a loop device over a sparse image of `size`
    bytes, mounted at `path`; unmounted and detached at the end. Skips where the machine allows none."""
    _need_root("set up a loop device")
    for tool in ("losetup", "mkfs.ext4", "mount"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    os.makedirs(path, exist_ok=True)
    image = os.path.join(os.path.dirname(path), "disk.img")
    with open(image, "wb") as f:
        f.truncate(size)
    attached = _run("losetup", "--find", "--show", image)
    if attached.returncode:
        pytest.skip(f"no loop device here: {attached.stderr.strip()}")
    device = attached.stdout.strip()
    try:
        made = _run("mkfs.ext4", "-q", "-F", "-b", "4096", "-O", "^has_journal", "-E", "nodiscard", device)
        if made.returncode:
            pytest.skip(f"cannot make ext4 on {device}: {made.stderr.strip()}")
        mounted = _run("mount", "-o", "errors=continue", device, path)
        if mounted.returncode:
            pytest.skip(f"cannot mount ext4 from {device}: {mounted.stderr.strip()}")
        # Every file allocated as a stream, one after the other: small ones otherwise go to a per-CPU
        # area far from the big ones, and a cut could not fail a newer file without an older one.
        with open(f"/sys/fs/ext4/{os.path.basename(device)}/mb_stream_req", "w") as f:
            f.write("0")
        disk = LoopDisk(device, image, path)
        try:
            yield disk
        finally:
            disk.limit(0)
            _run("umount", path)
    finally:
        _run("losetup", "-d", device)
