"""Shared fixtures: a real daemon (`stated serve`) on a unix socket in a temporary directory."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from support.daemon import DaemonProcess  # noqa: E402


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    """One daemon per test module; its segments and socket must be gone after it stops."""
    proc = DaemonProcess(tmp_path_factory.mktemp("daemon"))
    proc.start()
    yield proc
    proc.stop()
    assert proc.leaked_segments() == [], "the daemon left shared memory segments behind"
    assert not os.path.exists(proc.socket), "the daemon left its socket behind"


@pytest.fixture
def address(daemon):
    return daemon.address


@pytest.fixture
def spawn(tmp_path):
    """Starts extra daemons for one test, each in its own directory (the same name again starts a new one
    on that directory's socket and --state-dir: a restart); stops whatever is left at the end."""
    started: list[DaemonProcess] = []

    def start(name: str, *extra: str, socket: str | None = None) -> DaemonProcess:
        (tmp_path / name).mkdir(exist_ok=True)
        proc = DaemonProcess(tmp_path / name, *extra)
        if socket is not None:
            proc.socket = socket
        started.append(proc)
        proc.start()
        return proc

    yield start
    for proc in started:
        if proc.process is not None and proc.process.poll() is None:
            proc.stop()
