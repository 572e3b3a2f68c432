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
