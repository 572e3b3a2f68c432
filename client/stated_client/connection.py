"""A connection to the daemon: one gRPC channel, calls that raise StatedError, the embedded fallback.

Every call the client makes goes through Connection, so no raw grpc.RpcError reaches a user."""

from __future__ import annotations

import logging
import os

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from stated.v1 import state_service_pb2_grpc as pb_grpc
from stated_client import embedded
from stated_client.address import resolve
from stated_client.errors import DaemonUnavailableError, FailedPreconditionError, InternalError, from_rpc_error
from stated_client.protocol import MESSAGE_OPTIONS, SERVICE_NAME

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

    def check_open(self) -> None:
        # grpc would raise a bare ValueError("Cannot invoke RPC on closed channel!").
        if self.closed:
            raise FailedPreconditionError(f"the optimizer was closed (detached from the stated daemon at "
                                          f"{self.target}); create a new optimizer to go on")

    def call(self, method: str, request, timeout: float | None = None):
        self.check_open()
        try:
            return getattr(self.stub, method)(request, timeout=timeout)
        except grpc.RpcError as error:
            raise from_rpc_error(error, self.target) from None

    def stream(self, method: str, request):
        """Iterates a server-streaming call, translating errors."""
        self.check_open()
        try:
            yield from getattr(self.stub, method)(request)
        except grpc.RpcError as error:
            raise from_rpc_error(error, self.target) from None

    def hold(self, method: str, request):
        """Starts a server-streaming call that stays open (Watch) and reads its first reply; returns the
        call, whose cancel() ends it. A refusal raises StatedError and leaves no call open."""
        self.check_open()
        call = getattr(self.stub, method)(request)
        try:
            next(call)
        except grpc.RpcError as error:
            raise from_rpc_error(error, self.target) from None
        except StopIteration:
            raise InternalError(f"the stated daemon at {self.target} ended {method} before its first reply") from None
        return call

    def close(self) -> None:
        self.closed = True
        self.channel.close()


def connect(address: str | None) -> Connection:
    """Connects to the daemon at `address` (or STATED_ADDRESS, or the default socket); when none answers
    there, starts this process's private daemon unless STATED_EMBEDDED=0."""
    target = resolve(address)
    if _answers(target):
        return Connection(target)
    if os.environ.get(ENV_EMBEDDED, "1") == "0":
        raise DaemonUnavailableError(f"no stated daemon answers at {target} (and {ENV_EMBEDDED}=0 forbids starting "
                                     f"a private one); start one with `stated serve`")
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

