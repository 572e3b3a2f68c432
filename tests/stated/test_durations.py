"""Durations on the command line (`--retain`, `--shutdown-timeout`)."""

from __future__ import annotations

import argparse
import math

import pytest

from stated.durations import parse_duration


@pytest.mark.parametrize("text,seconds", [("90", 90), ("90s", 90), ("1.5m", 90), ("2h", 7200), ("1d", 86400),
                                          ("30 min", 1800), ("0", 0), ("forever", math.inf), ("Never", math.inf)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "-5s", "5y", "m", "1e3"])
def test_bad_durations_name_the_text_and_the_form(text):
    with pytest.raises(argparse.ArgumentTypeError, match=f"invalid duration {text!r}.*such as 90s, 30m or 2h"):
        parse_duration(text)
