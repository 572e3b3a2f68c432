"""stated_client: the training process's side of stated (client optimizers, connection, arenas,
embedded daemon). Users normally import the same names from `stated`. Names load lazily so that
importing a submodule (the daemon uses `stated_client.protocol` and `.address`) does not load torch."""

_ERRORS = {
    "StatedError", "InvalidArgumentError", "NotFoundError", "PermissionDeniedError", "AlreadyAttachedError",
    "FailedPreconditionError", "ResourceExhaustedError", "StateCorruptError", "DaemonUnavailableError",
    "InternalError", "NotCopyableError",
}
_OPTIMIZERS = {"AdamW", "Adam", "SGD"}
_LEAN = {"AdamW8bit", "Adafactor", "CAME", "Lion", "SlimAdam"}

__all__ = sorted(_ERRORS | _OPTIMIZERS | _LEAN | {"StatedOptimizer"})


def __getattr__(name: str):
    if name in _ERRORS:
        from stated_client import errors

        return getattr(errors, name)
    if name in _OPTIMIZERS:
        from stated_client import optimizers

        return getattr(optimizers, name)
    if name in _LEAN:
        from stated_client import lean

        return getattr(lean, name)
    if name == "StatedOptimizer":
        from stated_client.optimizer import StatedOptimizer

        return StatedOptimizer
    raise AttributeError(f"module 'stated_client' has no attribute {name!r}")
