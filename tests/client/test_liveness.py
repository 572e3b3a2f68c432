"""STATED_TIMEOUT and the keepalive interval the client asks for (Note [liveness] in stated_client.liveness);
the daemons that stop, die or fall silent are in tests/e2e/test_daemon_gone.py."""

from __future__ import annotations

import pytest

import stated
from stated_client.liveness import DEFAULT_TIMEOUT, keepalive_seconds, timeout_from_env


@pytest.mark.parametrize("text, seconds", [(None, DEFAULT_TIMEOUT), ("", DEFAULT_TIMEOUT), ("2.5", 2.5), (" 7 ", 7.0),
                                           ("0", None), ("inf", None)])
def test_stated_timeout(monkeypatch, text, seconds):
    if text is None:
        monkeypatch.delenv("STATED_TIMEOUT", raising=False)
    else:
        monkeypatch.setenv("STATED_TIMEOUT", text)
    assert timeout_from_env() == seconds


@pytest.mark.parametrize("text", ["-1", "soon", "nan"])
def test_a_bad_stated_timeout_is_refused_by_name(monkeypatch, text):
    monkeypatch.setenv("STATED_TIMEOUT", text)
    with pytest.raises(stated.InvalidArgumentError, match=f"STATED_TIMEOUT='{text}' is not a number of seconds"):
        timeout_from_env()


def test_default_is_sixty_seconds_with_a_keepalive_every_five():
    assert DEFAULT_TIMEOUT == 60.0
    assert keepalive_seconds(60.0) == 5.0
    assert keepalive_seconds(2.0) == 0.5  # a quarter of a short timeout
    assert keepalive_seconds(None) == 0.0  # waiting forever: none asked for
