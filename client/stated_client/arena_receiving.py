"""The client's end of the arenas: after Register, the region's param and grad arenas come from the
daemon as two file descriptors over its step socket (frame kind 2 in stated_client.protocol; Note
[arenas as file descriptors] in stated.arena_memory). They are mapped here and closed at once: the
mappings keep the memory for as long as the tensors that view them live.

A short connection of its own, whatever STATED_STEP_CHANNEL says: it authenticates with the session's
token (to a daemon whose peer credentials check_peer accepts, so the token goes to no one else), asks
for one region, and closes.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import socket
import stat
import threading

import torch

from stated.v1 import state_service_pb2 as pb
from stated_client.errors import DaemonUnavailableError, FailedPreconditionError, StatedError, from_status
from stated_client.memory_mapping import map_shared
from stated_client.peer import check_peer
from stated_client.protocol import (ARENA_FDS, ARENA_SIZE, ARENAS, ERROR, HEADER, MESSAGE, REGION, frame,
                                    parse_error)
from stated_client.step_line import read_exactly, receive_payload

_libc = ctypes.CDLL(None, use_errno=True)
PR_GET_DUMPABLE, PR_SET_DUMPABLE = 3, 4
_receiving = threading.Lock()


def receive(path: str, session: pb.SessionRef, region: int, nbytes: int,
            timeout: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Region `region`'s param and grad arenas, `nbytes` each, as flat uint8 tensors mapped from the
    descriptors the daemon at step socket `path` sends."""
    if not path:
        raise FailedPreconditionError("the daemon offers no step socket, over which a CPU region's arenas are sent; "
                                      "it is older than this client: upgrade stated where `stated serve` runs")
    with _receiving, _not_dumpable():  # one at a time: the flag is the whole process's
        return _receive(path, session, region, nbytes, timeout)


@contextlib.contextmanager
def _not_dumpable():
    """While the descriptors are in this process's table (from recvmsg until they are mapped and closed),
    /proc/<pid>/fd is closed to every other process of this user (root aside): a non-dumpable process's
    /proc entries belong to root. Dumpable again afterwards, as it was."""
    before = _libc.prctl(PR_GET_DUMPABLE, 0, 0, 0, 0)
    if before > 0:
        _libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
    try:
        yield
    finally:
        if before > 0:
            _libc.prctl(PR_SET_DUMPABLE, before, 0, 0, 0)


def _receive(path: str, session: pb.SessionRef, region: int, nbytes: int,
             timeout: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(path)
        check_peer(sock, path)  # Note [whom the client talks to]
        sock.sendall(frame(MESSAGE, session.SerializeToString()))
        receive_payload(sock)  # the empty answer to an accepted SessionRef; a refusal raises
        sock.sendall(frame(ARENAS, REGION.pack(region)))
        size, fds = _answer(sock)
    except StatedError:
        raise  # a refusal, or check_peer's PermissionDeniedError (an OSError too)
    except OSError as exc:
        raise DaemonUnavailableError(f"the arenas of region {region} did not come from the step socket {path}: "
                                     f"{exc}") from None
    finally:
        sock.close()
    try:
        if size != nbytes:
            raise StatedError(f"the daemon sent arenas of {size} bytes for region {region}, Register announced "
                              f"{nbytes}")
        return map_descriptor(fds[0], nbytes), map_descriptor(fds[1], nbytes)
    finally:
        for fd in fds:
            os.close(fd)


def _answer(sock: socket.socket) -> tuple[int, list[int]]:
    """The arena size and the two descriptors of the daemon's answer; an error frame raises its StatedError."""
    data, fds, flags, _ = socket.recv_fds(sock, HEADER.size + ARENA_SIZE.size, ARENA_FDS, socket.MSG_CMSG_CLOEXEC)
    try:
        if not data:
            raise ConnectionResetError("the daemon closed the step socket")
        if flags & socket.MSG_CTRUNC:
            raise StatedError("the daemon sent more descriptors than an arena answer holds")
        data += read_exactly(sock, max(0, HEADER.size - len(data)))
        length, kind = HEADER.unpack(data[:HEADER.size])
        payload = data[HEADER.size:] + read_exactly(sock, max(0, length - (len(data) - HEADER.size)))
        if kind == ERROR:
            raise from_status(*parse_error(payload))
        if kind != ARENAS or len(payload) != ARENA_SIZE.size or len(fds) != ARENA_FDS:
            raise StatedError(f"the daemon answered an arena request with a frame of kind {kind}, {len(payload)} "
                              f"bytes and {len(fds)} descriptors; expected kind {ARENAS}, {ARENA_SIZE.size} bytes "
                              f"and {ARENA_FDS}")
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return ARENA_SIZE.unpack(payload)[0], fds


def map_descriptor(fd: int, nbytes: int) -> torch.Tensor:
    """A flat uint8 tensor of `nbytes` over the memory file `fd` (the mapping lives as long as its views;
    `fd` may be closed right after)."""
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_size < max(nbytes, 1):
        raise StatedError(f"the daemon sent a descriptor of {info.st_size} bytes that is not a memory file of "
                          f"{max(nbytes, 1)} bytes")
    return map_shared(fd, nbytes)
