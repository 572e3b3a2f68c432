"""parse_size and format_bytes: one table of accepted spellings, one of refused ones."""

from __future__ import annotations

import argparse

import pytest

from stated.sizes import SizeError, format_bytes, parse_size

ACCEPTED = [
    ("4096", 4096),
    ("0", 0),
    ("512MiB", 512 * 2**20),
    ("8GiB", 8 * 2**30),
    ("1.5GB", 1_500_000_000),
    ("64KiB", 65536),
    ("64kib", 65536),
    ("64KIB", 65536),
    ("2 MB", 2_000_000),
    ("  3kb  ", 3000),
    ("1TiB", 2**40),
    ("1tb", 10**12),
    ("7B", 7),
    ("7 b", 7),
    ("1.5KiB", 1536),
    (".5MiB", 2**19),
    ("0.25GiB", 2**28),
]

REFUSED = [
    ("10%", "expected a number of bytes"),
    ("8G", "unknown unit 'G'"),
    ("8 Gb it", "expected a number of bytes"),
    ("4 pages", "unknown unit 'pages'"),
    ("", "expected a number of bytes"),
    ("MiB", "expected a number of bytes"),
    ("-1", "cannot be negative"),
    ("-1MiB", "cannot be negative"),
    ("1.5B", "not a whole number of bytes"),
    ("0.1KiB", "not a whole number of bytes"),
    ("1e3", "expected a number of bytes"),
    ("1,024", "expected a number of bytes"),
]


@pytest.mark.parametrize("text,expected", ACCEPTED)
def test_accepted(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text,reason", REFUSED)
def test_refused_names_the_text(text, reason):
    with pytest.raises(ValueError) as info:
        parse_size(text)
    assert repr(text) in str(info.value)
    assert reason in str(info.value)


def test_ints_are_bytes():
    assert parse_size(12345) == 12345
    with pytest.raises(SizeError, match="negative"):
        parse_size(-5)
    with pytest.raises(SizeError):
        parse_size(True)
    with pytest.raises(SizeError):
        parse_size(1.5)  # a float is not a size: the caller should say which unit it meant


def test_argparse_type_reports_the_reason(capsys):
    parser = argparse.ArgumentParser(prog="stated")
    parser.add_argument("--budget", type=parse_size)
    assert parser.parse_args(["--budget", "2GiB"]).budget == 2 * 2**30
    with pytest.raises(SystemExit):
        parser.parse_args(["--budget", "2G"])
    err = capsys.readouterr().err
    assert "invalid size '2G'" in err and "unknown unit" in err


@pytest.mark.parametrize(
    "n,text",
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1.00 KiB"),
        (65536, "64.00 KiB"),
        (3 * 2**29, "1.50 GiB"),
        (5 * 2**40, "5.00 TiB"),
        (-2048, "-2.00 KiB"),
    ],
)
def test_format_bytes(n, text):
    assert format_bytes(n) == text


def test_format_then_parse_round_trips_exact_values():
    for n in [0, 1, 1024, 3 * 2**29, 2**40]:
        assert parse_size(format_bytes(n).replace(" ", "")) == n
