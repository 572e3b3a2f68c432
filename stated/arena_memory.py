"""Arena memory: the anonymous memory files (memfd) that hold a CPU region's parameters and gradients.

Note [arenas as file descriptors]
---------------------------------
An arena has no name anywhere: the daemon creates it with memfd_create and hands its file descriptor
only to the session it belongs to, over the step socket, after that connection authenticated with the
session's token and the job owner's uid (SCM_RIGHTS, stated.server.step_channel; the client's end is
stated_client.arena_receiving). So no other process, of the same user or group or not, can open another
session's arena: there is no path to open, and the daemon is not dumpable (`stated serve` sets
PR_SET_DUMPABLE 0), so /proc/<daemon>/fd is closed to its own user too. Nothing can be left behind: the
memory goes when the last process holding the file or a mapping of it goes.

The memory is reserved when Register promises it (fallocate, after checking the room the machine and
its cgroup have), so running out is RESOURCE_EXHAUSTED at Register and never a SIGBUS in a step. Each
file is sealed against shrinking and growing before its descriptor leaves the daemon: a client that
truncates its arena (by mistake or not) gets EPERM instead of killing the daemon with SIGBUS.
"""

from __future__ import annotations

import errno
import fcntl
import os
import resource
import threading

import torch

from stated.errors import ResourceExhausted
from stated.sizes import format_bytes
from stated_client.memory_mapping import map_shared

# The name memfd_create gives (shown as /memfd:stated-params in /proc/<pid>/maps): for people reading
# maps, it opens nothing.
NAME_PREFIX = "stated-"
SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
# Room left to everything else on the machine (or in the cgroup) when arenas are reserved: a few percent
# of the memory, at least 64 MiB and at most 1 GiB, so that the daemon's own heap and the trainers'
# Python can still grow after a Register that took nearly all of it.
HEADROOM_FRACTION = 0.05
MIN_HEADROOM = 64 << 20
MAX_HEADROOM = 1 << 30
CGROUP_ROOT = "/sys/fs/cgroup"
NO_LIMIT = 1 << 60
_reserving = threading.Lock()
# File descriptors kept free for everything but arenas: connections, state files, /proc reads.
DESCRIPTOR_RESERVE = 64


class Segment:
    """One arena: a sealed memfd of `nbytes` (at least one byte: a zero-length mapping is not allowed),
    mapped here as a flat uint8 tensor; `fd` is what the session is sent."""

    def __init__(self, kind: str, fd: int, nbytes: int, tensor: torch.Tensor):
        self.kind = kind
        self.fd = fd
        self.nbytes = nbytes
        self.tensor = tensor

    @classmethod
    def create(cls, kind: str, nbytes: int) -> "Segment":
        """A new arena of `nbytes`, its memory reserved (the caller checked the room: create_pair)."""
        size = max(nbytes, 1)
        what = f"the {kind} arena"
        fd = _no_descriptor_left(lambda: os.memfd_create(NAME_PREFIX + kind, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING),
                                 what)
        try:
            _reserve(fd, size, kind)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
            tensor = _no_descriptor_left(lambda: map_shared(fd, nbytes), what)
        except BaseException:
            os.close(fd)
            raise
        return cls(kind, fd, nbytes, tensor)

    def close(self) -> None:
        """Closes the file and drops our mapping once no tensor views keep it alive (a client's mapping
        keeps the memory until that client lets go of it too)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.tensor = None  # the mapping goes when the last view of it does (stated_client.memory_mapping)


def create_pair(nbytes: int) -> tuple[Segment, Segment]:
    """A region's param and grad arenas of `nbytes` each, their memory reserved; ResourceExhausted (naming
    the bytes, or the open-files limit) when the machine, the daemon's cgroup or its descriptors have not
    room for both. One check for both, under one lock: two Registers at once must not both see the same
    room free."""
    what = "the param and grad arenas"
    with _reserving:
        check_room(2 * max(nbytes, 1), what)
        check_descriptors(2, what)
        params = Segment.create("params", nbytes)
        try:
            return params, Segment.create("grads", nbytes)
        except BaseException:
            params.close()
            raise


class Duplicates:
    """Copies of some arenas' descriptors (os.dup), closed when the `with` block ends: what a step channel
    thread sends once it no longer holds the session's lock, which the originals may not outlive."""

    def __init__(self, segments: list[Segment]):
        self.fds: list[int] = []
        try:
            for segment in segments:
                self.fds.append(_no_descriptor_left(lambda: os.dup(segment.fd), f"a copy of the {segment.kind} arena"))
        except BaseException:
            self.__exit__()
            raise

    def __enter__(self) -> "Duplicates":
        return self

    def __exit__(self, *exc) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []


def check_descriptors(count: int, what: str) -> None:
    """ResourceExhausted when `count` more descriptors would leave the daemon fewer than DESCRIPTOR_RESERVE
    of its open-files limit: what its sockets, state files and connections still need."""
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if limit == resource.RLIM_INFINITY:
        return
    held = len(_no_descriptor_left(lambda: os.listdir("/proc/self/fd"), what))
    if held + count + DESCRIPTOR_RESERVE > limit:
        raise ResourceExhausted(f"{what} need {count} file descriptors, but the daemon holds {held} of its "
                                f"open-files limit of {limit} and keeps {DESCRIPTOR_RESERVE} for its sockets and "
                                f"files; raise the limit (ulimit -n, or LimitNOFILE= in stated.service), or run "
                                f"fewer param groups")


def _no_descriptor_left(make, what: str):
    """`make()`, with running out of file descriptors (EMFILE, ENFILE) as ResourceExhausted naming the
    open-files limit; the daemon goes on serving."""
    try:
        return make()
    except OSError as exc:
        if exc.errno in (errno.EMFILE, errno.ENFILE):
            raise ResourceExhausted(f"the daemon has no file descriptor left for {what} ({exc.strerror}); raise its "
                                    f"open-files limit (ulimit -n, or LimitNOFILE= in stated.service)") from None
        raise


def _reserve(fd: int, size: int, kind: str) -> None:
    """Sets the file's size and takes its memory now, so that no later page fault can fail."""
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.ENOMEM, errno.EFBIG):
            raise ResourceExhausted(f"the {kind} arena needs {format_bytes(size)} of memory, which the machine "
                                    f"could not reserve ({exc.strerror}); register fewer or smaller tensors, or free "
                                    f"memory on this node") from None
        raise


def check_room(nbytes: int, what: str) -> None:
    """ResourceExhausted when `nbytes` more of memory would leave less than the headroom to the rest of the
    machine or of the daemon's cgroup (a container's memory limit)."""
    available, total, where = _no_descriptor_left(room, what)
    headroom = min(MAX_HEADROOM, max(MIN_HEADROOM, int(total * HEADROOM_FRACTION)))
    if nbytes + headroom > available:
        raise ResourceExhausted(f"{what} needs {format_bytes(nbytes)} of memory but {where} has "
                                f"{format_bytes(available)} available (and {format_bytes(headroom)} stays free for "
                                f"everything else); register fewer or smaller tensors, free memory, or give the "
                                f"daemon more")


def room() -> tuple[int, int, str]:
    """(bytes available, bytes in all, where): the smaller of the machine's MemAvailable and what the
    daemon's cgroup may still charge."""
    meminfo = _meminfo()
    available, total, where = meminfo.get("MemAvailable", 0), meminfo.get("MemTotal", 0), "this machine"
    limit = _cgroup_room()
    if limit is not None and limit[0] < available:
        available, total, where = limit[0], limit[1], "the daemon's cgroup (its memory limit)"
    return available, total, where


def _meminfo() -> dict[str, int]:
    fields = {}
    with open("/proc/meminfo") as f:
        for line in f:
            name, _, rest = line.partition(":")
            parts = rest.split()
            if parts and parts[0].isdigit():
                fields[name] = int(parts[0]) * (1024 if parts[1:2] == ["kB"] else 1)
    return fields


def _cgroup_room() -> tuple[int, int] | None:
    """(limit - usage, limit) of the tightest memory limit among this process's cgroups and their
    ancestors, cgroup v2 (memory.max, memory.current) or v1 (memory.limit_in_bytes, memory.usage_in_bytes
    under the memory controller's hierarchy); None when none has a limit."""
    try:
        with open("/proc/self/cgroup") as f:
            lines = [line.strip().split(":", 2) for line in f]
    except OSError:
        return None
    tightest = None
    for hierarchy, controllers, path in (parts for parts in lines if len(parts) == 3):
        if hierarchy == "0" and controllers == "":
            found = _tightest(CGROUP_ROOT, path, "memory.max", "memory.current")
        elif "memory" in controllers.split(","):
            found = _tightest(os.path.join(CGROUP_ROOT, "memory"), path, "memory.limit_in_bytes", "memory.usage_in_bytes")
        else:
            continue
        if found is not None and (tightest is None or found[0] < tightest[0]):
            tightest = found
    return tightest


def _tightest(root: str, path: str, limit_file: str, usage_file: str) -> tuple[int, int] | None:
    tightest = None
    directory = os.path.join(root, path.lstrip("/"))
    while directory.startswith(root):
        try:
            with open(os.path.join(directory, limit_file)) as f:
                text = f.read().strip()
            limit = None if text == "max" else int(text)
            if limit is not None and limit < NO_LIMIT:  # cgroup v1 writes "no limit" as about 2^63
                with open(os.path.join(directory, usage_file)) as f:
                    left = max(0, limit - int(f.read().strip()))
                if tightest is None or left < tightest[0]:
                    tightest = (left, limit)
        except (OSError, ValueError):
            pass  # no memory controller at this level, or not mounted here
        if directory == root:
            break
        directory = os.path.dirname(directory)
    return tightest
