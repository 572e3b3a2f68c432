"""Request messages that do not decode: refused as INVALID_ARGUMENT, named, with one warning line.

gRPC decodes a request with its handler's `request_deserializer` before the servicer sees it; when that
raises, grpc.aio logs a traceback and answers UNKNOWN, which tells the caller nothing and fills the log
(Note [undecodable requests]). `add_decoding` registers a servicer as its generated
`add_*Servicer_to_server` would, with deserializers that hand bytes that are not the method's message
to the handler as an `Undecodable`, and behaviours that refuse it before the servicer runs (for a
streamed request, when the stream reaches it).

Note [undecodable requests]
---------------------------
The generated registration is reused, not restated: it is run against a recorder that keeps the method
handlers it registers, and those are registered on the real server with the two fields replaced. So a
regenerated service (a new RPC) is covered without an edit here.
"""

from __future__ import annotations

import inspect
import logging
import math
import time

import grpc
from google.protobuf.message import DecodeError

from stated.metrics import Metrics

log = logging.getLogger("stated.server.decoding")


class Undecodable:
    """Bytes that were not the method's request message, and why they did not decode."""

    def __init__(self, method: str, message_type: str, error: Exception):
        self.method, self.message_type, self.error = method, message_type, error

    def describe(self) -> str:
        return (f"{self.method}: the request message could not be decoded as {self.message_type} ({self.error}); "
                f"send a serialized {self.message_type}")


class _Recorder:
    """Stands in for a server while a generated registration runs: keeps its method handlers."""

    def __init__(self) -> None:
        self.services: dict[str, dict[str, grpc.RpcMethodHandler]] = {}

    def add_generic_rpc_handlers(self, handlers) -> None:
        pass  # the same handlers come again through add_registered_method_handlers

    def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        self.services[service] = dict(handlers)


def add_decoding(add_to_server, servicer, server, metrics: Metrics) -> None:
    """Registers `servicer` on `server` as `add_to_server` (a generated add_*Servicer_to_server) does, with
    undecodable requests refused (Note [undecodable requests])."""
    recorder = _Recorder()
    add_to_server(servicer, recorder)
    if not recorder.services:
        raise RuntimeError(f"{add_to_server.__name__} registered no method handlers by name; "
                           f"regenerate the service code with grpcio-tools >= 1.63")
    for service, handlers in recorder.services.items():
        checked = {name: _checked(f"/{service}/{name}", handler, metrics) for name, handler in handlers.items()}
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, checked),))
        server.add_registered_method_handlers(service, checked)


def _checked(method: str, handler: grpc.RpcMethodHandler, metrics: Metrics) -> grpc.RpcMethodHandler:
    decode = handler.request_deserializer
    if decode is None:
        return handler
    message_type = getattr(getattr(decode, "__self__", None), "DESCRIPTOR", None)
    message_type = message_type.full_name if message_type is not None else "the method's request message"

    def tolerant(raw: bytes):
        try:
            return decode(raw)
        except (DecodeError, ValueError, TypeError) as exc:
            return Undecodable(method, message_type, exc)

    kind = ("stream" if handler.request_streaming else "unary") + "_" + (
        "stream" if handler.response_streaming else "unary")
    behaviour = getattr(handler, kind)
    refuse = _refuser(metrics)
    if handler.request_streaming:
        wrapped = _streamed(behaviour, refuse)
    else:
        wrapped = _single(behaviour, refuse)
    return handler._replace(request_deserializer=tolerant, **{kind: wrapped})


class WarningBudget:
    """At most `lines` warnings per `seconds`, then one line saying how many were left out: a client that
    sends garbage in a loop must not fill the daemon's log (each refusal is counted in the metrics anyway)."""

    def __init__(self, lines: int = 10, seconds: float = 60.0, clock=time.monotonic):
        self.lines, self.seconds, self.clock = lines, seconds, clock
        self.window_start = -math.inf
        self.used = self.left_out = 0

    def warn(self, text: str) -> None:
        now = self.clock()
        if now - self.window_start >= self.seconds:
            if self.left_out:
                log.warning("%d more undecodable requests in the last %.0f s were refused without a log line "
                            "(stated_request_errors_total{code=\"INVALID_ARGUMENT\"} counts them)",
                            self.left_out, self.seconds)
            self.window_start, self.used, self.left_out = now, 0, 0
        if self.used < self.lines:
            self.used += 1
            log.warning("%s", text)
        else:
            self.left_out += 1


# One budget for every method: the daemon's log is what it protects.
BUDGET = WarningBudget()


def _refuser(metrics: Metrics, budget: WarningBudget = BUDGET):

    async def refuse(context, bad: Undecodable) -> None:
        budget.warn(bad.describe())
        metrics.errors.labels("INVALID_ARGUMENT").inc()
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, bad.describe())

    return refuse


def _single(behaviour, refuse):
    """A behaviour taking one request: an Undecodable one is refused before it runs."""
    if inspect.isasyncgenfunction(behaviour):
        async def generate(request, context):
            if isinstance(request, Undecodable):
                await refuse(context, request)
            async for reply in behaviour(request, context):
                yield reply

        return generate

    async def run(request, context):
        if isinstance(request, Undecodable):
            await refuse(context, request)
        return await behaviour(request, context)

    return run


def _streamed(behaviour, refuse):
    """A behaviour taking a stream of requests: the stream ends the call when it reaches an Undecodable."""

    async def requests(iterator, context):
        async for request in iterator:
            if isinstance(request, Undecodable):
                await refuse(context, request)
            yield request

    if inspect.isasyncgenfunction(behaviour):
        async def generate(iterator, context):
            async for reply in behaviour(requests(iterator, context), context):
                yield reply

        return generate

    async def run(iterator, context):
        return await behaviour(requests(iterator, context), context)

    return run
