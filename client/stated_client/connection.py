"""A connection to the daemon: one gRPC channel, calls that raise StatedError, the embedded default.

Every call the client makes goes through Connection, so no raw grpc.RpcError reaches a user, and none
blocks forever on a daemon that stopped answering: before a session's Watch a call's deadline is
STATED_TIMEOUT, after it the daemon's signs of life bound it (stated_client.liveness)."""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from stated.v1 import state_service_pb2 as pb
from stated.v1 import state_service_pb2_grpc as pb_grpc
from stated_client import embedded, fork_guard, peer, step_line
from stated_client.address import given, resolve, socket_path
from stated_client.errors import DaemonUnavailableError, FailedPreconditionError, from_rpc_error
from stated_client.liveness import Liveness, keepalive_seconds, timeout_from_env
from stated_client.protocol import MESSAGE_OPTIONS, SERVICE_NAME, channel_path

log = logging.getLogger("stated.client")

ENV_EMBEDDED = "STATED_EMBEDDED"


def _answers(target: str, timeout: float = 1.0) -> bool:
    """Whether a stated daemon serves at `target` (gRPC health check)."""
    channel = grpc.insecure_channel(target, options=MESSAGE_OPTIONS)
    try:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = stub.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=timeout)
        return reply.status == health_pb2.HealthCheckResponse.SERVING
    except grpc.RpcError:
        return False
    finally:
        channel.close()


class Connection:
    def __init__(self, target: str):
        self.target = target
        self.channel = grpc.insecure_channel(target, options=MESSAGE_OPTIONS)
        self.stub = pb_grpc.StateServiceStub(self.channel)
        self.closed = False
        self.timeout = timeout_from_env()
        # The daemon's signs of life, from the session's Watch on (Note [liveness]); before that (Attach)
        # a call's deadline is the timeout.
        self.liveness: Liveness | None = None
        # The process whose channel this is: a forked child never calls into it (Note [forked children]).
        self.owner = fork_guard.own(self)

    def disown(self) -> None:
        """In a forked child (stated_client.fork_guard): nothing to undo, for `owner` is another process's pid
        there, so every call raises and close() touches nothing."""

    def credential(self) -> bytes:
        """A credential for Attach from the daemon's step socket (Note [job owners] in stated.job_owners);
        b"" for a daemon not reached over a unix socket."""
        path = socket_path(self.target)
        return step_line.fetch_credential(channel_path(path), self.timeout) if path else b""

    def check_open(self) -> None:
        fork_guard.check_owner(self.owner, "connection", self.target)
        # grpc would raise a bare ValueError("Cannot invoke RPC on closed channel!").
        if self.closed:
            raise FailedPreconditionError(f"the optimizer was closed (detached from the stated daemon at "
                                          f"{self.target}); create a new optimizer to go on")
        if self.liveness is not None:
            self.liveness.check()

    def call(self, method: str, request, timeout: float | None = None):
        """A unary (or client-streaming) call; with a session, for as long as the daemon shows signs of life."""
        self.check_open()
        if self.liveness is None:
            try:
                return getattr(self.stub, method)(request, timeout=timeout or self.timeout)
            except grpc.RpcError as error:
                raise from_rpc_error(error, self.target) from None
        future = getattr(self.stub, method).future(request, timeout=timeout)
        with self._guard(future):
            return future.result()

    def stream(self, method: str, request):
        """Iterates a server-streaming call, translating errors."""
        self.check_open()
        call = getattr(self.stub, method)(request)
        if self.liveness is None:
            try:
                yield from call
            except grpc.RpcError as error:
                raise from_rpc_error(error, self.target) from None
            return
        with self._guard(call):
            yield from call

    @contextmanager
    def _guard(self, call):
        """Runs a call that the liveness monitor cancels if the daemon falls silent; raises StatedError."""
        liveness = self.liveness
        try:
            with liveness.watching(call.cancel):
                yield
        except grpc.RpcError as error:
            raise liveness.explain(from_rpc_error(error, self.target), error.details() or error.code().name) from None
        except grpc.FutureCancelledError:
            raise liveness.explain(DaemonUnavailableError("cancelled"), "cancelled") from None
        liveness.alive()

    def hold(self, method: str, request):
        """Starts a server-streaming call that stays open (Watch), read from now on as the daemon's sign of
        life (Note [liveness]); returns once its first reply came, with the Liveness, whose cancel() ends
        it. A refusal raises StatedError and leaves no call open."""
        self.check_open()
        liveness = Liveness(self.target, self.timeout)
        liveness.follow(getattr(self.stub, method)(request))
        self.liveness = liveness
        return liveness

    def watch(self, session: pb.SessionRef) -> Liveness:
        """Holds the session's Watch stream open, with keepalives (Note [liveness])."""
        return self.hold("Watch", pb.WatchRequest(session=session, keepalive_seconds=keepalive_seconds(self.timeout)))

    def close(self) -> None:
        if os.getpid() != self.owner:
            return  # the parent's channel: gRPC, with none of its threads here, could hang (Note [forked children])
        self.closed = True
        if self.liveness is not None:
            self.liveness.cancel()
        self.channel.close()


# Note [no fallback for a given address]: an address that was given names the daemon its user means, a
# shared one with its host-memory budget, state directory and retention. A private daemon in its place
# would have none of them (all of host memory, state that dies with the process) and would hide the
# mistake, so only the default socket, which nobody chose, falls back to one.
def connect(address: str | None) -> Connection:
    """Connects to the daemon at `address` (or STATED_ADDRESS, or the default socket) once it has checked
    whom it talks to (Note [whom the client talks to]). When no daemon answers at the default socket, it
    starts this process's private daemon, unless STATED_EMBEDDED=0; an address that was given and does not
    answer is an error (Note [no fallback for a given address])."""
    target, where = resolve(address), given(address)
    path = socket_path(target)
    if path is not None:
        if where is None:
            peer.check_default_directory(os.path.dirname(path))
        peer.check_daemon(path)
    if _answers(target):
        return Connection(target)
    if os.environ.get(ENV_EMBEDDED, "1") == "0":
        raise DaemonUnavailableError(f"no stated daemon answers at {target} (and {ENV_EMBEDDED}=0 forbids starting "
                                     f"a private one); start one with `stated serve`")
    if where is not None:
        raise DaemonUnavailableError(
            f"no stated daemon answers at {target} (from {where}); a private daemon is started only when no address "
            f"is given. Start one there (`stated serve --socket {path or target}`), or correct or unset the address")
    return _private(target)


def _private(target: str) -> Connection:
    """This process's private daemon (the embedded default, for no daemon answers at `target`), started on
    first use."""
    already = embedded.running_target()
    if already is not None:
        return Connection(already)
    try:
        private = embedded.embedded_target(_answers)
    except (OSError, RuntimeError) as exc:
        raise DaemonUnavailableError(f"no stated daemon answers at {target}, and starting a private one failed: "
                                     f"{exc}") from None
    log.warning("stated: no daemon answers at %s, so this process started a private one (%s); it stops when "
                "the process exits. Run `stated serve` to share one daemon between processes.", target, private)
    return Connection(private)
