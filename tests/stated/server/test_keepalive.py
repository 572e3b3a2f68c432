"""The keepalive interval the daemon grants a Watch (WatchRequest.keepalive_seconds); the stream itself is
tested on a real daemon in tests/e2e/test_daemon_gone.py."""

from __future__ import annotations

import pytest

from stated.server.servicer import keepalive_interval


@pytest.mark.parametrize("asked, granted", [(0.0, None), (-1.0, None), (float("nan"), None), (0.001, 0.05),
                                            (0.5, 0.5), (5.0, 5.0), (1e9, 60.0)])
def test_keepalive_interval(asked, granted):
    assert keepalive_interval(asked) == granted
