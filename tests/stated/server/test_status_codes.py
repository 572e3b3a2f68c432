"""How an error becomes a status (stated.server.status_codes): one table of gRPC codes for the core's
status names, one refusal that counts, and the client's error for each status."""

from __future__ import annotations

import logging

import grpc
import pytest

from stated import errors
from stated.metrics import Metrics
from stated.server.status_codes import GRPC_CODES, refusal
from stated_client import errors as client_errors
from stated_client.protocol import ERROR, HEADER, error_frame, parse_error

CORE_ERRORS = [errors.ServiceError, *errors.ServiceError.__subclasses__()]


def counted(metrics: Metrics, status: str) -> float:
    return metrics.errors.labels(status)._value.get()


@pytest.mark.parametrize("error", CORE_ERRORS, ids=lambda e: e.__name__)
def test_every_core_status_has_its_grpc_code(error):
    assert GRPC_CODES[error.status] is grpc.StatusCode[error.status]


@pytest.mark.parametrize("error", [e for e in CORE_ERRORS if e.status != "INTERNAL"], ids=lambda e: e.__name__)
def test_the_client_raises_its_own_error_for_every_core_status(error):
    raised = client_errors.from_status(error.status, "the sentence")
    assert isinstance(raised, client_errors.StatedError) and str(raised) == "the sentence"
    assert raised.code == error.status


def test_an_unknown_status_is_internal_on_the_client():
    assert type(client_errors.from_status("NO_SUCH_STATUS", "x")) is client_errors.InternalError


def test_a_refusal_says_the_core_errors_sentence_and_counts_it():
    metrics = Metrics()
    status, message = refusal(errors.InvalidArgument("lr is -1; it must be >= 0"), metrics, "Step")
    assert (status, message) == ("INVALID_ARGUMENT", "lr is -1; it must be >= 0")
    assert counted(metrics, "INVALID_ARGUMENT") == 1 and counted(metrics, "INTERNAL") == 0


def test_any_other_exception_is_internal_logged_with_its_traceback(caplog):
    metrics = Metrics()
    try:
        raise KeyError("a bug")
    except KeyError as exc:
        status, message = refusal(exc, metrics, "Register")
    assert status == "INTERNAL" and message == "Register failed: KeyError: 'a bug'"
    assert counted(metrics, "INTERNAL") == 1
    (record,) = [r for r in caplog.records if r.name == "stated.server.status_codes"]
    assert record.levelno == logging.ERROR and record.exc_info[0] is KeyError


def test_an_error_frame_carries_the_status_name():
    data = error_frame("NOT_FOUND", "session abc does not exist\n(detached)")
    length, kind = HEADER.unpack(data[:HEADER.size])
    assert length == len(data) - HEADER.size and kind == ERROR
    assert parse_error(data[HEADER.size:]) == ("NOT_FOUND", "session abc does not exist\n(detached)")
