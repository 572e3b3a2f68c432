"""Daemons for the GPU tests: real `stated serve` processes (tests/support/daemon.py) with small pages, so
that even small models span several pages and the staging ring turns over many times a step.

The fixtures start nothing unless a test asks for them, and every test module here skips itself first
(cuda_env.require_cuda) on a machine without CuPy or a CUDA device.
"""

from __future__ import annotations

import os

import pytest

from support.daemon import DaemonProcess

# 64KiB pages (the smallest the daemon takes): a 100K-parameter AdamW model has 13 pages.
PAGE = "64KiB"
STAGING = "3"


def _daemon(directory, *extra: str):
    proc = DaemonProcess(directory, "--page-size", PAGE, "--gpu-staging", STAGING, *extra)
    proc.start()
    return proc


def _stop(proc) -> None:
    proc.stop()
    assert proc.leaked_segments() == [], "the daemon left shared memory segments behind"
    assert not os.path.exists(proc.socket), "the daemon left its socket behind"


@pytest.fixture(scope="module")
def gpu_daemon(tmp_path_factory):
    """No GPU cache: every page streams through the staging ring every step."""
    proc = _daemon(tmp_path_factory.mktemp("gpu-daemon"))
    yield proc
    _stop(proc)


@pytest.fixture(scope="module")
def gpu_cache_daemon(tmp_path_factory):
    """A GPU cache of 8 pages: smaller than the models of the cache tests, so pages are evicted too."""
    proc = _daemon(tmp_path_factory.mktemp("gpu-cache-daemon"), "--gpu-cache", "512KiB")
    yield proc
    _stop(proc)


@pytest.fixture(scope="module")
def gpu_big_cache_daemon(tmp_path_factory):
    """A GPU cache larger than any test model: after the first step no page moves."""
    proc = _daemon(tmp_path_factory.mktemp("gpu-big-cache-daemon"), "--gpu-cache", "64MiB")
    yield proc
    _stop(proc)
