"""Every request validated (issue 12, item 3), on the real daemon: a message that does not decode, an
ImportState stream with a corrupt chunk, hyperparameters beyond float32 and empty tensors each get a
refusal that names what was wrong (INVALID_ARGUMENT), never UNKNOWN, INTERNAL or a traceback, or behave
as the reference does; a bystander job keeps stepping meanwhile, exact against torch.optim.AdamW.
"""

from __future__ import annotations

import logging
import os

import grpc
import pytest
import torch

import stated
from stated.server.decoding import WarningBudget
from stated.v1 import state_service_pb2 as pb
from support.abuse import ADAMW, SERVICE, Bystander, gradients, initial, raw_call, run, unique

# Bytes that are no protobuf message: a field tag whose varint never ends.
GARBAGE = b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff"
def refused(code: grpc.StatusCode, call, *words: str) -> str:
    with pytest.raises(grpc.RpcError) as info:
        result = call()
        if hasattr(result, "__next__"):
            list(result)
    assert info.value.code() == code, f"expected {code.name}, got {info.value.code().name}: {info.value.details()}"
    for word in words:
        assert word in info.value.details(), (word, info.value.details())
    return info.value.details()


def assert_no_traceback(proc) -> None:
    log = proc.log()
    for sign in ("Traceback", "INTERNAL", "Unexpected", "Task exception was never retrieved"):
        assert sign not in log, log[-4000:]


# --- 1. undecodable messages -----------------------------------------------------------------------


def test_an_undecodable_message_is_invalid_argument_for_every_method_without_a_traceback(spawn):
    proc = spawn("daemon")
    bystander = Bystander(proc)
    channel, stub = proc.stub()
    with channel:
        for method in SERVICE.methods:
            bystander.step()
            for payload in (GARBAGE, b"\x0a\x05ab"):  # the second: a field 5 bytes long cut after 2
                refused(grpc.StatusCode.INVALID_ARGUMENT, lambda: raw_call(channel, method)(payload),
                        f"/stated.v1.StateService/{method.name}", "could not be decoded",
                        method.input_type.full_name)
        # A streamed ImportState whose second message does not decode is refused when it arrives.
        session = stub.Attach(pb.AttachRequest(job=unique("import"), algorithm="adamw", pid=os.getpid())).session
        good = pb.ImportStateRequest(session=session).SerializeToString()
        call = channel.stream_unary(f"/{SERVICE.full_name}/ImportState", request_serializer=None,
                                    response_deserializer=None)
        refused(grpc.StatusCode.INVALID_ARGUMENT, lambda: call(iter([good, GARBAGE]), timeout=10),
                "ImportState", "could not be decoded")
        health = channel.unary_unary("/grpc.health.v1.Health/Check", request_serializer=None,
                                     response_deserializer=None)
        refused(grpc.StatusCode.INVALID_ARGUMENT, lambda: health(GARBAGE, timeout=10), "Health/Check")
        stub.Detach(pb.DetachRequest(session=session))
    bystander.step()
    bystander.close()
    assert_no_traceback(proc)
    warnings = [line for line in proc.log().splitlines() if "could not be decoded" in line]
    # One line per refused request up to the warning budget (10 a minute), the rest only counted.
    assert len(warnings) == min(2 * len(SERVICE.methods) + 2, WarningBudget().lines), warnings
    counted = proc.samples()[("stated_request_errors_total", (("code", "INVALID_ARGUMENT"),))]
    assert counted == 2 * len(SERVICE.methods) + 2


def test_undecodable_request_warnings_are_rate_limited_and_the_rest_summed_up(caplog):
    now = [0.0]
    budget = WarningBudget(lines=3, seconds=60.0, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="stated.server.decoding"):
        for i in range(10):
            budget.warn(f"bad {i}")
        now[0] = 61.0
        budget.warn("bad after a minute")
    lines = [r.getMessage() for r in caplog.records]
    assert lines[:3] == ["bad 0", "bad 1", "bad 2"]
    assert "7 more undecodable requests in the last 60 s" in lines[3] and lines[4] == "bad after a minute"
    assert len(lines) == 5


# --- 2. ImportState with a corrupt chunk -------------------------------------------------------------

F32, F64 = pb.D_TYPE_FLOAT32, pb.D_TYPE_FLOAT64
SHAPE = [3, 4]


def floats(n: int, dtype=torch.float32) -> bytes:
    return torch.arange(1.0, n + 1.0, dtype=dtype).numpy().tobytes()


def chunk(field: str, data: bytes, shape=SHAPE, offset: int = 0, dtype=F32) -> pb.ImportStateRequest:
    return pb.ImportStateRequest(chunk=pb.StateChunk(tensor=0, field=field, dtype=dtype, shape=shape, offset=offset,
                                                     data=data))


def header(step: float = 3.0, fields=("exp_avg", "exp_avg_sq")) -> pb.ImportStateRequest:
    return pb.ImportStateRequest(header=pb.TensorStateHeader(tensor=0, step=step, fields=list(fields)))


def moments(shape=SHAPE, data=None) -> list[pb.ImportStateRequest]:
    data = data or floats(12)
    return [chunk("exp_avg", data, shape), chunk("exp_avg_sq", data, shape)]


CORRUPT_STREAMS = {
    "a size beyond int64 in an empty field": ([header(fields=("exp_avg",)), chunk("exp_avg", b"", [0, 1 << 63])],
                                              ("chunk.shape [0, 9223372036854775808]", "above")),
    "a dtype that changes mid-field": ([header(), chunk("exp_avg", floats(6)),
                                        chunk("exp_avg", floats(6, torch.float64), offset=6, dtype=F64),
                                        chunk("exp_avg_sq", floats(12))],
                                       ("field 'exp_avg'", "first chunk", "must agree")),
    "a shape that changes mid-field": ([header(), chunk("exp_avg", floats(6)), chunk("exp_avg", floats(6), [4, 3], 6),
                                        chunk("exp_avg_sq", floats(12))], ("[4, 3]", "must agree")),
    "a step beyond float32": ([header(step=1e300), *moments()], ("header.step", "1e+300", "float32")),
    "a step field of three values": ([header(fields=("exp_avg", "exp_avg_sq", "step")), *moments(),
                                      chunk("step", floats(3), [3])], ("header.fields of tensor 0", "'step'")),
    "half a float": ([header(), chunk("exp_avg", floats(12)[:-2]), chunk("exp_avg_sq", floats(12))],
                     ("field 'exp_avg' of tensor 0",)),
}


def exported(stub, session) -> list[bytes]:
    return [m.SerializeToString() for m in stub.ExportState(pb.ExportStateRequest(session=session))]


def test_import_state_with_a_corrupt_chunk_is_invalid_argument_and_changes_nothing(spawn):
    proc = spawn("daemon")
    bystander = Bystander(proc)
    channel, stub = proc.stub()
    with channel:
        session = stub.Attach(pb.AttachRequest(job=unique("import"), algorithm="adamw", pid=os.getpid())).session
        group = pb.GroupHyperparameters(scalars={"lr": 1e-2, "weight_decay": 0.0})
        stub.Register(pb.RegisterRequest(session=session, groups=[group], tensors=[pb.TensorSpec(shape=SHAPE, dtype=F32)]))
        start = pb.ImportStateRequest(session=session)
        assert stub.ImportState(iter([start, header(), *moments()])).tensors == 1
        before = exported(stub, session)
        for case, (items, words) in CORRUPT_STREAMS.items():
            bystander.step()
            details = refused(grpc.StatusCode.INVALID_ARGUMENT, lambda: stub.ImportState(iter([start, *items])), *words)
            assert exported(stub, session) == before, f"{case}: the refused import changed the state ({details})"
        # The session is whole: it steps on from the imported state.
        stub.Step(pb.StepRequest(session=session, step=1, groups=[group], has_grad=b"\1"))
        stub.Detach(pb.DetachRequest(session=session))
    bystander.step()
    bystander.close()
    assert_no_traceback(proc)


# --- 3. hyperparameters beyond float32 ---------------------------------------------------------------

ABOVE = "above float32's largest finite value"
# name: (stated class, kwargs a run needs, {bad kwargs: words of the refusal})
OVERFLOWS = {
    "adamw": (stated.AdamW, {}, {
        (("lr", 1e300),): ("groups[0].lr is 1e+300", ABOVE),
        (("weight_decay", 1e300),): ("groups[0].weight_decay is 1e+300", ABOVE),
        (("eps", -1e300),): ("groups[0].eps",),
        (("lr", 1e20), ("weight_decay", 1e20)): ("groups[0]: lr * weight_decay is 1e+40", ABOVE),
        (("lr", 1e36), ("betas", (0.9999, 0.999))): ("groups[0]: lr / (1 - beta1)", ABOVE),
    }),
    "adam": (stated.Adam, {}, {
        (("lr", 1e300),): ("groups[0].lr is 1e+300", ABOVE),
        (("lr", 1e36), ("betas", (0.9999, 0.999))): ("lr / (1 - beta1)", ABOVE),
    }),
    "sgd": (stated.SGD, {"momentum": 0.9}, {
        (("lr", 1e300),): ("groups[0].lr is 1e+300", ABOVE),
        (("momentum", 1e300),): ("groups[0].momentum is 1e+300", ABOVE),
        (("dampening", -1e300),): ("groups[0].dampening is -1e+300", ABOVE),
        (("weight_decay", 1e300),): ("groups[0].weight_decay is 1e+300", ABOVE),
    }),
    "adafactor": (stated.Adafactor, {}, {
        (("weight_decay", 1e300),): ("groups[0].weight_decay is 1e+300", ABOVE),
        (("lr", 1e20), ("weight_decay", 1e20)): ("lr * weight_decay is 1e+40", ABOVE),
        (("eps", (1e20, 1e-3)),): ("groups[0]: eps1 * eps1 is 1e+40", ABOVE),
    }),
    "lion": (stated.Lion, {}, {
        (("lr", 1e300),): ("groups[0].lr is 1e+300", ABOVE),
        (("lr", 1e20), ("weight_decay", 1e20)): ("lr * weight_decay is 1e+40", ABOVE),
    }),
    "came": (stated.CAME, {"lr": 1e-3}, {
        (("lr", 1e300),): ("groups[0].lr is 1e+300", ABOVE),
        (("eps", (1e300, 1e-16)),): ("groups[0].eps1 is 1e+300", ABOVE),
        (("lr", 1e20), ("weight_decay", 1e20)): ("lr * weight_decay is 1e+40", ABOVE),
    }),
    "adamw8bit": (stated.AdamW8bit, {}, {
        (("lr", 1e300),): ("groups[0].lr is 1e+300", ABOVE),
        (("lr", 1e20), ("weight_decay", 1e20)): ("lr * weight_decay is 1e+40", ABOVE),
    }),
    "slimadam": (stated.SlimAdam, {"lr": 1e-3, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1}, {
        (("weight_decay", 1e300),): ("groups[0].weight_decay is 1e+300", ABOVE),
        (("lr", 1e20), ("weight_decay", 1e20)): ("lr * weight_decay is 1e+40", ABOVE),
    }),
}


def test_hyperparameters_beyond_float32_are_refused_at_register_and_at_step_for_every_algorithm(spawn):
    proc = spawn("daemon")
    bystander = Bystander(proc)
    for name, (cls, needs, cases) in OVERFLOWS.items():
        for bad, words in cases.items():
            bystander.step()
            params = [torch.nn.Parameter(v) for v in initial([(4, 3), (5,)])]
            with pytest.raises(stated.InvalidArgumentError) as info:
                opt = cls(params, address=proc.address, job=unique(name), **{**needs, **dict(bad)})
                run(opt, params, 1, 1)
            for word in words:
                assert word in str(info.value), (name, bad, str(info.value))
            # At a step: the group changes after a good first step; the refused step changes nothing.
            opt = cls(params, address=proc.address, job=unique(name), **needs)
            run(opt, params, 1, 1)
            good = dict(opt.param_groups[0])
            before = [p.detach().clone() for p in params]
            opt.param_groups[0].update(dict(bad))
            with pytest.raises(stated.InvalidArgumentError) as info:
                run(opt, params, 2, 2)
            assert all(word in str(info.value) for word in words), (name, bad, str(info.value))
            assert all(torch.equal(p.detach(), q) for p, q in zip(params, before)), (name, bad)
            opt.param_groups[0].update(good)
            run(opt, params, 2, 2)
            opt.close()
    bystander.step()
    bystander.close()
    assert_no_traceback(proc)


# The reference on the same values: torch.optim raises, or writes non-finite weights, where stated refuses.
TORCH_OVERFLOWS = {
    "adamw lr": (torch.optim.AdamW, dict(lr=1e300)),
    "adamw weight_decay": (torch.optim.AdamW, dict(weight_decay=1e300)),
    "adamw lr * weight_decay": (torch.optim.AdamW, dict(lr=1e20, weight_decay=1e20)),
    "sgd lr": (torch.optim.SGD, dict(lr=1e300)),
    "sgd weight_decay": (torch.optim.SGD, dict(lr=0.1, weight_decay=1e300)),
    "adafactor weight_decay": (torch.optim.Adafactor, dict(weight_decay=1e300)),
}


@pytest.mark.parametrize("case", sorted(TORCH_OVERFLOWS))
def test_the_reference_cannot_step_with_what_is_refused(case):
    cls, kwargs = TORCH_OVERFLOWS[case]
    params = [torch.nn.Parameter(v) for v in initial([(4, 3), (5,)])]
    opt = cls(params, **kwargs)
    try:
        run(opt, params, 1, 1)
    except RuntimeError as exc:
        assert "overflow" in str(exc)
        return
    assert not all(torch.isfinite(p).all() for p in params), "torch stepped to finite weights"


# --- 4. empty tensors --------------------------------------------------------------------------------

EMPTY, NORMAL = (0, 5), (4, 3)


def references():
    lion = pytest.importorskip("lion_pytorch")
    came = pytest.importorskip("came_pytorch")
    torchao = pytest.importorskip("torchao.optim")
    # name: (stated class, reference class, kwargs, (rtol, atol) as in tests/kernels)
    return {
        "adamw": (stated.AdamW, lambda p, **k: torch.optim.AdamW(p, fused=True, **k), ADAMW, (0.0, 0.0)),
        "adam": (stated.Adam, lambda p, **k: torch.optim.Adam(p, fused=True, **k), dict(lr=1e-2, weight_decay=0.1),
                 (0.0, 0.0)),
        "sgd": (stated.SGD, torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=0.01), (0.0, 0.0)),
        "adafactor": (stated.Adafactor, torch.optim.Adafactor, dict(lr=1e-2, weight_decay=0.1), (0.0, 0.0)),
        "lion": (stated.Lion, lion.Lion, dict(lr=1e-3, weight_decay=0.1), (0.0, 0.0)),
        "came": (stated.CAME, came.CAME, dict(lr=2e-4, weight_decay=1e-2), (0.0, 1e-6)),
        "adamw8bit": (stated.AdamW8bit, torchao.AdamW8bit, dict(lr=1e-2, weight_decay=0.1), (0.0, 0.0)),
        # SlimAdam compresses no unnamed tensor: plain AdamW's update, an ulp or two apart per step.
        "slimadam": (stated.SlimAdam, torch.optim.AdamW, dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1),
                     (1e-6, 1e-6)),
    }


@pytest.mark.parametrize("name", ["adamw", "adam", "sgd", "adafactor", "lion", "came", "adamw8bit", "slimadam"])
def test_an_empty_tensor_steps_as_a_no_op_beside_a_normal_one(spawn, name):
    ours_cls, ref_cls, kwargs, (rtol, atol) = references()[name]
    proc = spawn("daemon")
    bystander = Bystander(proc)
    ours = [torch.nn.Parameter(v) for v in initial([EMPTY, NORMAL])]
    theirs = [torch.nn.Parameter(ours[1].detach().clone())]
    opt = ours_cls(ours, address=proc.address, job=unique(name), **kwargs)
    reference = ref_cls(theirs, **kwargs)
    for step in range(1, 6):
        bystander.step()
        run(opt, ours, step, step)
        grads = gradients([EMPTY, NORMAL], step)
        theirs[0].grad = grads[1]
        reference.step()
        torch.testing.assert_close(ours[1].detach(), theirs[0].detach(), rtol=rtol, atol=atol)
    assert ours[0].shape == EMPTY
    state = opt.state_dict()["state"]
    for key, value in state.get(0, {}).items():
        assert torch.isfinite(value.float()).all(), (name, key, value)
    opt.close()
    bystander.close()
    assert_no_traceback(proc)


def test_the_reference_adafactor_divides_by_zero_on_an_empty_tensor():
    """Why stated's Adafactor defines the empty tensor's step (a no-op) rather than follow torch's."""
    params = [torch.nn.Parameter(torch.empty(EMPTY))]
    params[0].grad = torch.empty(EMPTY)
    with pytest.raises(ZeroDivisionError):
        torch.optim.Adafactor(params).step()
