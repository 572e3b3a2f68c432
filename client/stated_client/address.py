"""Where the daemon listens: the default socket, STATED_ADDRESS, and gRPC target spelling."""

from __future__ import annotations

import os

ENV_ADDRESS = "STATED_ADDRESS"


def runtime_dir() -> str:
    """A per-user runtime directory for the daemon's socket."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    if not base:
        candidate = f"/run/user/{os.getuid()}"
        base = candidate if os.path.isdir(candidate) and os.access(candidate, os.W_OK) else None
    if base:
        return os.path.join(base, "stated")
    return f"/tmp/stated-{os.getuid()}"


def default_socket() -> str:
    return os.path.join(runtime_dir(), "stated.sock")


def given(address: str | None) -> str | None:
    """Where an address was given, "address=..." or "$STATED_ADDRESS=...", else None: the default socket."""
    if address:
        return f"address={address!r}"
    if os.environ.get(ENV_ADDRESS):
        return f"${ENV_ADDRESS}={os.environ[ENV_ADDRESS]!r}"
    return None


def resolve(address: str | None) -> str:
    """The gRPC target for `address`, STATED_ADDRESS, or the default socket. A bare path becomes unix://."""
    address = address or os.environ.get(ENV_ADDRESS) or default_socket()
    if address.startswith(("unix:", "dns:", "ipv4:", "ipv6:")):
        return address
    if address.startswith("/") or address.startswith("."):
        return "unix://" + os.path.abspath(address)
    return address


def socket_path(target: str) -> str | None:
    """The filesystem path of a unix target, else None."""
    if target.startswith("unix://"):
        return target[len("unix://"):]
    if target.startswith("unix:"):
        return target[len("unix:"):]
    return None
