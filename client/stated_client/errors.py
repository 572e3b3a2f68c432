"""The errors the client raises: subclasses of StatedError, never a raw grpc.RpcError.

Each also derives from the builtin that fits (ValueError for a bad argument, PermissionError, ...), so
code written against torch.optim's exceptions keeps working.
"""

from __future__ import annotations

import grpc


class StatedError(Exception):
    """Base of every error stated raises in the training process. `code` is the gRPC status name."""

    code = "UNKNOWN"


class InvalidArgumentError(StatedError, ValueError):
    code = "INVALID_ARGUMENT"


class NotFoundError(StatedError, LookupError):
    code = "NOT_FOUND"


class PermissionDeniedError(StatedError, PermissionError):
    code = "PERMISSION_DENIED"


class AlreadyAttachedError(StatedError):
    code = "ALREADY_EXISTS"


class FailedPreconditionError(StatedError, RuntimeError):
    code = "FAILED_PRECONDITION"


class ResourceExhaustedError(StatedError, RuntimeError):
    code = "RESOURCE_EXHAUSTED"


class StateCorruptError(StatedError, RuntimeError):
    code = "DATA_LOSS"


class DaemonUnavailableError(StatedError, ConnectionError):
    code = "UNAVAILABLE"


class InternalError(StatedError, RuntimeError):
    code = "INTERNAL"


class NotCopyableError(StatedError, TypeError):
    code = "CLIENT"


BY_CODE = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyAttachedError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.DATA_LOSS: StateCorruptError,
    grpc.StatusCode.UNAVAILABLE: DaemonUnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DaemonUnavailableError,
}


def from_rpc_error(error: grpc.RpcError, target: str) -> StatedError:
    """The StatedError for a failed call, carrying the daemon's sentence."""
    code = error.code() if hasattr(error, "code") else None
    details = error.details() if hasattr(error, "details") else str(error)
    cls = BY_CODE.get(code, InternalError)
    if cls is DaemonUnavailableError:
        return cls(f"the stated daemon at {target} is unavailable: {details}")
    return cls(details)
