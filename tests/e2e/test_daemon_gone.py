"""A trainer whose daemon goes away is told so (Note [liveness] in stated_client.liveness): SIGTERM and
kill -9 between steps and mid-step, SIGSTOP, on the step channel and over gRPC, each a
DaemonUnavailableError naming the daemon and what to do; and a step longer than STATED_TIMEOUT on a live
daemon is not silence. Real daemons in real processes, real signals, STATED_TIMEOUT of a few seconds.
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
import uuid

import grpc
import pytest
import torch

import stated
from stated.v1 import state_service_pb2 as pb
from stated_client.protocol import SHUTTING_DOWN

TIMEOUT = 2.0  # STATED_TIMEOUT in these tests; the keepalives come every TIMEOUT / 4
# A paged step that takes seconds on this machine's CPUs: Adafactor of a 1-D tensor keeps a full second
# moment, 400 MB of state for 100M parameters, paged through a 100 MiB host budget by one kernel thread.
SLOW = ("--cpu-threads", "1", "--host-memory", "100MiB", "--page-size", "16MiB")
SLOW_PARAMETERS = 100_000_000


@pytest.fixture(autouse=True)
def short_timeout(monkeypatch):
    monkeypatch.setenv("STATED_TIMEOUT", str(TIMEOUT))


@pytest.fixture(params=["step channel", "gRPC"])
def wire(request, monkeypatch):
    if request.param == "gRPC":
        monkeypatch.setenv("STATED_STEP_CHANNEL", "0")
    return request.param


def small_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))


def wait_until_stopped(pid: int, timeout: float = 10.0) -> None:
    """Until every thread of `pid` is stopped (state T in /proc), as SIGSTOP makes them."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = []
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                states.append(f.read().rsplit(")", 1)[1].split()[0])
        if all(state in "Tt" for state in states):
            return
        time.sleep(0.01)
    raise AssertionError(f"process {pid} did not stop within {timeout} s")


def train(model, opt, steps: int = 1) -> None:
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(8, 4)).square().mean().backward()
        opt.step()


def slow_optimizer(proc):
    """One tensor of SLOW_PARAMETERS with its gradient set: each step() is a paged step of seconds."""
    p = torch.nn.Parameter(torch.zeros(SLOW_PARAMETERS))
    opt = stated.Adafactor([p], address=proc.address, job=f"slow-{uuid.uuid4().hex[:6]}")
    p.grad = torch.ones(SLOW_PARAMETERS)
    return p, opt


def assert_stopped(error: BaseException, proc) -> None:
    """The sentence a trainer whose daemon stopped gets: which daemon, that it stopped, what to do."""
    text = str(error)
    assert isinstance(error, stated.DaemonUnavailableError), repr(error)
    assert f"the stated daemon at {proc.address} stopped (" in text, text
    assert "Its optimizer state is kept as of its last checkpoint" in text, text
    assert "resume=True" in text and "opt.load_state_dict()" in text and "stated serve" in text, text
    assert "does not exist" not in text and "NOT_FOUND" not in text, text


def assert_stays_stopped(model, opt, proc) -> None:
    """Every later call says the same, and close() returns at once."""
    for attempt in (lambda: train(model, opt), opt.state_dict):
        with pytest.raises(stated.DaemonUnavailableError) as info:
            attempt()
        assert_stopped(info.value, proc)
    started = time.monotonic()
    opt.close()
    assert time.monotonic() - started < 1.0


# --- between steps -------------------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "kill -9"])
def test_daemon_gone_between_steps(spawn, wire, sig):
    proc = spawn("daemon")
    model = small_model()
    opt = stated.AdamW(model.parameters(), address=proc.address, job="between")
    train(model, opt, 2)
    proc.stop(sig)
    with pytest.raises(stated.DaemonUnavailableError) as info:
        train(model, opt)
    assert_stopped(info.value, proc)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert_stays_stopped(model, opt, proc)


def test_sigterm_with_a_step_sent_at_once_is_not_not_found(spawn, wire):
    """The step sent right after SIGTERM (no wait for the daemon to exit) used to meet a session already
    detached: NOT_FOUND "session does not exist"."""
    proc = spawn("daemon")
    model = small_model()
    opt = stated.AdamW(model.parameters(), address=proc.address, job="at-once")
    train(model, opt, 2)
    proc.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 30
    with pytest.raises(stated.DaemonUnavailableError) as info:
        while time.monotonic() < deadline:  # until the step that meets the shutdown
            train(model, opt)
    assert_stopped(info.value, proc)
    assert proc.stop() == 0
    assert_stays_stopped(model, opt, proc)


def test_watch_keepalives_and_the_end_a_shutdown_gives_it(spawn):
    """On the wire: keepalives at the interval asked for, none when none is asked, and a daemon that shuts
    down ends the stream with UNAVAILABLE "the stated daemon is shutting down"."""
    proc = spawn("daemon")
    channel, stub = proc.stub()
    with channel:
        silent = stub.Attach(pb.AttachRequest(job="raw-silent", rank=0, algorithm="adamw", pid=os.getpid())).session
        received = []
        with pytest.raises(grpc.RpcError) as info:
            for reply in stub.Watch(pb.WatchRequest(session=silent), timeout=0.6):
                received.append(reply)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert [(r.attached, r.keepalive) for r in received] == [(True, False)]

        session = stub.Attach(pb.AttachRequest(job="raw", rank=0, algorithm="adamw", pid=os.getpid())).session
        watch = stub.Watch(pb.WatchRequest(session=session, keepalive_seconds=0.1))
        assert next(watch).attached
        started = time.monotonic()
        for _ in range(5):
            assert next(watch).keepalive
        assert 0.3 < time.monotonic() - started < 3.0
        proc.process.send_signal(signal.SIGTERM)
        with pytest.raises(grpc.RpcError) as info:
            for reply in watch:
                assert reply.keepalive
        assert (info.value.code(), info.value.details()) == (grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)
    assert proc.stop() == 0


# --- a daemon that stops answering -----------------------------------------------------------------------


@pytest.mark.parametrize("wire, what", [("step channel", "step"), ("gRPC", "step"), ("gRPC", "state_dict")],
                         indirect=["wire"])
def test_sigstopped_daemon_is_given_up_on_within_the_timeout(spawn, wire, what):
    proc = spawn("daemon")
    model = small_model()
    opt = stated.AdamW(model.parameters(), address=proc.address, job="stopped")
    train(model, opt, 2)
    os.kill(proc.process.pid, signal.SIGSTOP)
    wait_until_stopped(proc.process.pid)  # the signal lands asynchronously: a step sent at once may be answered
    try:
        started = time.monotonic()
        with pytest.raises(stated.DaemonUnavailableError) as info:
            train(model, opt) if what == "step" else opt.state_dict()
        waited = time.monotonic() - started
        # Silence counts from the last keepalive, which came at most TIMEOUT / 4 before the SIGSTOP.
        assert TIMEOUT * 0.7 <= waited <= TIMEOUT + 3.0, waited
        text = str(info.value)
        assert f"the stated daemon at {proc.address} gave no sign of life for " in text, text
        assert "(STATED_TIMEOUT is 2 s): it is stopped (SIGSTOP?) or hung" in text, text
        assert "resume=True" in text and "raise STATED_TIMEOUT" in text, text
        with pytest.raises(stated.DaemonUnavailableError, match="gave no sign of life"):
            train(model, opt)  # the verdict stands
    finally:
        os.kill(proc.process.pid, signal.SIGCONT)
    started = time.monotonic()
    opt.close()
    assert time.monotonic() - started < 1.0
    assert proc.stop() == 0


# --- mid-step, and a long step ---------------------------------------------------------------------------


def test_a_paged_step_longer_than_the_timeout_is_not_silence(spawn, monkeypatch):
    monkeypatch.setenv("STATED_TIMEOUT", "1")
    proc = spawn("slow", *SLOW)
    p, opt = slow_optimizer(proc)
    took = []
    for _ in range(2):
        started = time.monotonic()
        opt.step()
        took.append(time.monotonic() - started)
    assert max(took) > 2.0, f"the steps took {took} s: too short to show that a long step is not silence"
    assert torch.all(p[:4] != 0)
    opt.close()


def test_sigterm_mid_step_finishes_the_step_and_refuses_other_sessions_as_unavailable(spawn, wire):
    proc = spawn("slow", *SLOW)
    p, opt = slow_optimizer(proc)
    channel, stub = proc.stub()
    other = stub.Attach(pb.AttachRequest(job="other", rank=0, algorithm="sgd", pid=os.getpid())).session
    stub.Register(pb.RegisterRequest(session=other, groups=[pb.GroupHyperparameters(scalars={"lr": 0.1})],
                                     tensors=[pb.TensorSpec(shape=[8], dtype=pb.D_TYPE_FLOAT32)]))
    refused = []

    def meanwhile():
        time.sleep(0.5)
        proc.process.send_signal(signal.SIGTERM)
        time.sleep(0.3)  # the daemon is shutting down, waiting for the step under way
        try:
            stub.Step(pb.StepRequest(session=other, step=1, groups=[pb.GroupHyperparameters(scalars={"lr": 0.1})],
                                     has_grad=b"\x01"), timeout=10)
        except grpc.RpcError as error:
            refused.append((error.code(), error.details()))

    helper = threading.Thread(target=meanwhile)
    started = time.monotonic()
    helper.start()
    try:
        opt.step()  # the daemon completes the step it is applying before it detaches the session
    except stated.DaemonUnavailableError as error:  # or its reply is cut by the shutdown
        assert_stopped(error, proc)
    helper.join()
    assert time.monotonic() - started > 0.8, "the step ended before the signal: not mid-step"
    assert refused == [(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)]
    channel.close()
    with pytest.raises(stated.DaemonUnavailableError) as info:
        opt.step()
    assert_stopped(info.value, proc)
    assert proc.stop() == 0
    opt.close()


def test_kill_9_mid_step(spawn, wire):
    proc = spawn("slow", *SLOW)
    p, opt = slow_optimizer(proc)
    killer = threading.Timer(0.5, proc.process.kill)
    started = time.monotonic()
    killer.start()
    with pytest.raises(stated.DaemonUnavailableError) as info:
        opt.step()
    assert time.monotonic() - started < 0.5 + TIMEOUT + 3.0
    assert_stopped(info.value, proc)
    killer.join()
    proc.stop()
    opt.close()
    # kill -9 leaves the state file behind (the arenas' memory went with the daemon): hundreds of MB.
    shutil.rmtree(os.path.join(proc.directory, "state"), ignore_errors=True)
