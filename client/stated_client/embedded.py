"""The embedded default: a private daemon for this process when no daemon answers.

It listens on a socket in a private temporary directory, stops when this process exits (atexit, plus
PR_SET_PDEATHSIG and the daemon's own parent watch for a process that is killed), and is shared by
every stated optimizer of the process. A forked child's exit leaves it alone, and an optimizer made in
the child gets the child's own (Note [forked children] in stated_client.fork_guard).
"""

from __future__ import annotations

import atexit
import ctypes
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

log = logging.getLogger("stated.client")

_lock = threading.Lock()
_daemon: "EmbeddedDaemon | None" = None
START_TIMEOUT = 60.0


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class EmbeddedDaemon:
    def __init__(self, extra: tuple[str, ...] = ()) -> None:
        self.owner = os.getpid()  # only this process stops it and removes its directory
        self.directory = tempfile.mkdtemp(prefix="stated-embedded-")
        os.chmod(self.directory, 0o700)
        self.socket = os.path.join(self.directory, "stated.sock")
        self.log_path = os.path.join(self.directory, "daemon.log")
        self._log = open(self.log_path, "wb")
        # The private daemon lives and dies with this process, its state directory with it: checkpoints
        # asked for work, but nothing is written at its shutdown, for no later daemon will read it.
        command = [sys.executable, "-m", "stated", "serve", "--socket", self.socket, "--metrics-addr", "127.0.0.1:0",
                   "--state-dir", os.path.join(self.directory, "state"), "--exit-with-parent",
                   "--shutdown-timeout", "0", *extra]
        self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
                                        preexec_fn=_die_with_parent, close_fds=True)

    @property
    def target(self) -> str:
        return "unix://" + self.socket

    def wait_ready(self, ready) -> None:
        """Waits until `ready(target)` is true; raises RuntimeError with the daemon's log if it dies."""
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the private daemon exited with code {self.process.returncode}:\n{self.log_tail()}")
            if os.path.exists(self.socket) and ready(self.target):
                return
            time.sleep(0.05)
        raise RuntimeError(f"the private daemon did not answer within {START_TIMEOUT:.0f} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 20) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return b"\n".join(f.read().splitlines()[-lines:]).decode(errors="replace")
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        shutil.rmtree(self.directory, ignore_errors=True)


def running_target() -> str | None:
    """The private daemon's target if this process already started one."""
    with _lock:
        if _daemon is not None and _daemon.process.poll() is None:
            return _daemon.target
    return None


def embedded_target(ready, extra: tuple[str, ...] = ()) -> str:
    """The target of this process's private daemon, starting it on first use (with `extra` flags for
    `stated serve`; they apply only when this call starts it)."""
    global _daemon
    with _lock:
        if _daemon is not None and _daemon.process.poll() is None:
            return _daemon.target
        daemon = EmbeddedDaemon(extra)
        try:
            daemon.wait_ready(ready)
        except BaseException:
            daemon.stop()
            raise
        _daemon = daemon
        atexit.register(_stop)
        log.info("started a private stated daemon (pid %d, socket %s); it stops when this process exits",
                 daemon.process.pid, daemon.socket)
        return daemon.target


def _stop() -> None:
    global _daemon
    with _lock:
        if _daemon is not None and _daemon.owner == os.getpid():
            _daemon.stop()
            _daemon = None


# The parent's private daemon, as a forked child inherited it: referenced, never stopped from the child.
_inherited: list[EmbeddedDaemon] = []


def _in_child() -> None:
    global _daemon, _lock
    _lock = threading.Lock()  # another thread of the parent may have held it at the fork
    if _daemon is not None:
        _inherited.append(_daemon)
        _daemon = None


os.register_at_fork(after_in_child=_in_child)
