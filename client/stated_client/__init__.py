"""stated_client: the training process's side of stated (client optimizers, connection, arenas,
embedded daemon). Users normally import the same names from `stated`."""

from stated_client.errors import (
    AlreadyAttachedError,
    DaemonUnavailableError,
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    NotCopyableError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    StateCorruptError,
    StatedError,
)
from stated_client.optimizer import StatedOptimizer
from stated_client.optimizers import SGD, Adam, AdamW

__all__ = [
    "AdamW", "Adam", "SGD", "StatedOptimizer", "StatedError", "InvalidArgumentError", "NotFoundError",
    "PermissionDeniedError", "AlreadyAttachedError", "FailedPreconditionError", "ResourceExhaustedError",
    "StateCorruptError", "DaemonUnavailableError", "InternalError", "NotCopyableError",
]
