"""The adversarial tests' daemons: real `stated serve` processes, restarted on the same --state-dir."""

from __future__ import annotations

import pytest

from support.daemon import DaemonProcess


@pytest.fixture
def daemons(tmp_path):
    """`daemons(name, *flags)` starts a daemon in `tmp_path/name`; the same name again starts a new one on
    the same socket and --state-dir (a restart; the one before must be gone). Whatever still runs at the
    end is stopped."""
    started: list[DaemonProcess] = []

    def start(name: str, *extra: str) -> DaemonProcess:
        proc = DaemonProcess(tmp_path / name, *extra)
        started.append(proc)
        proc.start()
        return proc

    yield start
    for proc in started:
        if proc.process is not None and proc.process.poll() is None:
            proc.stop()
