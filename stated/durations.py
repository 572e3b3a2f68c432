"""Durations on the command line: `--retain 30m`, `--shutdown-timeout 90s`, `forever`."""

from __future__ import annotations

import argparse
import math
import re

# How long a (job, rank) whose trainer died stays retained (`stated serve --retain`): long enough for a
# scheduler to restart a crashed trainer, pod or node, short enough not to hold memory and disk for a
# job nobody comes back to.
DEFAULT_RETAIN_SECONDS = 30 * 60.0

_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*$")


def parse_duration(text: str) -> float:
    """Seconds that `text` names: a number with an optional unit s, m, h or d; 'forever' is inf."""
    lowered = text.strip().lower()
    if lowered in ("forever", "inf", "never"):
        return math.inf
    match = _DURATION.match(lowered)
    if match is None or match.group(2) not in _UNITS:
        raise argparse.ArgumentTypeError(f"invalid duration {text!r}: expected a number with an optional unit "
                                         f"(s, m, h, d), such as 90s, 30m or 2h, or 'forever'")
    return float(match.group(1)) * _UNITS[match.group(2)]
