"""The client's end of the step channel (protocol in stated_client.protocol): a blocking unix socket
bound to one session, over which step() sends its StepRequest. About 0.1 ms per round trip where gRPC
takes about 1 ms, which is most of what stated adds to a small model's step.

`STATED_STEP_CHANNEL=0` turns it off (every step then goes over gRPC, as it does when the daemon offers
no channel or the socket cannot be reached).

Note [idle step lines]: the daemon closes a line that stayed silent for --step-idle-timeout (an hour by
default: a long evaluation or checkpoint between two steps). Before each step the line looks whether
the daemon closed it (the end of the stream, or the error frame that says why, waiting unread); if so it
connects again, and when that fails `step` returns None and the optimizer steps over gRPC. A step is sent
only on a line the daemon had not closed, so a step is never sent twice.
"""

from __future__ import annotations

import logging
import os
import select
import socket

from stated.v1 import state_service_pb2 as pb
from stated_client.errors import DaemonUnavailableError, PermissionDeniedError, StatedError, from_status
from stated_client.liveness import Liveness
from stated_client.peer import check_peer
from stated_client.protocol import CREDENTIAL, ERROR, HEADER, MESSAGE, frame, parse_error

log = logging.getLogger("stated_client")
ENV_STEP_CHANNEL = "STATED_STEP_CHANNEL"


class StepLine:
    def __init__(self, path: str, session: pb.SessionRef, liveness: Liveness):
        self.path = path
        self.session = session
        self.liveness = liveness
        self.owner = os.getpid()
        self.gone = False  # the daemon closed it and it did not open again: steps go over gRPC
        self.sock = self._connect()

    def _connect(self) -> socket.socket:
        self.sock = sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with self.liveness.watching(self._cut):
                sock.connect(self.path)
                check_peer(sock, self.path)  # Note [whom the client talks to]: the token goes to no one else
                sock.sendall(frame(MESSAGE, self.session.SerializeToString()))
                self._receive()
        except BaseException:
            sock.close()
            raise
        return sock

    @classmethod
    def open(cls, path: str, session: pb.SessionRef, liveness: Liveness) -> StepLine | None:
        """The channel, or None (steps then go over gRPC) when it is off or cannot be reached."""
        if not path or os.environ.get(ENV_STEP_CHANNEL, "1") == "0":
            return None
        try:
            return cls(path, session, liveness)
        except PermissionDeniedError as exc:
            log.warning("stated: the step channel at %s is refused (%s); steps go over gRPC", path, exc)
            return None
        except (OSError, StatedError) as exc:
            log.info("stated: the step channel at %s is not usable (%s); steps go over gRPC", path, exc)
            return None

    def step(self, request: pb.StepRequest) -> pb.StepResponse | None:
        """One step; a daemon that goes away or falls silent meanwhile raises DaemonUnavailableError
        (Note [liveness]: the blocking socket is shut down from the monitor thread). None, with nothing
        sent, when the daemon closed the idle line and it cannot be opened again (Note [idle step lines])."""
        self.liveness.check()
        if self.gone or self._closed_by_daemon() and not self._reopen():
            return None
        try:
            with self.liveness.watching(self._cut):
                self.sock.sendall(frame(MESSAGE, request.SerializeToString()))
                reply = pb.StepResponse.FromString(self._receive())
        except StatedError as error:  # before OSError: DaemonUnavailableError is a ConnectionError
            raise self.liveness.explain(error, str(error)) from None
        except OSError as exc:
            raise self.liveness.explain(DaemonUnavailableError(str(exc)), f"its step channel broke: {exc}") from None
        self.liveness.alive()
        return reply

    def _closed_by_daemon(self) -> bool:
        """Whether the daemon closed the line: between steps it sends nothing unless it closes it."""
        try:
            readable, _, _ = select.select([self.sock], [], [], 0)
        except (OSError, ValueError):
            return True  # closed on this side
        return bool(readable)

    def _reopen(self) -> bool:
        self.sock.close()
        try:
            self._connect()
        except (OSError, StatedError) as exc:
            log.info("stated: the daemon closed the idle step channel at %s and it does not open again (%s); "
                     "steps go over gRPC", self.path, exc)
            self.gone = True
            return False
        log.debug("stated: the daemon closed the idle step channel at %s; connected again", self.path)
        return True

    def _cut(self) -> None:
        if os.getpid() != self.owner:
            return  # a forked child's copy: shutting it down would cut the parent's connection
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # recv and send return at once
        except OSError:
            pass  # already closed

    def _receive(self) -> bytes:
        return receive_payload(self.sock)

    def close(self) -> None:
        self.sock.close()


def fetch_credential(path: str, timeout: float | None) -> bytes:
    """A credential for this process's uid from the step socket at `path` (Note [job owners] in
    stated.job_owners), for the Attach that follows; b"" when the daemon offers none (a job attached
    without one has no owner, and is refused where the job has one, saying so)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(path)
        check_peer(sock, path)
        sock.sendall(frame(CREDENTIAL, b""))
        return receive_payload(sock)
    except PermissionDeniedError as exc:  # check_peer: someone else holds the step socket; nothing was sent
        log.warning("stated: the step socket %s is refused (%s); attaching without a credential", path, exc)
        return b""
    except (OSError, StatedError) as exc:
        log.info("stated: no credential from %s (%s); attaching without one", path, exc)
        return b""
    finally:
        sock.close()


def receive_payload(sock: socket.socket) -> bytes:
    """The payload of the daemon's next frame; an error frame raises its StatedError."""
    length, kind = HEADER.unpack(read_exactly(sock, HEADER.size))
    payload = read_exactly(sock, length)
    if kind == ERROR:
        raise from_status(*parse_error(payload))
    return payload


def read_exactly(sock: socket.socket, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        chunk = sock.recv(n - got)
        if not chunk:
            raise ConnectionResetError("the daemon closed the step channel")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)
