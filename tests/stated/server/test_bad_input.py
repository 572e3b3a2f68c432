"""Bad input, one test per case (DESIGN.md "Isolation and bad input"): every refused request gets the
right gRPC status with a sentence that names the bad field, and the daemon keeps serving everyone else.

Wire-level cases go through a raw stub against a real daemon; the cases a user can reach go through
the client too, which must raise a `stated.StatedError` subclass carrying the daemon's sentence (a
ValueError for INVALID_ARGUMENT), never a raw grpc.RpcError.
"""

from __future__ import annotations

import math
import os
import re
import time
import uuid

import grpc
import pytest
import torch

import stated
from stated.v1 import state_service_pb2 as pb
from stated_client import arena_receiving

F32 = pb.D_TYPE_FLOAT32
SHAPES = ([3, 4], [5])  # two tensors, 17 elements
ADAMW = {"lr": 1e-2, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.0}


def job_name(tag: str = "bad-input") -> str:
    return f"{tag}-{uuid.uuid4().hex[:8]}"


def hp(scalars: dict | None = None, flags: dict | None = None) -> pb.GroupHyperparameters:
    return pb.GroupHyperparameters(scalars=ADAMW if scalars is None else scalars, flags=flags or {})


def specs(shapes=SHAPES, dtype=F32, group: int = 0) -> list[pb.TensorSpec]:
    return [pb.TensorSpec(shape=s, dtype=dtype, group=group) for s in shapes]


@pytest.fixture(scope="module")
def stub(daemon):
    channel, stub = daemon.stub()
    yield stub
    channel.close()


def attach(stub, algorithm: str = "adamw", job: str | None = None, rank: int = 0) -> pb.SessionRef:
    return attach_with_socket(stub, algorithm, job, rank)[0]


def attach_with_socket(stub, algorithm: str = "adamw", job: str | None = None,
                       rank: int = 0) -> tuple[pb.SessionRef, str]:
    """A new session and the step socket its arenas come from."""
    reply = stub.Attach(pb.AttachRequest(job=job or job_name(), rank=rank, algorithm=algorithm, pid=os.getpid()))
    return reply.session, reply.step_socket


def map_arenas(step_socket: str, session: pb.SessionRef, reply: pb.RegisterResponse) -> tuple[torch.Tensor, ...]:
    """The param and grad arenas of the region `reply` announced, received as a client receives them."""
    return arena_receiving.receive(step_socket, session, reply.region, reply.arena_bytes, 10.0)


def registered(stub, algorithm: str = "adamw", group: pb.GroupHyperparameters | None = None) -> pb.SessionRef:
    """A session with SHAPES registered in one group."""
    session = attach(stub, algorithm)
    stub.Register(pb.RegisterRequest(session=session, groups=[group or hp()], tensors=specs()))
    return session


def step(stub, session, number: int, group: pb.GroupHyperparameters | None = None, tensors: int = len(SHAPES)):
    return stub.Step(pb.StepRequest(session=session, step=number, groups=[group or hp()], has_grad=b"\1" * tensors))


def refused(code: grpc.StatusCode, call, *names: str) -> str:
    """Runs `call`, which must fail with `code` and a message containing each of `names`."""
    with pytest.raises(grpc.RpcError) as info:
        result = call()
        if hasattr(result, "__next__"):  # a server stream fails when read
            list(result)
    error = info.value
    assert error.code() == code, f"expected {code.name}, got {error.code().name}: {error.details()}"
    for name in names:
        assert name in error.details(), f"{name!r} not named in {error.details()!r}"
    return error.details()


def errors_counted(daemon, code: str) -> float:
    match = re.search(rf'^stated_request_errors_total\{{code="{code}"\}} (\S+)$', daemon.scrape(), re.M)
    assert match, f"no stated_request_errors_total series for {code}"
    return float(match.group(1))


def assert_serves(stub) -> None:
    """A fresh session attaches, registers, maps its arenas and steps: the daemon really updates params."""
    session, step_socket = attach_with_socket(stub)
    try:
        reply = stub.Register(pb.RegisterRequest(session=session, groups=[hp()], tensors=specs([[8]])))
        params, grads = map_arenas(step_socket, session, reply)
        offset = reply.placements[0].offset_bytes
        p = params[offset: offset + 32].view(torch.float32)
        g = grads[offset: offset + 32].view(torch.float32)
        p.copy_(torch.arange(8, dtype=torch.float32))
        g.fill_(1.0)
        step(stub, session, 1, tensors=1)
        # AdamW's first step moves every element by lr against the gradient's sign.
        torch.testing.assert_close(p, torch.arange(8, dtype=torch.float32) - ADAMW["lr"])
        stats = {s.id: s for s in stub.GetStats(pb.GetStatsRequest(session=session)).sessions}
        assert stats[session.id].steps == 1
    finally:
        stub.Detach(pb.DetachRequest(session=session))


# --- sessions and tokens ---------------------------------------------------------------------------


def test_unknown_session_is_not_found(daemon, stub):
    before = errors_counted(daemon, "NOT_FOUND")
    ghost = pb.SessionRef(id="0123456789abcdef", token=os.urandom(16))
    refused(grpc.StatusCode.NOT_FOUND, lambda: step(stub, ghost, 1), "session 0123456789abcdef")
    assert errors_counted(daemon, "NOT_FOUND") == before + 1
    assert_serves(stub)


def test_detached_session_is_not_found(stub):
    session = registered(stub)
    stub.Detach(pb.DetachRequest(session=session))
    refused(grpc.StatusCode.NOT_FOUND, lambda: step(stub, session, 1), f"session {session.id}")
    refused(grpc.StatusCode.NOT_FOUND, lambda: stub.Detach(pb.DetachRequest(session=session)), session.id)
    assert_serves(stub)


def test_empty_session_id_is_invalid(stub):
    refused(grpc.StatusCode.INVALID_ARGUMENT, lambda: step(stub, pb.SessionRef(), 1), "session.id")
    assert_serves(stub)


def _intrude(stub, rpc: str, ref: pb.SessionRef):
    if rpc == "Step":
        return stub.Step(pb.StepRequest(session=ref, step=3, groups=[hp({"lr": 10.0})], has_grad=b"\1\1\1\1"))
    if rpc == "Register":
        return stub.Register(pb.RegisterRequest(session=ref, groups=[hp()], tensors=specs([[1000]])))
    if rpc == "ExportState":
        return stub.ExportState(pb.ExportStateRequest(session=ref))
    if rpc == "ImportState":  # would zero the victim's state if it got through
        return stub.ImportState(iter([pb.ImportStateRequest(session=ref)]))
    if rpc == "Watch":
        return stub.Watch(pb.WatchRequest(session=ref))
    if rpc == "Detach":
        return stub.Detach(pb.DetachRequest(session=ref))
    raise AssertionError(rpc)


@pytest.mark.parametrize("token", ["random", "empty"])
@pytest.mark.parametrize("rpc", ["Step", "Register", "ExportState", "ImportState", "Watch", "Detach"])
def test_wrong_token_is_denied_and_changes_nothing(daemon, stub, address, rpc, token):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    victim = stated.AdamW(model.parameters(), lr=1e-2, address=address, job=job_name("victim"))
    try:
        for _ in range(2):
            victim.zero_grad()
            model(torch.randn(5, 4)).sum().backward()
            victim.step()
        params = [p.detach().clone() for p in model.parameters()]
        state = victim.state_dict()["state"]
        segments = daemon.segments()
        before = errors_counted(daemon, "PERMISSION_DENIED")

        forged = pb.SessionRef(id=victim.session_id, token=os.urandom(16) if token == "random" else b"")
        refused(grpc.StatusCode.PERMISSION_DENIED, lambda: _intrude(stub, rpc, forged), "session.token",
                victim.session_id)

        assert errors_counted(daemon, "PERMISSION_DENIED") == before + 1
        for p, q in zip(model.parameters(), params):
            assert torch.equal(p.detach(), q)
        stats = {s.id: s for s in stub.GetStats(daemon.everything()).sessions}
        assert stats[victim.session_id].steps == 2 and stats[victim.session_id].tensors == 4
        assert daemon.segments() == segments
        after = victim.state_dict()["state"]
        for index, entry in state.items():
            for key, value in entry.items():
                assert torch.equal(after[index][key], value), f"state[{index}][{key!r}] changed"
        # The victim goes on as if nothing happened.
        victim.zero_grad()
        model(torch.randn(5, 4)).sum().backward()
        victim.step()
        assert not torch.equal(next(model.parameters()).detach(), params[0])
        assert victim.state_dict()["state"][0]["step"].item() == 3.0
    finally:
        victim.close()
    assert_serves(stub)


def test_second_attach_of_live_job_rank_already_exists(stub):
    job = job_name()
    first = attach(stub, job=job, rank=3)
    refused(grpc.StatusCode.ALREADY_EXISTS, lambda: attach(stub, job=job, rank=3), f"job {job!r} rank 3", first.id)
    other_rank = attach(stub, job=job, rank=4)  # another rank of the same job is fine
    stub.Detach(pb.DetachRequest(session=first))
    again = attach(stub, job=job, rank=3)  # and after a detach the (job, rank) is free again
    for s in (other_rank, again):
        stub.Detach(pb.DetachRequest(session=s))
    assert_serves(stub)


def test_second_attach_through_the_client_raises_already_attached(address):
    job = job_name()
    first = stated.AdamW([torch.nn.Parameter(torch.zeros(3))], address=address, job=job, rank=0)
    try:
        with pytest.raises(stated.AlreadyAttachedError, match=f"job '{job}' rank 0 is already attached") as info:
            stated.AdamW([torch.nn.Parameter(torch.zeros(3))], address=address, job=job, rank=0)
        assert isinstance(info.value, stated.StatedError)
    finally:
        first.close()


@pytest.mark.parametrize("algorithm", ["adafactorx", ""])
def test_unknown_algorithm_at_attach(stub, algorithm):
    refused(grpc.StatusCode.INVALID_ARGUMENT, lambda: attach(stub, algorithm=algorithm),
            f"algorithm {algorithm!r} is not known", "adamw")
    assert_serves(stub)


@pytest.mark.parametrize("job", ["", "a/b", "x" * 201])
def test_bad_job_name_at_attach(stub, job):
    refused(grpc.StatusCode.INVALID_ARGUMENT,
            lambda: stub.Attach(pb.AttachRequest(job=job, rank=0, algorithm="adamw", pid=os.getpid())), "job")
    assert_serves(stub)


# --- registration ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype, words", [(pb.D_TYPE_FLOAT64, ("tensors[1].dtype", "float64")),
                                          (pb.D_TYPE_UNSPECIFIED, ("tensors[1].dtype", "unspecified")),
                                          (99, ("tensors[1].dtype", "99"))])
def test_unsupported_dtype_at_register(daemon, stub, dtype, words):
    session = attach(stub)
    segments = daemon.segments()
    tensors = [pb.TensorSpec(shape=[4], dtype=F32), pb.TensorSpec(shape=[4], dtype=dtype)]
    refused(grpc.StatusCode.INVALID_ARGUMENT,
            lambda: stub.Register(pb.RegisterRequest(session=session, groups=[hp()], tensors=tensors)), *words)
    assert daemon.segments() == segments, "a refused Register created arenas"
    stats = {s.id: s for s in stub.GetStats(pb.GetStatsRequest(session=session)).sessions}
    assert stats[session.id].tensors == 0
    stub.Detach(pb.DetachRequest(session=session))
    assert_serves(stub)


def test_empty_groups_at_register(stub):
    session = attach(stub)
    refused(grpc.StatusCode.INVALID_ARGUMENT,
            lambda: stub.Register(pb.RegisterRequest(session=session, groups=[], tensors=specs())), "groups is empty")
    stub.Detach(pb.DetachRequest(session=session))
    assert_serves(stub)


def test_group_without_tensors_at_register(stub):
    session = attach(stub)
    refused(grpc.StatusCode.INVALID_ARGUMENT,
            lambda: stub.Register(pb.RegisterRequest(session=session, groups=[hp(), hp()], tensors=specs())),
            "groups[1] has no tensors")
    stub.Detach(pb.DetachRequest(session=session))
    assert_serves(stub)


def test_empty_tensors_at_register(stub):
    session = attach(stub)
    refused(grpc.StatusCode.INVALID_ARGUMENT,
            lambda: stub.Register(pb.RegisterRequest(session=session, groups=[hp()], tensors=[])), "tensors is empty")
    stub.Detach(pb.DetachRequest(session=session))
    assert_serves(stub)


def test_tensor_group_out_of_range_at_register(stub):
    session = attach(stub)
    refused(grpc.StatusCode.INVALID_ARGUMENT,
            lambda: stub.Register(pb.RegisterRequest(session=session, groups=[hp()], tensors=specs(group=2))),
            "tensors[0].group is 2")
    stub.Detach(pb.DetachRequest(session=session))
    assert_serves(stub)


def test_absurd_shape_at_register_is_resource_exhausted(daemon, stub):
    session = attach(stub)
    segments = daemon.segments()
    tensors = [pb.TensorSpec(shape=[1 << 62, 1 << 62], dtype=F32)]
    refused(grpc.StatusCode.RESOURCE_EXHAUSTED,
            lambda: stub.Register(pb.RegisterRequest(session=session, groups=[hp()], tensors=tensors)),
            "--max-job-bytes")
    assert daemon.segments() == segments
    stub.Detach(pb.DetachRequest(session=session))
    assert_serves(stub)


# --- hyperparameters, at Register and at Step -------------------------------------------------------

BAD_HYPERPARAMETERS = {
    "negative-lr": ("adamw", {**ADAMW, "lr": -1e-3}, {}, ("groups[0].lr", ">= 0", "-0.001")),
    "nan-lr": ("adamw", {**ADAMW, "lr": math.nan}, {}, ("groups[0].lr", "finite")),
    "inf-lr": ("adamw", {**ADAMW, "lr": math.inf}, {}, ("groups[0].lr", "finite")),
    "beta1-one": ("adamw", {**ADAMW, "beta1": 1.0}, {}, ("groups[0].beta1", "[0, 1)")),
    "beta2-negative": ("adamw", {**ADAMW, "beta2": -0.1}, {}, ("groups[0].beta2", "[0, 1)")),
    "negative-eps": ("adamw", {**ADAMW, "eps": -1e-8}, {}, ("groups[0].eps", ">= 0")),
    "negative-weight-decay": ("adamw", {**ADAMW, "weight_decay": -0.01}, {}, ("groups[0].weight_decay", ">= 0")),
    "unknown-name": ("adamw", {**ADAMW, "lr_decay": 0.5}, {}, ("groups[0]", "'lr_decay'")),
    "unknown-flag": ("adamw", ADAMW, {"nesterov": True}, ("groups[0]", "'nesterov'")),
    "sgd-nesterov-without-momentum": ("sgd", {"lr": 0.1, "momentum": 0.0}, {"nesterov": True},
                                      ("groups[0].nesterov", "momentum")),
    "sgd-negative-momentum": ("sgd", {"lr": 0.1, "momentum": -0.5}, {}, ("groups[0].momentum",)),
}
GOOD = {"adamw": hp(), "sgd": hp({"lr": 0.1, "momentum": 0.9})}


@pytest.mark.parametrize("case", sorted(BAD_HYPERPARAMETERS))
def test_bad_hyperparameters_at_register(daemon, stub, case):
    algorithm, scalars, flags, words = BAD_HYPERPARAMETERS[case]
    session = attach(stub, algorithm)
    segments = daemon.segments()
    refused(grpc.StatusCode.INVALID_ARGUMENT, lambda: stub.Register(pb.RegisterRequest(
        session=session, groups=[hp(scalars, flags)], tensors=specs())), *words)
    assert daemon.segments() == segments, "a refused Register created arenas"
    stub.Detach(pb.DetachRequest(session=session))
    assert_serves(stub)


@pytest.mark.parametrize("case", sorted(BAD_HYPERPARAMETERS))
def test_bad_hyperparameters_at_step(stub, case):
    algorithm, scalars, flags, words = BAD_HYPERPARAMETERS[case]
    session = registered(stub, algorithm, GOOD[algorithm])
    step(stub, session, 1, GOOD[algorithm])
    refused(grpc.StatusCode.INVALID_ARGUMENT, lambda: step(stub, session, 2, hp(scalars, flags)), *words)
    # The refused step did not count: step 2 with good hyperparameters follows step 1.
    step(stub, session, 2, GOOD[algorithm])
    stats = {s.id: s for s in stub.GetStats(pb.GetStatsRequest(session=session)).sessions}
    assert stats[session.id].steps == 2
    stub.Detach(pb.DetachRequest(session=session))
    assert_serves(stub)


@pytest.mark.parametrize("algorithm, registered_with, stepped_with", [
    ("adamw", {"amsgrad": False}, {"amsgrad": True}),
    ("adamw", {"amsgrad": True}, {"amsgrad": False}),
    ("sgd", {}, {}),  # momentum 0.9 -> 0 would drop the momentum buffer
])
def test_changing_state_layout_after_registration(stub, algorithm, registered_with, stepped_with):
    first = hp({"lr": 0.1, "momentum": 0.9}, registered_with) if algorithm == "sgd" else hp(ADAMW, registered_with)
    then = hp({"lr": 0.1, "momentum": 0.0}, stepped_with) if algorithm == "sgd" else hp(ADAMW, stepped_with)
    session = registered(stub, algorithm, first)
    step(stub, session, 1, first)
    refused(grpc.StatusCode.INVALID_ARGUMENT, lambda: step(stub, session, 2, then), "groups[0]",
            "amsgrad" if algorithm == "adamw" else "momentum")
    step(stub, session, 2, first)
    stub.Detach(pb.DetachRequest(session=session))
    assert_serves(stub)


# --- steps -----------------------------------------------------------------------------------------


def test_step_before_register_is_failed_precondition(stub):
    session = attach(stub)
    refused(grpc.StatusCode.FAILED_PRECONDITION, lambda: step(stub, session, 1), "Register")
    stub.Register(pb.RegisterRequest(session=session, groups=[hp()], tensors=specs()))
    step(stub, session, 1)  # once registered, the same session steps
    stub.Detach(pb.DetachRequest(session=session))
    assert_serves(stub)


@pytest.mark.parametrize("number", [0, 1, 3])  # before the first, a repeat, a skip
def test_step_numbers_that_do_not_follow(stub, number):
    session = registered(stub)
    step(stub, session, 1)
    refused(grpc.StatusCode.INVALID_ARGUMENT, lambda: step(stub, session, number), f"step is {number}",
            "last step was 1")
    step(stub, session, 2)
    stub.Detach(pb.DetachRequest(session=session))
    assert_serves(stub)


@pytest.mark.parametrize("has_grad", [b"", b"\1", b"\1\1\1"])
def test_has_grad_length_differs_from_tensor_count(stub, has_grad):
    session = registered(stub)
    refused(grpc.StatusCode.INVALID_ARGUMENT, lambda: stub.Step(pb.StepRequest(
        session=session, step=1, groups=[hp()], has_grad=has_grad)), f"has_grad has {len(has_grad)} bytes",
        "2 registered tensors")
    step(stub, session, 1)
    stub.Detach(pb.DetachRequest(session=session))
    assert_serves(stub)


@pytest.mark.parametrize("count", [0, 2])
def test_groups_count_differs_from_registered(stub, count):
    session = registered(stub)
    refused(grpc.StatusCode.INVALID_ARGUMENT, lambda: stub.Step(pb.StepRequest(
        session=session, step=1, groups=[hp()] * count, has_grad=b"\1\1")), f"groups has {count} entries",
        "1 registered param groups")
    step(stub, session, 1)
    stub.Detach(pb.DetachRequest(session=session))
    assert_serves(stub)


# --- state transfer --------------------------------------------------------------------------------


def floats(n: int, start: float = 0.0) -> bytes:
    return torch.arange(start, start + n, dtype=torch.float32).numpy().tobytes()


def import_stream(session, *items):
    yield pb.ImportStateRequest(session=session)
    for item in items:
        if isinstance(item, pb.TensorStateHeader):
            yield pb.ImportStateRequest(header=item)
        else:
            yield pb.ImportStateRequest(chunk=item)


def header(tensor: int = 0, fields=("exp_avg", "exp_avg_sq")) -> pb.TensorStateHeader:
    return pb.TensorStateHeader(tensor=tensor, step=1.0, fields=list(fields))


def chunk(field: str, shape, data: bytes, offset: int = 0, tensor: int = 0) -> pb.StateChunk:
    return pb.StateChunk(tensor=tensor, field=field, dtype=F32, shape=shape, offset=offset, data=data)


def check_import_refused(stub, session, items, *words) -> None:
    refused(grpc.StatusCode.INVALID_ARGUMENT, lambda: stub.ImportState(import_stream(session, *items)), *words)
    # The session is not wedged (its lock was released) and steps on.
    step(stub, session, 2)
    stub.Detach(pb.DetachRequest(session=session))
    assert_serves(stub)


def stepped(stub) -> pb.SessionRef:
    session = registered(stub)
    step(stub, session, 1)
    return session


def test_import_chunk_data_does_not_match_its_shape(stub):
    session = stepped(stub)
    check_import_refused(stub, session, [
        header(), chunk("exp_avg", [3, 4], floats(11)), chunk("exp_avg_sq", [3, 4], floats(12))],
        "field 'exp_avg' of tensor 0", "11 values", "[3, 4]")


def test_import_field_with_wrong_element_count(stub):
    session = stepped(stub)
    check_import_refused(stub, session, [
        header(), chunk("exp_avg", [11], floats(11)), chunk("exp_avg_sq", [3, 4], floats(12))],
        "'exp_avg' of tensor 0", "11 elements", "expected 12")


def test_import_chunk_offset_does_not_follow(stub):
    session = stepped(stub)
    check_import_refused(stub, session, [
        header(), chunk("exp_avg", [3, 4], floats(6)), chunk("exp_avg", [3, 4], floats(6, 6.0), offset=7)],
        "chunk.offset 7", "'exp_avg'", "expected 6")


@pytest.mark.parametrize("index", [2, 1 << 31])
def test_import_header_tensor_out_of_range(stub, index):
    session = stepped(stub)
    check_import_refused(stub, session, [header(index), chunk("exp_avg", [4], floats(4), tensor=index),
                                         chunk("exp_avg_sq", [4], floats(4), tensor=index)],
                         f"header.tensor is {index}", "2 tensors")


def test_import_chunk_of_another_tensor(stub):
    session = stepped(stub)
    check_import_refused(stub, session, [header(0), chunk("exp_avg", [3, 4], floats(12), tensor=1)],
                         "chunk.tensor is 1", "tensor 0")


def test_import_chunk_before_any_header(stub):
    session = stepped(stub)
    check_import_refused(stub, session, [chunk("exp_avg", [3, 4], floats(12))], "header")


def test_import_field_announced_but_never_sent(stub):
    session = stepped(stub)
    check_import_refused(stub, session, [header(), chunk("exp_avg", [3, 4], floats(12))],
                         "tensor 0", "exp_avg_sq")


@pytest.mark.parametrize("bad_step", [-1.0, math.nan])
def test_import_header_with_bad_step(stub, bad_step):
    session = stepped(stub)
    check_import_refused(stub, session, [pb.TensorStateHeader(tensor=0, step=bad_step, fields=[])],
                         "header.step", "tensor 0")


def test_export_chunk_bytes_over_the_limit(stub):
    session = stepped(stub)
    refused(grpc.StatusCode.INVALID_ARGUMENT,
            lambda: stub.ExportState(pb.ExportStateRequest(session=session, chunk_bytes=1 << 30)), "chunk_bytes")
    step(stub, session, 2)
    stub.Detach(pb.DetachRequest(session=session))
    assert_serves(stub)


# --- through the client: StatedError subclasses with the daemon's sentence --------------------------


def no_session_of(daemon, job: str) -> bool:
    channel, stub = daemon.stub()
    with channel:
        return all(s.job != job for s in stub.GetStats(daemon.everything()).sessions)


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))


def assert_client_error(info, cls, *words) -> None:
    error = info.value
    assert isinstance(error, cls) and isinstance(error, stated.StatedError)
    assert not isinstance(error, grpc.RpcError)
    for word in words:
        assert word in str(error), f"{word!r} not in {str(error)!r}"


CLIENT_CASES = {
    "negative-lr": (dict(lr=-1e-3), ("groups[0].lr", ">= 0")),
    "nan-lr": (dict(lr=math.nan), ("groups[0].lr", "finite")),
    "beta1-one": (dict(betas=(1.0, 0.999)), ("groups[0].beta1", "[0, 1)")),
    "beta2-negative": (dict(betas=(0.9, -0.1)), ("groups[0].beta2", "[0, 1)")),
    "negative-eps": (dict(eps=-1.0), ("groups[0].eps",)),
    "negative-weight-decay": (dict(weight_decay=-1.0), ("groups[0].weight_decay",)),
}


@pytest.mark.parametrize("case", sorted(CLIENT_CASES))
def test_client_constructor_with_bad_hyperparameters(daemon, stub, address, case):
    kwargs, words = CLIENT_CASES[case]
    job = job_name("client")
    with pytest.raises(stated.InvalidArgumentError) as info:
        stated.AdamW(model().parameters(), address=address, job=job, **kwargs)
    assert_client_error(info, ValueError, *words)
    # The failed constructor leaves no session behind: the same (job, rank) can attach again at once.
    assert no_session_of(daemon, job)
    stated.AdamW(model().parameters(), address=address, job=job).close()
    assert_serves(stub)


@pytest.mark.parametrize("case", ["negative-lr", "nan-lr", "beta1-one", "beta2-negative"])
def test_client_step_with_bad_hyperparameters(daemon, stub, address, case):
    kwargs, words = CLIENT_CASES[case]
    m = model()
    opt = stated.AdamW(m.parameters(), lr=1e-2, address=address, job=job_name("client"))
    try:
        m(torch.randn(2, 4)).sum().backward()
        before = [p.detach().clone() for p in m.parameters()]
        good = dict(opt.param_groups[0])
        opt.param_groups[0].update(kwargs)
        with pytest.raises(stated.InvalidArgumentError) as info:
            opt.step()
        assert_client_error(info, ValueError, *words)
        assert all(torch.equal(p.detach(), q) for p, q in zip(m.parameters(), before))
        opt.param_groups[0].update(lr=good["lr"], betas=good["betas"])
        opt.step()  # the refused step did not use up a step number
        assert opt.state_dict()["state"][0]["step"].item() == 1.0
    finally:
        opt.close()


def test_client_float64_model(daemon, stub, address):
    job = job_name("client")
    with pytest.raises(stated.InvalidArgumentError) as info:
        stated.AdamW(model().double().parameters(), address=address, job=job)
    assert_client_error(info, ValueError, "float64", "dtype")
    assert no_session_of(daemon, job)
    assert_serves(stub)


def test_client_empty_param_group(daemon, stub, address):
    job = job_name("client")
    with pytest.raises(stated.InvalidArgumentError) as info:
        stated.AdamW([{"params": []}], address=address, job=job)
    assert_client_error(info, ValueError, "tensors is empty")
    assert no_session_of(daemon, job)
    assert_serves(stub)


def test_client_empty_parameter_list(daemon, stub, address):
    job = job_name("client")
    with pytest.raises(ValueError, match="empty parameter list"):  # torch.optim's own check and message
        stated.AdamW([], address=address, job=job)
    assert no_session_of(daemon, job)


def test_client_step_after_close(address):
    m = model()
    opt = stated.AdamW(m.parameters(), address=address, job=job_name("client"))
    opt.close()
    m(torch.randn(2, 4)).sum().backward()
    with pytest.raises(stated.FailedPreconditionError) as info:
        opt.step()
    assert_client_error(info, RuntimeError, "closed", "create a new optimizer")
    with pytest.raises(stated.FailedPreconditionError, match="closed"):
        opt.state_dict()


def test_no_daemon_and_none_may_start(monkeypatch, tmp_path):
    nowhere = tmp_path / "nothing-listens-here.sock"
    monkeypatch.setenv("STATED_EMBEDDED", "0")
    monkeypatch.setenv("STATED_ADDRESS", str(nowhere))
    start = time.monotonic()
    with pytest.raises(stated.DaemonUnavailableError) as info:
        stated.AdamW(model().parameters())
    assert time.monotonic() - start < 10
    error = info.value
    assert isinstance(error, stated.StatedError) and isinstance(error, ConnectionError)
    assert str(nowhere) in str(error) and "STATED_EMBEDDED=0" in str(error)
    assert error.__cause__ is None and not isinstance(error.__context__, grpc.RpcError)
    # The same with the address given explicitly.
    with pytest.raises(stated.DaemonUnavailableError, match=re.escape(str(nowhere))):
        stated.SGD(model().parameters(), lr=0.1, address=f"unix://{nowhere}")
    assert not nowhere.exists()
