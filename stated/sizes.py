"""Byte sizes as people write them (`512MiB`, `1.5GB`, `4096`) and as people read them (`1.50 GiB`).

Budgets, page sizes and disk figures reach the daemon from flags and config files, where a bare
number of bytes is error-prone. `parse_size` accepts a whole number of bytes or a number with a
unit, and refuses anything else with a sentence that quotes the bad text, so that it can be handed to
argparse as `type=parse_size` and the user sees what was wrong.

Units, case-insensitive, with optional whitespace between number and unit:

    B                 1
    KB  MB  GB  TB    powers of 1000 (SI), as disk vendors count
    KiB MiB GiB TiB   powers of 1024 (IEC), as memory is counted

Note [no bare K, M, G]: `8G` is refused rather than guessed. Half of the tools that accept it mean
2**30 (GNU `dd`, Kubernetes `8Gi` aside), half mean 10**9 (Kubernetes `8G`), and the difference
is 7% of a memory budget; the user writes `8GiB` or `8GB` and says which.
"""

from __future__ import annotations

import argparse
import fractions
import re

_UNITS = {
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}

# A plain decimal: digits with an optional fraction, or a fraction alone (".5").
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*$")

_HUMAN = [("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)]


class SizeError(ValueError, argparse.ArgumentTypeError):
    """A size that cannot be parsed. A ValueError for callers; argparse prints its message as is."""


def parse_size(text: str | int) -> int:
    """The number of bytes that `text` names, e.g. `parse_size("1.5 GiB") == 1610612736`.

    An int is accepted as a number of bytes. Fractions are allowed when the result is a whole number
    of bytes (`1.5KiB` is 1536; `1.5B` and `0.1KiB` are refused rather than rounded).
    """
    if isinstance(text, bool):
        raise SizeError(f"invalid size {text!r}: expected a number of bytes, e.g. 4096 or 512MiB")
    if isinstance(text, int):
        if text < 0:
            raise SizeError(f"invalid size {text!r}: a size cannot be negative")
        return text
    if not isinstance(text, str):
        raise SizeError(f"invalid size {text!r}: expected a string such as '512MiB'")
    match = _SIZE.match(text)
    if match is None and text.strip().startswith("-"):
        raise SizeError(f"invalid size {text!r}: a size cannot be negative")
    if match is None:
        raise SizeError(
            f"invalid size {text!r}: expected a number of bytes with an optional unit "
            "(B, KB, MB, GB, TB, KiB, MiB, GiB, TiB), e.g. 4096, 512MiB or 1.5GB"
        )
    number, unit = match.groups()
    factor = _UNITS.get(unit.lower() if unit else "b")
    if factor is None:
        raise SizeError(
            f"invalid size {text!r}: unknown unit {unit!r} "
            "(use B, KB, MB, GB, TB for powers of 1000 or KiB, MiB, GiB, TiB for powers of 1024)"
        )
    value = fractions.Fraction(number) * factor
    if value.denominator != 1:
        raise SizeError(f"invalid size {text!r}: it is not a whole number of bytes ({float(value):g})")
    return int(value)


def format_bytes(n: int) -> str:
    """`n` bytes for a human, in IEC units with two decimals: `1.50 GiB`, `64.00 KiB`, `512 B`."""
    sign = "-" if n < 0 else ""
    n = abs(n)
    for name, factor in _HUMAN:
        if n >= factor:
            return f"{sign}{n / factor:.2f} {name}"
    return f"{sign}{n} B"
