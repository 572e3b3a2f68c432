"""stated: optimizer state outside the training process.

Users import the client optimizers from here (`opt = stated.AdamW(model.parameters(), lr=3e-4)`);
the rest of the package is the daemon (`stated serve`).
"""

__version__ = "0.1.0"

from stated_client import (  # noqa: E402
    SGD,
    Adam,
    AdamW,
    AlreadyAttachedError,
    DaemonUnavailableError,
    InvalidArgumentError,
    NotCopyableError,
    NotFoundError,
    PermissionDeniedError,
    StatedError,
)

__all__ = ["AdamW", "Adam", "SGD", "StatedError", "InvalidArgumentError", "NotFoundError", "PermissionDeniedError",
           "AlreadyAttachedError", "DaemonUnavailableError", "NotCopyableError", "__version__"]
