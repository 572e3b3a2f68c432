"""The daemon's error types, each with the name of the status a client is told.

Core code raises these with a sentence that names the bad field. The core speaks no gRPC: a status is a
plain name (gRPC's spelling), and the wire's edge maps it to a gRPC code (stated.server.status_codes) or
writes it into a step channel error frame (STYLE.md: thin servicers, one table of codes).
"""

from __future__ import annotations


class ServiceError(Exception):
    """Base of every error the daemon reports to a client."""

    status = "INTERNAL"


class InvalidArgument(ServiceError):
    status = "INVALID_ARGUMENT"


class NotFound(ServiceError):
    status = "NOT_FOUND"


class PermissionDenied(ServiceError):
    status = "PERMISSION_DENIED"


class AlreadyExists(ServiceError):
    status = "ALREADY_EXISTS"


class FailedPrecondition(ServiceError):
    status = "FAILED_PRECONDITION"


class ResourceExhausted(ServiceError):
    status = "RESOURCE_EXHAUSTED"


class DataLoss(ServiceError):
    status = "DATA_LOSS"


class Unavailable(ServiceError):
    status = "UNAVAILABLE"
