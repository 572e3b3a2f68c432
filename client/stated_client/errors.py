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


class InheritedSessionError(StatedError, RuntimeError):
    """An optimizer used in a forked child of the process it belongs to (Note [forked children] in
    stated_client.fork_guard): the session is the parent's."""

    code = "CLIENT"


# Status names as gRPC spells them: gRPC calls and step channel error frames carry the same ones.
BY_STATUS = {
    "INVALID_ARGUMENT": InvalidArgumentError,
    "OUT_OF_RANGE": InvalidArgumentError,
    "NOT_FOUND": NotFoundError,
    "PERMISSION_DENIED": PermissionDeniedError,
    "ALREADY_EXISTS": AlreadyAttachedError,
    "FAILED_PRECONDITION": FailedPreconditionError,
    "RESOURCE_EXHAUSTED": ResourceExhaustedError,
    "DATA_LOSS": StateCorruptError,
    "UNAVAILABLE": DaemonUnavailableError,
    "DEADLINE_EXCEEDED": DaemonUnavailableError,
}


def from_status(status: str, message: str) -> StatedError:
    """The StatedError for a refusal with gRPC status name `status`; an unknown name is INTERNAL."""
    return BY_STATUS.get(status, InternalError)(message)


def from_rpc_error(error: grpc.RpcError, target: str) -> StatedError:
    """The StatedError for a failed call, carrying the daemon's sentence."""
    code = error.code() if hasattr(error, "code") else None
    details = error.details() if hasattr(error, "details") else str(error)
    status = code.name if isinstance(code, grpc.StatusCode) else ""
    if BY_STATUS.get(status) is DaemonUnavailableError:
        details = f"the stated daemon at {target} is unavailable: {details}"
    return from_status(status, details)
