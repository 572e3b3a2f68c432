"""The client's end of the step channel (protocol in stated_client.protocol): a blocking unix socket
bound to one session, over which step() sends its StepRequest. About 0.1 ms per round trip where gRPC
takes about 1 ms, which is most of what stated adds to a small model's step.

`STATED_STEP_CHANNEL=0` turns it off (every step then goes over gRPC, as it does when the daemon offers
no channel or the socket cannot be reached).
"""

from __future__ import annotations

import logging
import os
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
        self.liveness = liveness
        self.owner = os.getpid()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with liveness.watching(self._cut):
                self.sock.connect(path)
                check_peer(self.sock, path)  # Note [whom the client talks to]: the token goes to no one else
                self.sock.sendall(frame(MESSAGE, session.SerializeToString()))
                self._receive()
        except BaseException:
            self.sock.close()
            raise

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

    def step(self, request: pb.StepRequest) -> pb.StepResponse:
        """One step; a daemon that goes away or falls silent meanwhile raises DaemonUnavailableError
        (Note [liveness]: the blocking socket is shut down from the monitor thread)."""
        self.liveness.check()
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

    def _cut(self) -> None:
        if os.getpid() != self.owner:
            return  # a forked child's copy: shutting it down would cut the parent's connection
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # recv and send return at once
        except OSError:
            pass  # already closed

    def _receive(self) -> bytes:
        length, kind = HEADER.unpack(self._exactly(HEADER.size))
        payload = self._exactly(length)
        if kind == ERROR:
            raise from_status(*parse_error(payload))
        return payload

    def _exactly(self, n: int) -> bytes:
        return _exactly(self.sock, n)

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
        header = _exactly(sock, HEADER.size)
        length, kind = HEADER.unpack(header)
        payload = _exactly(sock, length)
        if kind == ERROR:
            raise from_status(*parse_error(payload))
        return payload
    except PermissionDeniedError as exc:  # check_peer: someone else holds the step socket; nothing was sent
        log.warning("stated: the step socket %s is refused (%s); attaching without a credential", path, exc)
        return b""
    except (OSError, StatedError) as exc:
        log.info("stated: no credential from %s (%s); attaching without one", path, exc)
        return b""
    finally:
        sock.close()


def _exactly(sock: socket.socket, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        chunk = sock.recv(n - got)
        if not chunk:
            raise ConnectionResetError("the daemon closed the step channel")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)
