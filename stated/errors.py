"""The daemon's error types and the one table that maps them to gRPC status codes.

Core code raises these with a sentence that names the bad field; the servicer turns them into a
status with that sentence (STYLE.md: thin servicers, one table of codes).
"""

from __future__ import annotations

import grpc


class ServiceError(Exception):
    """Base of every error the daemon reports to a client."""

    code = grpc.StatusCode.INTERNAL


class InvalidArgument(ServiceError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(ServiceError):
    code = grpc.StatusCode.NOT_FOUND


class PermissionDenied(ServiceError):
    code = grpc.StatusCode.PERMISSION_DENIED


class AlreadyExists(ServiceError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(ServiceError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(ServiceError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DataLoss(ServiceError):
    code = grpc.StatusCode.DATA_LOSS


class Unavailable(ServiceError):
    code = grpc.StatusCode.UNAVAILABLE
