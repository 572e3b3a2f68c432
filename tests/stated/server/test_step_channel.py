"""The step channel (stated.server.step_channel) against a real daemon, over a real unix socket.

Each refusal names what was wrong, a refused step leaves the channel and the session serving, a broken
frame closes only that connection, steps over the channel and over gRPC are the same steps, a channel
step and a gRPC export of the same session take turns (one session lock, stated.server.session_lock), and a
daemon stops promptly with connections open.
"""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest
import torch

import stated
from stated.server.step_channel import STOP_SECONDS
from stated_client.protocol import ERROR, HEADER, MAX_FRAME_BYTES, MESSAGE, frame, parse_error
from stated.v1 import state_service_pb2 as pb
from stated_client import arenas

from test_bad_input import attach, errors_counted, hp, registered, specs, step, stub  # noqa: F401 (fixtures)
from test_bad_input import attach_with_socket, map_arenas


class Raw:
    """A hand-driven channel connection."""

    def __init__(self, path: str):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(path)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def receive(self) -> tuple[int, bytes]:
        header = self._exactly(HEADER.size)
        length, kind = HEADER.unpack(header)
        return kind, self._exactly(length)

    def closed(self) -> bool:
        return self.sock.recv(1) == b""

    def _exactly(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            assert chunk, "the daemon closed the channel"
            data += chunk
        return data


def step_request(number: int, tensors: int = 2) -> pb.StepRequest:
    return pb.StepRequest(step=number, groups=[hp()], has_grad=b"\1" * tensors)


def hello(daemon, session) -> Raw:
    raw = Raw(daemon.socket + ".step")
    raw.send(frame(MESSAGE, session.SerializeToString()))
    assert raw.receive() == (MESSAGE, b"")
    return raw


def error_of(raw: Raw) -> tuple[str, str]:
    kind, payload = raw.receive()
    assert kind == ERROR, f"expected an error frame, got {payload!r}"
    return parse_error(payload)


def test_steps_over_the_channel_and_grpc_interleave(daemon, stub):  # noqa: F811
    session = registered(stub)
    raw = hello(daemon, session)
    raw.send(frame(MESSAGE, step_request(1).SerializeToString()))
    kind, payload = raw.receive()
    assert kind == MESSAGE and pb.StepResponse.FromString(payload).tensors_updated == 2
    step(stub, session, 2)  # the same session over gRPC, then the channel again
    raw.send(frame(MESSAGE, step_request(3).SerializeToString()))
    assert pb.StepResponse.FromString(raw.receive()[1]).tensors_updated == 2


def test_wrong_token_is_refused_and_closed(daemon, stub):  # noqa: F811
    session = registered(stub)
    before = errors_counted(daemon, "PERMISSION_DENIED")
    raw = Raw(daemon.socket + ".step")
    raw.send(frame(MESSAGE, pb.SessionRef(id=session.id, token=b"\0" * 16).SerializeToString()))
    code, message = error_of(raw)
    assert code == "PERMISSION_DENIED" and "token" in message
    assert raw.closed()
    assert errors_counted(daemon, "PERMISSION_DENIED") == before + 1  # counted as a gRPC refusal is
    step(stub, session, 1)


def test_refused_step_keeps_the_channel(daemon, stub):  # noqa: F811
    session = registered(stub)
    raw = hello(daemon, session)
    before = errors_counted(daemon, "INVALID_ARGUMENT")
    raw.send(frame(MESSAGE, step_request(5).SerializeToString()))
    code, message = error_of(raw)
    assert code == "INVALID_ARGUMENT" and "step is 5" in message
    raw.send(frame(MESSAGE, step_request(1, tensors=1).SerializeToString()))
    code, message = error_of(raw)
    assert code == "INVALID_ARGUMENT" and "has_grad" in message
    assert errors_counted(daemon, "INVALID_ARGUMENT") == before + 2
    raw.send(frame(MESSAGE, step_request(1).SerializeToString()))
    assert raw.receive()[0] == MESSAGE


@pytest.mark.parametrize("data,words", [
    (HEADER.pack(4, 7) + b"abcd", "kind 7"),
    (HEADER.pack(MAX_FRAME_BYTES + 1, MESSAGE), "over the limit"),
    (frame(MESSAGE, b"\xff\xff\xff"), "not a StepRequest"),
])
def test_broken_frames_close_only_that_connection(daemon, stub, data, words):  # noqa: F811
    session = registered(stub)
    raw = hello(daemon, session)
    raw.send(data)
    code, message = error_of(raw)
    assert code == "INVALID_ARGUMENT" and words in message
    assert raw.closed()
    other = hello(daemon, session)  # the session and the daemon serve on
    other.send(frame(MESSAGE, step_request(1).SerializeToString()))
    assert other.receive()[0] == MESSAGE


def test_the_client_uses_the_channel_and_can_turn_it_off(address, monkeypatch):
    def run(channel_on: bool):
        monkeypatch.setenv("STATED_STEP_CHANNEL", "1" if channel_on else "0")
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(64))
        opt = stated.AdamW([p], lr=1e-2, address=address)
        assert (opt._step_line is not None) == channel_on
        for _ in range(5):
            p.grad = torch.sin(p.detach())
            opt.step()
        opt.close()
        return p.detach()

    assert torch.equal(run(True), run(False))


def test_a_socket_path_too_long_for_the_step_socket_is_refused_at_start(tmp_path):
    """The step socket's path is 5 bytes longer than the gRPC socket's; when only the latter fits in a unix
    socket address the daemon refuses to start (trainers receive their arenas over the step socket),
    saying how long --socket may be, and leaves nothing behind."""
    from support.daemon import DaemonProcess

    base = str(tmp_path / "d")
    padding = 105 - len(base + "/run/stated.sock")  # the gRPC socket 105 bytes, the channel's 110
    assert padding > 0, "tmp_path is too long for this test"
    directory = tmp_path / ("d" + "x" * padding)
    directory.mkdir()
    proc = DaemonProcess(directory)
    assert len(proc.socket) == 105
    with pytest.raises(RuntimeError, match="daemon exited with 1"):
        proc.start()
    proc.stop()
    assert (f"the step socket {proc.socket}.step is longer than a unix socket path may be (107 bytes), and "
            f"trainers receive their arenas over it; give --socket a path of at most 102 bytes") in proc.log()
    assert not os.path.exists(proc.socket)


def test_a_garbage_frame_closes_its_connection_while_another_of_the_session_steps(daemon, stub):  # noqa: F811
    session = registered(stub)
    good, bad = hello(daemon, session), hello(daemon, session)
    good.send(frame(MESSAGE, step_request(1).SerializeToString()))
    assert good.receive()[0] == MESSAGE
    bad.send(b"\xde\xad\xbe\xef" * 4)  # frame kind 0xde, and bytes the daemon never reads
    code, message = error_of(bad)
    assert code == "INVALID_ARGUMENT" and "kind 222" in message
    assert bad.closed()
    for number in (2, 3):
        good.send(frame(MESSAGE, step_request(number).SerializeToString()))
        assert pb.StepResponse.FromString(good.receive()[1]).tensors_updated == 2
    step(stub, session, 4)


# --- a channel step and a gRPC export of the same session ------------------------------------------

ELEMENTS = (1 << 16, 3 << 14)  # several export chunks per field, so an export takes a while
STEPS = 20


def mapped(stub) -> tuple[pb.SessionRef, list[torch.Tensor]]:  # noqa: F811
    """A session with ELEMENTS registered, its parameters and (fixed) gradients written; the arenas are
    returned to keep them mapped."""
    session, step_socket = attach_with_socket(stub)
    reply = stub.Register(pb.RegisterRequest(session=session, groups=[hp()], tensors=specs([[n] for n in ELEMENTS])))
    params, grads = map_arenas(step_socket, session, reply)
    for placement in reply.placements:
        n = ELEMENTS[placement.index]
        like = torch.empty(n, dtype=torch.float32)
        arenas.view(params, placement.offset_bytes, like).copy_(torch.linspace(-1, 1, n))
        arenas.view(grads, placement.offset_bytes, like).copy_(torch.cos(torch.arange(n) * 0.01 + placement.index))
    return session, [params, grads]


def exported(stub, session) -> dict[int, tuple[float, dict[str, bytes]]]:  # noqa: F811
    """ExportState as {tensor: (step, {field: bytes})}."""
    state: dict[int, tuple[float, dict[str, bytearray]]] = {}
    for reply in stub.ExportState(pb.ExportStateRequest(session=session)):
        if reply.WhichOneof("item") == "header":
            state[reply.header.tensor] = (reply.header.step, {})
        else:
            state[reply.chunk.tensor][1].setdefault(reply.chunk.field, bytearray()).extend(reply.chunk.data)
    return {t: (s, {f: bytes(v) for f, v in fields.items()}) for t, (s, fields) in state.items()}


def test_a_channel_step_and_a_grpc_export_of_the_session_take_turns(daemon, stub):  # noqa: F811
    """Exports taken while the channel steps are each the whole state after some step: all tensors at
    the same step, equal to a second session's state after as many steps taken one after another."""
    reference_session, reference_arenas = mapped(stub)
    reference = {0: exported(stub, reference_session)}
    for number in range(1, STEPS + 1):
        step(stub, reference_session, number)
        reference[number] = exported(stub, reference_session)

    session, session_arenas = mapped(stub)
    raw = hello(daemon, session)
    failure: list[BaseException] = []

    def steps():
        try:
            for number in range(1, STEPS + 1):
                raw.send(frame(MESSAGE, step_request(number).SerializeToString()))
                kind, _ = raw.receive()
                assert kind == MESSAGE
        except BaseException as exc:  # noqa: BLE001 - reported by the test's thread
            failure.append(exc)

    stepper = threading.Thread(target=steps)
    stepper.start()
    exports = []
    while stepper.is_alive():
        exports.append(exported(stub, session))
    stepper.join()
    assert not failure, failure
    exports.append(exported(stub, session))

    for state in exports:
        numbers = {s for s, _ in state.values()}
        assert len(numbers) <= 1, f"an export mixes tensors at steps {sorted(numbers)}"
        number = int(numbers.pop()) if numbers else 0
        assert state == reference[number], f"an export at step {number} is not the state after step {number}"
    assert exports[-1] == reference[STEPS]
    assert torch.equal(session_arenas[0], reference_arenas[0]), "the parameters differ"


# --- stopping ----------------------------------------------------------------------------------------

def test_the_daemon_stops_promptly_with_channel_connections_open(tmp_path):
    from support.daemon import DaemonProcess

    proc = DaemonProcess(tmp_path / "d")
    proc.start()
    try:
        channel, grpc_stub = proc.stub()
        session = registered(grpc_stub)
        channel.close()
        stepping = hello(proc, session)
        stepping.send(frame(MESSAGE, step_request(1).SerializeToString()))
        assert stepping.receive()[0] == MESSAGE
        silent = Raw(proc.socket + ".step")  # connected, never says hello
        started = time.monotonic()
        assert proc.stop() == 0
        elapsed = time.monotonic() - started
    finally:
        proc.stop()
    assert elapsed < STOP_SECONDS - 1, f"the daemon took {elapsed:.1f} s to stop"
    assert stepping.closed() and silent.closed()
    assert not os.path.exists(proc.socket + ".step") and not os.path.exists(proc.socket)
    assert proc.leaked_segments() == []
    assert "Traceback" not in proc.log() and "still open" not in proc.log()
