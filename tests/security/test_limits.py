"""Each denial of service of issue 12 against its limit (Note [limits and their defaults] in stated.limits),
on the real daemon, while a bystander job steps exact against torch.optim.AdamW.

Small limits come in through the flags so that the tests are quick; each refusal must name its flag.
"""

from __future__ import annotations

import os
import socket
import time

import grpc
import pytest
import torch

import stated
from stated.v1 import state_service_pb2 as pb
from stated_client.protocol import ERROR, HEADER, MAX_FRAME_BYTES, MESSAGE, channel_path
from support.abuse import ADAMW, Bystander, unique

F32 = pb.D_TYPE_FLOAT32
SCALARS = {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.0}


def rss_bytes(pid: int) -> int:
    return _status(pid, "VmRSS:") * 1024


def threads(pid: int) -> int:
    return _status(pid, "Threads:")


def _status(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key))


def refusal(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        result = call()
        if hasattr(result, "__next__"):
            list(result)
    return info.value


def answer(sock: socket.socket) -> tuple[int, str]:
    """The kind and text of the next frame; (-1, "") when the daemon closed the connection first."""
    header = sock.recv(HEADER.size, socket.MSG_WAITALL)
    if len(header) < HEADER.size:
        return -1, ""
    length, kind = HEADER.unpack(header)
    return kind, sock.recv(length, socket.MSG_WAITALL).decode(errors="replace")


def connect(proc) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(channel_path(proc.socket))
    return sock


def attach(stub, job: str | None = None) -> pb.SessionRef:
    return stub.Attach(pb.AttachRequest(job=job or unique("dos"), algorithm="adamw", pid=os.getpid()),
                       timeout=10).session


def test_frames_announced_before_authentication_cost_nothing(spawn):
    """Each connection announcing a 64 MiB first frame cost 64 MiB: now it is refused from the header."""
    proc = spawn("daemon")
    bystander = Bystander(proc)
    bystander.step()
    before = rss_bytes(proc.process.pid)
    socks = [connect(proc) for _ in range(30)]
    for sock in socks:
        sock.sendall(HEADER.pack(MAX_FRAME_BYTES, MESSAGE) + b"x" * 1000)
    for sock in socks:
        kind, text = answer(sock)
        assert kind == ERROR and text.startswith("INVALID_ARGUMENT\n") and "cannot be a SessionRef" in text, text
        sock.close()
    assert rss_bytes(proc.process.pid) - before < 16 << 20  # 30 x 64 MiB were asked for
    bystander.step()
    bystander.close()


def test_silent_connections_are_bounded_and_timed_out(spawn):
    """500 silent connections held 500 threads forever: now at most --max-connections, each for at most
    --step-auth-timeout."""
    proc = spawn("daemon", "--max-connections", "20", "--step-auth-timeout", "1s")
    bystander = Bystander(proc)  # its own step line is one of the 20
    bystander.step()
    base_threads = threads(proc.process.pid)
    socks = [connect(proc) for _ in range(40)]
    time.sleep(0.3)
    assert threads(proc.process.pid) - base_threads <= 20
    refused = timed_out = 0
    for sock in socks:
        kind, text = answer(sock)
        if "--max-connections=20" in text:
            assert text.startswith("RESOURCE_EXHAUSTED\n"), text
            refused += 1
        elif "--step-auth-timeout=1s" in text:
            assert text.startswith("FAILED_PRECONDITION\n"), text
            timed_out += 1
        sock.close()
    assert refused >= 21 and timed_out >= 1 and refused + timed_out == 40, (refused, timed_out)
    bystander.step()  # its authenticated line was neither refused nor timed out
    bystander.close()


def test_import_state_is_checked_chunk_by_chunk_not_buffered(spawn):
    """ImportState buffered a whole stream before validating (1 GiB for a 10-element tensor)."""
    proc = spawn("daemon")
    bystander = Bystander(proc)
    channel, stub = proc.stub()
    with channel:
        session = attach(stub)
        stub.Register(pb.RegisterRequest(session=session, groups=[pb.GroupHyperparameters(scalars=SCALARS)],
                                         tensors=[pb.TensorSpec(shape=[10], dtype=F32)]), timeout=10)
        sent = [0]

        def stream():
            yield pb.ImportStateRequest(session=session)
            yield pb.ImportStateRequest(header=pb.TensorStateHeader(tensor=0, step=1, fields=["exp_avg", "exp_avg_sq"]))
            for i in range(1024):  # up to 1 GiB, 1 MiB at a time
                sent[0] += 1
                yield pb.ImportStateRequest(chunk=pb.StateChunk(tensor=0, field="exp_avg", dtype=F32, shape=[10],
                                                                offset=i * (1 << 18), data=bytes(1 << 20)))

        before = rss_bytes(proc.process.pid)
        error = refusal(lambda: stub.ImportState(stream(), timeout=30))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "elements, more than the tensor's 10" in error.details() or "beyond the 40" in error.details()
        assert sent[0] < 64, f"the daemon read {sent[0]} MiB before refusing"
        assert rss_bytes(proc.process.pid) - before < 64 << 20
    bystander.step()
    bystander.close()


def test_a_register_of_too_many_tensors_is_refused_before_anything_is_built(spawn):
    """One Register of 100k tensors took 9 s and 295 MB, one of 1M 5 GB."""
    proc = spawn("daemon", "--max-tensors-per-register", "1000")
    bystander = Bystander(proc)
    channel, stub = proc.stub()
    with channel:
        session = attach(stub)
        groups = [pb.GroupHyperparameters(scalars=SCALARS)]
        start = time.monotonic()
        error = refusal(lambda: stub.Register(pb.RegisterRequest(
            session=session, groups=groups, tensors=[pb.TensorSpec(shape=[1], dtype=F32)] * 100_000), timeout=30))
        assert time.monotonic() - start < 5
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "Register has 100000 tensors, over --max-tensors-per-register=1000" in error.details()
        reply = stub.Register(pb.RegisterRequest(session=session, groups=groups,
                                                 tensors=[pb.TensorSpec(shape=[1], dtype=F32)] * 1000), timeout=60)
        assert len(reply.placements) == 1000  # at the limit it registers
    bystander.step()
    bystander.close()


def test_the_default_tensor_limit_refuses_100k_tensors(spawn):
    proc = spawn("daemon")
    channel, stub = proc.stub()
    with channel:
        error = refusal(lambda: stub.Register(pb.RegisterRequest(
            session=attach(stub), groups=[pb.GroupHyperparameters(scalars=SCALARS)],
            tensors=[pb.TensorSpec(shape=[1], dtype=F32)] * 100_000), timeout=30))
    assert "over --max-tensors-per-register=65536" in error.details()


def test_bytes_per_job_and_sessions_are_bounded(spawn):
    proc = spawn("daemon", "--max-job-bytes", "1MiB", "--max-sessions", "4")
    channel, stub = proc.stub()
    with channel:
        session = attach(stub, "big")
        error = refusal(lambda: stub.Register(pb.RegisterRequest(
            session=session, groups=[pb.GroupHyperparameters(scalars=SCALARS)],
            tensors=[pb.TensorSpec(shape=[1 << 20], dtype=F32)]), timeout=30))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "over --max-job-bytes=1" in error.details()
        for _ in range(3):
            attach(stub)
        error = refusal(lambda: attach(stub))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-sessions=4" in error.details()


def test_attaches_that_never_watch_are_reaped_and_free_their_rank(spawn):
    """2,000 attaches that never opened Watch were never reaped, and held their (job, rank)."""
    # 6 s: a second Attach of a live (job, rank) first waits 3 s for it to end (a trainer that died),
    # and the squatter must still be there after that.
    proc = spawn("daemon", "--watch-timeout", "6s")
    bystander = Bystander(proc)
    channel, stub = proc.stub()
    with channel:
        squatted = [attach(stub, f"squat-{i}") for i in range(200)]
        error = refusal(lambda: attach(stub, "squat-199"))  # the newest, well within its time
        assert error.code() == grpc.StatusCode.ALREADY_EXISTS and "--watch-timeout=6s" in error.details()
        deadline = time.monotonic() + 20
        while stub.GetStats(pb.GetStatsRequest(), timeout=10).live_sessions > 1 and time.monotonic() < deadline:
            bystander.step()  # a watched session is never reaped
            time.sleep(0.2)
        assert stub.GetStats(pb.GetStatsRequest(), timeout=10).live_sessions == 1
        error = refusal(lambda: stub.Detach(pb.DetachRequest(session=squatted[0]), timeout=10))
        assert error.code() == grpc.StatusCode.NOT_FOUND
        assert attach(stub, "squat-0").id  # the rank is free again
    assert "reason=it opened no Watch within --watch-timeout=6s of its attach" in proc.log()
    bystander.step()
    bystander.close()


def test_an_idle_step_line_closed_by_the_daemon_reconnects(spawn):
    proc = spawn("daemon", "--step-idle-timeout", "1s")
    params = [torch.nn.Parameter(torch.ones(16))]
    reference = [torch.nn.Parameter(torch.ones(16))]
    opt = stated.AdamW(params, address=proc.address, job=unique("idle"), **ADAMW)
    ref = torch.optim.AdamW(reference, fused=True, **ADAMW)
    for step in range(4):
        for p in (params[0], reference[0]):
            p.grad = torch.full((16,), 0.1 * (step + 1))
        opt.step()
        ref.step()
        assert torch.equal(params[0].detach(), reference[0].detach())
        time.sleep(1.6)  # longer than the idle timeout: the daemon closes the line between steps
    assert opt._step_line is not None and not opt._step_line.gone  # it reconnected, not fell back to gRPC
    assert "idle for 1s, closed" in proc.log()
    opt.close()


def test_a_big_register_leaves_the_daemon_stoppable(spawn):
    """A Register of 1M tensors left a daemon that ignored SIGTERM: at the limit it stops in time."""
    proc = spawn("daemon", "--max-tensors-per-register", "20000", "--shutdown-timeout", "10s")
    channel, stub = proc.stub()
    with channel:
        stub.Register(pb.RegisterRequest(session=attach(stub), groups=[pb.GroupHyperparameters(scalars=SCALARS)],
                                         tensors=[pb.TensorSpec(shape=[4], dtype=F32)] * 20000), timeout=120)
    start = time.monotonic()
    assert proc.stop() == 0
    assert time.monotonic() - start < 25
