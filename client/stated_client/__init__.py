"""stated_client: the training process's side of stated (client optimizers, connection, arenas,
embedded daemon). Users normally import the same names from `stated`. Names load lazily so that
importing a submodule (the daemon uses `stated_client.protocol` and `.address`) does not load torch."""

import importlib

# Every public name and the submodule that defines it: the one list `stated_client` and `stated`
# export (a new optimizer class is one entry here).
_NAMES = {
    **dict.fromkeys(("StatedError", "InvalidArgumentError", "NotFoundError", "PermissionDeniedError",
                     "AlreadyAttachedError", "FailedPreconditionError", "ResourceExhaustedError",
                     "StateCorruptError", "DaemonUnavailableError", "InternalError", "NotCopyableError",
                     "InheritedSessionError"), "errors"),
    "StatedOptimizer": "optimizer",
    **dict.fromkeys(("AdamW", "Adam", "SGD"), "optimizers"),
    **dict.fromkeys(("AdamW8bit", "Adafactor", "CAME", "Lion", "SlimAdam"), "lean"),
}

__all__ = sorted(_NAMES)


def __getattr__(name: str):
    module = _NAMES.get(name)
    if module is None:
        raise AttributeError(f"module 'stated_client' has no attribute {name!r}")
    return getattr(importlib.import_module(f"stated_client.{module}"), name)
