"""The step channel: Step requests over a plain unix socket beside the gRPC one.

It also hands each session its arenas' file descriptors (frame kind 2, Note [arenas as file descriptors]
in stated.arena_memory), so every daemon has this socket.

A step is one round trip, and on small models that round trip is most of the cost stated adds: a gRPC
unary call takes about 1 ms on a 2-vCPU machine (several thread hand-offs on each side), a plain
unix socket ping-pong about 0.1 ms (PERFORMANCE.md). So the daemon also listens on `<socket>.step`
(same directory, same permissions) for the one call that happens every step. Everything else stays on
gRPC, and gRPC's Step stays too: the channel is only a faster wire for the same request.

The protocol (framing, kinds, limits) is stated_client.protocol's, shared with the client's end
(stated_client.step_line). Steps go through the same validation, session lock and engine as gRPC's Step.

Note [step channel threads]: the channel is served by plain threads, one accept thread and one per
connection doing blocking recv, lock, step, send. Served on the event loop, every step waited for the
loop's turn, and a large session's step crossed threads twice more (to the step pool and back): about
0.7-1 ms per step on two cores, more when the trainer keeps a core busy. On its own thread a step has no
hop through the event loop or an executor. The session lock (stated.server.session_lock) orders these steps with
the session's gRPC calls.

Note [step channel limits]: anyone who can reach the socket can connect, so nothing is allocated or held
for a connection beyond what stated.limits allows. At most --max-connections are open (and so as many
threads); one more is told RESOURCE_EXHAUSTED and closed (its client steps over gRPC). Before it has
authenticated a connection may send one frame of at most MAX_HELLO_BYTES, within --step-auth-timeout
of its connect (a deadline for the whole frame, not for each byte); afterwards a frame may be as large as
its session's StepRequest can be (stated.limits.step_frame_limit: a byte per tensor, room per group),
checked on the header before the payload is allocated, and a connection silent for --step-idle-timeout
is closed (its client reconnects at its next step, stated_client.step_line).
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import logging
import os
import socket
import threading
import time

from google.protobuf.message import DecodeError

from stated.errors import FailedPrecondition, InvalidArgument, ResourceExhausted, Unavailable
from stated.limits import Limits, connections_refusal, seconds_text, step_frame_limit
from stated.server.private_socket import private_socket
from stated.server.socket_guard import identity, remove_if_ours
from stated.server.status_codes import refusal
from stated.v1 import state_service_pb2 as pb
from stated.job_owners import check_owner
from stated.server.credentials import peer_uid
from stated_client.protocol import (ARENA_SIZE, ARENAS, CREDENTIAL, HEADER, MAX_FRAME_BYTES, MAX_HELLO_BYTES,
                                    MAX_SOCKET_PATH, MESSAGE, REGION, STEP_SUFFIX, error_frame, frame)

log = logging.getLogger("stated.server.step_channel")

# How long stop() waits for connection threads (a step under way finishes first).
STOP_SECONDS = 5.0
# accept() failures that pass (too many open files, for one): the accept thread waits and goes on.
TRANSIENT_ACCEPT_ERRORS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM, errno.ECONNABORTED}


class StepChannel:
    """The daemon's end: accepts connections and applies their steps through `servicer.step_blocking`,
    each connection on its own thread (Note [step channel threads])."""

    def __init__(self, servicer, limits: Limits | None = None):
        self.servicer = servicer
        self.limits = limits or Limits()
        self.path = ""
        self.identity = None  # (device, inode) of the socket bound at path
        self.listener: socket.socket | None = None
        self.accepter: threading.Thread | None = None
        self.connections: dict[threading.Thread, socket.socket] = {}
        self.guard = threading.Lock()  # connections and stopping, shared by the accept thread and stop()
        self.stopping = False
        self.numbers = itertools.count(1)

    async def start(self, path: str, gid: int | None) -> None:
        """Listens on `path`; refuses (RuntimeError) a path too long for a unix socket: trainers receive
        their arenas over this socket (Note [arenas as file descriptors] in stated.arena_memory)."""
        check_path(path)
        try:
            os.unlink(path)  # this daemon holds the socket's lock, so this one's owner is gone
        except FileNotFoundError:
            pass
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with private_socket(path, gid):
                listener.bind(path)
                listener.listen(128)
        except BaseException:
            listener.close()
            raise
        self.listener, self.path = listener, path
        self.identity = identity(path)
        self.accepter = threading.Thread(target=self._accept, name="stated-step-accept", daemon=True)
        self.accepter.start()

    async def stop(self) -> None:
        await asyncio.to_thread(self.close)  # joins threads; the event loop serves on meanwhile

    def close(self) -> None:
        """Stops accepting, ends every connection (a step under way finishes first), removes the socket."""
        with self.guard:
            self.stopping = True  # from here the accept thread closes what it accepts
        deadline = time.monotonic() + STOP_SECONDS
        if self.listener is not None:
            _shutdown(self.listener)  # accept() returns (EINVAL)
            self.accepter.join(STOP_SECONDS)
            self.listener.close()
            self.listener = None
        with self.guard:
            for conn in self.connections.values():
                _shutdown(conn)  # its thread leaves recv and closes it
            threads = list(self.connections)
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        if any(thread.is_alive() for thread in threads):
            log.warning("step channel connections still open after %.0f s", STOP_SECONDS)
        if self.path:
            remove_if_ours(self.path, self.identity)  # Note [one daemon per socket]

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError as exc:
                if self.stopping:
                    return
                if exc.errno in TRANSIENT_ACCEPT_ERRORS:
                    log.warning("step channel: accept failed (%s); trying again", exc)
                    time.sleep(0.1)
                    continue
                log.exception("step channel: accept failed; no new connections")
                return
            with self.guard:
                if self.stopping:
                    conn.close()
                    return
                refusal = connections_refusal(self.limits, len(self.connections))
                if refusal is not None:
                    self._turn_away(conn, refusal)
                    continue
                thread = threading.Thread(target=self._serve, args=(conn,), name=f"stated-step-{next(self.numbers)}",
                                          daemon=True)
                self.connections[thread] = conn
                thread.start()

    def _turn_away(self, conn: socket.socket, refusal: ResourceExhausted) -> None:
        """Tells a connection over --max-connections why, and closes it (on the accept thread: one small
        frame into an empty socket buffer does not block)."""
        self.servicer.metrics.step_connections_closed.labels("max_connections").inc()
        try:
            conn.settimeout(1.0)
            conn.sendall(self._refuse(refusal))
        except OSError:
            pass  # it went away already
        _close(conn)

    def _serve(self, conn: socket.socket) -> None:
        """One connection, until it closes or breaks; raises nothing (Note [step channel limits])."""
        header = bytearray(HEADER.size)
        session = None
        try:
            session = self._hello(conn, header, time.monotonic() + self.limits.step_auth_timeout)
            idle = self.limits.step_idle_timeout
            conn.settimeout(None if idle == float("inf") else idle)
            while session is not None:
                payload = self._read(conn, header, step_frame_limit(len(session.tensors), len(session.groups)),
                                     also=ARENAS)
                if payload is None:
                    return
                if HEADER.unpack(header)[1] == ARENAS:
                    self._arenas(conn, session, payload)
                    continue
                reply, go_on = self._step(session, payload)
                conn.sendall(reply)
                if not go_on:
                    return
        except TimeoutError:
            self._timed_out(conn, session)
        except OSError:
            pass  # the client went away (its session ends through Watch or Detach), or stop() ended it
        except Exception:  # noqa: BLE001 - a connection thread never dies with an exception
            log.exception("step channel connection failed")
        finally:
            with self.guard:
                self.connections.pop(threading.current_thread(), None)
            _close(conn)

    def _step(self, session, payload: bytearray) -> tuple[bytes, bool]:
        """The answer to one StepRequest frame, and whether the connection goes on."""
        try:
            request = pb.StepRequest.FromString(payload)
        except DecodeError as exc:
            return self._refuse(InvalidArgument(f"the frame is not a StepRequest: {exc}")), False
        try:
            response = self.servicer.step_blocking(session.id, session.token, request)
        except Exception as exc:  # noqa: BLE001 - the daemon keeps serving
            return self._refuse(exc), True
        return frame(MESSAGE, response.SerializeToString()), True

    def _arenas(self, conn: socket.socket, session, payload: bytearray) -> None:
        """Answers an arena request with the region's two descriptors (Note [arenas as file descriptors] in
        stated.arena_memory), or a refusal; the connection goes on either way."""
        def send(nbytes: int, fds: list[int]) -> None:
            socket.send_fds(conn, [frame(ARENAS, ARENA_SIZE.pack(nbytes))], fds)

        try:
            if len(payload) != REGION.size:
                raise InvalidArgument(f"an arena request holds a region index of {REGION.size} bytes, this one "
                                      f"has {len(payload)}")
            self.servicer.send_arenas(session.id, session.token, REGION.unpack(payload)[0], send)
        except OSError:
            raise  # the connection broke: _serve ends it
        except Exception as exc:  # noqa: BLE001 - refused, and the connection goes on
            conn.sendall(self._refuse(exc, "the arena request"))

    def _refuse(self, exc: Exception, method: str = "Step") -> bytes:
        """The error frame for a refusal or a failure, counted as a gRPC call's is (stated.server.status_codes)."""
        return error_frame(*refusal(exc, self.servicer.metrics, method))

    def _timed_out(self, conn: socket.socket, session) -> None:
        """Tells a connection that its --step-auth-timeout or --step-idle-timeout ran out (it is closed next)."""
        if session is None:
            reason, error = "auth_timeout", FailedPrecondition(
                f"the step channel got no SessionRef within --step-auth-timeout="
                f"{seconds_text(self.limits.step_auth_timeout)} of the connect; closed")
        else:
            reason, error = "idle_timeout", Unavailable(
                f"the step channel was idle for --step-idle-timeout={seconds_text(self.limits.step_idle_timeout)}; "
                f"closed (the next step reconnects)")
            log.info("step channel of job=%s rank=%d session=%s: idle for %s, closed", session.job, session.rank,
                     session.id, seconds_text(self.limits.step_idle_timeout))
        self.servicer.metrics.step_connections_closed.labels(reason).inc()
        try:
            conn.settimeout(1.0)
            conn.sendall(self._refuse(error))
        except OSError:
            pass  # gone already

    def _hello(self, conn: socket.socket, header: bytearray, deadline: float):
        """The session the first frame names, or None once a credential request is answered or a refusal
        sent."""
        payload = self._read(conn, header, MAX_HELLO_BYTES, deadline, also=CREDENTIAL)
        if payload is None:
            return None
        if HEADER.unpack(header)[1] == CREDENTIAL:
            conn.sendall(self._credential(conn, payload))
            return None
        try:
            ref = pb.SessionRef.FromString(payload)
            session = self.servicer.store.get(ref.id, ref.token)
            check_owner(session, peer_uid(conn))
        except DecodeError as exc:
            conn.sendall(self._refuse(InvalidArgument(f"the first frame is not a SessionRef: {exc}")))
            return None
        except Exception as exc:  # noqa: BLE001 - refused as a gRPC call for that session is
            conn.sendall(self._refuse(exc))
            return None
        conn.sendall(frame(MESSAGE, b""))
        return session

    def _credential(self, conn: socket.socket, payload: bytearray) -> bytes:
        """The answer to a credential request (Note [job owners] in stated.job_owners)."""
        if payload:
            return self._refuse(InvalidArgument(f"a credential request is empty, this one has {len(payload)} bytes"))
        return frame(MESSAGE, self.servicer.credentials.issue(peer_uid(conn)))

    def _read(self, conn: socket.socket, header: bytearray, limit: int,
              deadline: float | None = None, also: int = MESSAGE) -> bytearray | None:
        """The payload of the next kind-0 frame (or kind `also`) of at most `limit` bytes (checked before it
        is allocated), all of it by `deadline` (time.monotonic(); None: the socket's own timeout); None
        (after telling the client) for anything else."""
        _receive(conn, memoryview(header), deadline)
        length, kind = HEADER.unpack(header)
        if kind not in (MESSAGE, also) or length > min(limit, MAX_FRAME_BYTES):
            conn.sendall(self._refuse(_frame_problem(kind, length, min(limit, MAX_FRAME_BYTES), deadline is not None,
                                                     also)))
            return None
        payload = bytearray(length)
        _receive(conn, memoryview(payload), deadline)
        return payload


KIND_NAMES = {ARENAS: "an arena request", CREDENTIAL: "a credential request"}


def check_path(path: str) -> None:
    """RuntimeError, saying what to do, when the step socket's `path` cannot be a unix socket's."""
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise RuntimeError(f"the step socket {path} is longer than a unix socket path may be ({MAX_SOCKET_PATH} "
                           f"bytes), and trainers receive their arenas over it; give --socket a path of at most "
                           f"{MAX_SOCKET_PATH - len(STEP_SUFFIX)} bytes")


def _frame_problem(kind: int, length: int, limit: int, hello: bool, also: int = MESSAGE) -> Exception:
    if kind not in (MESSAGE, also):
        expected = "a message (0)" + (f" or {KIND_NAMES[also]} ({also})" if also != MESSAGE else "")
        return InvalidArgument(f"frame kind {kind} is not {expected}")
    if hello:
        return InvalidArgument(f"a first frame of {length} bytes cannot be a SessionRef: before it has "
                               f"authenticated a connection sends one of at most {limit} bytes")
    if kind == ARENAS:
        return InvalidArgument(f"an arena request of {length} bytes: it holds a region index of {REGION.size} bytes")
    return InvalidArgument(f"a frame of {length} bytes is over the limit of {limit} for this session (a "
                           f"StepRequest of its tensors and groups is smaller)")


def _receive(conn: socket.socket, view: memoryview, deadline: float | None = None) -> None:
    """Fills `view` from the socket, by `deadline` if one is given (TimeoutError past it);
    ConnectionResetError when the peer closes first."""
    got = 0
    while got < len(view):
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("the deadline passed")
            conn.settimeout(left)
        n = conn.recv_into(view[got:])
        if n == 0:
            raise ConnectionResetError("the client closed the step channel")
        got += n


def _close(conn: socket.socket) -> None:
    """Closes after reading what the client has already sent: closing a unix socket with unread data
    makes the client's next read fail with ECONNRESET rather than see the end of the stream."""
    try:
        conn.setblocking(False)
        for _ in range(64):
            if not conn.recv(1 << 20):
                break
    except OSError:
        pass  # nothing more to read (BlockingIOError), or the socket is broken anyway
    conn.close()


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already closed or never connected
