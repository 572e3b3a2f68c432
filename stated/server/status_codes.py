"""How an error becomes a status, for both wires: the gRPC servicer and the step channel.

The core raises stated.errors.ServiceError, whose `status` is a plain name; anything else is a bug and
becomes INTERNAL, logged with its traceback. `refusal` is the one place that decides the status and the
sentence a client is told and counts it (stated_request_errors_total); the servicer's calls (wrapped in
`rpc`) then abort with `GRPC_CODES[status]`, the step channel writes the name into an error frame.
"""

from __future__ import annotations

import asyncio
import functools
import logging

import grpc

from stated.errors import ServiceError
from stated.metrics import Metrics

log = logging.getLogger("stated.server.status_codes")

# The status names that stated.errors uses, and INTERNAL for bugs, as gRPC codes.
GRPC_CODES = {
    "INVALID_ARGUMENT": grpc.StatusCode.INVALID_ARGUMENT,
    "NOT_FOUND": grpc.StatusCode.NOT_FOUND,
    "PERMISSION_DENIED": grpc.StatusCode.PERMISSION_DENIED,
    "ALREADY_EXISTS": grpc.StatusCode.ALREADY_EXISTS,
    "FAILED_PRECONDITION": grpc.StatusCode.FAILED_PRECONDITION,
    "RESOURCE_EXHAUSTED": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "DATA_LOSS": grpc.StatusCode.DATA_LOSS,
    "UNAVAILABLE": grpc.StatusCode.UNAVAILABLE,
    "INTERNAL": grpc.StatusCode.INTERNAL,
}


def refusal(exc: Exception, metrics: Metrics, what: str) -> tuple[str, str]:
    """The status name and sentence for `exc`, which ended request `what` (an RPC's name), counted.
    A ServiceError says its own; any other exception is INTERNAL, with its type, and is logged."""
    if isinstance(exc, ServiceError):
        status, message = exc.status, str(exc)
    else:
        log.error("%s failed", what, exc_info=exc)
        status, message = "INTERNAL", f"{what} failed: {type(exc).__name__}: {exc}"
    metrics.errors.labels(status).inc()
    return status, message


def rpc(method):
    """Aborts a failed call with its status (stated.server.status_codes), counted; unexpected errors become
    INTERNAL and the daemon keeps serving the other sessions."""

    @functools.wraps(method)
    async def wrapper(self, request, context):
        try:
            return await method(self, request, context)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:
            status, message = refusal(exc, self.metrics, method.__name__)
            await context.abort(GRPC_CODES[status], message)

    return wrapper
