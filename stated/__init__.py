"""stated: optimizer state outside the training process.

Users import the client optimizers from here (`opt = stated.AdamW(model.parameters(), lr=3e-4)`);
the rest of the package is the daemon (`stated serve`). The client names are imported lazily, so that
`stated serve` can configure OpenMP before torch loads (Note [idle OpenMP threads] in stated.cli);
their list is stated_client's (importing that package loads no submodule).
"""

from stated_client import __all__ as _CLIENT_NAMES

__version__ = "0.1.0"

__all__ = sorted(_CLIENT_NAMES) + ["__version__"]


def __getattr__(name: str):
    if name in _CLIENT_NAMES:
        import stated_client

        return getattr(stated_client, name)
    raise AttributeError(f"module 'stated' has no attribute {name!r}")
