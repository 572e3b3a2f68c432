"""Bad input on the CUDA path, against a real daemon on this machine (which has no CuPy or GPU).

A client that names a CUDA device on a daemon that cannot serve one is told why and how to fix it; a
ShareDeviceBuffers call that does not fit the session's regions is refused naming the field; in every
case the session keeps serving CPU steps.
"""

from __future__ import annotations

import importlib.util

import grpc
import pytest

from stated.v1 import state_service_pb2 as pb

from test_bad_input import attach, hp, refused, registered, specs, step, stub  # noqa: F401 (fixture)

UUID = "GPU-8a2f0c3e-1b4d-4e5f-9a6b-7c8d9e0f1a2b"
HANDLE = bytes(64)


def ipc(size: int = 1 << 20, handle: bytes = HANDLE) -> pb.CudaIpcBuffer:
    return pb.CudaIpcBuffer(handle=handle, offset_bytes=0, size_bytes=size)


@pytest.mark.skipif(importlib.util.find_spec("cupy") is not None, reason="this daemon could serve CUDA")
def test_cuda_device_on_a_daemon_without_cuda(stub):  # noqa: F811
    session = attach(stub)
    details = refused(grpc.StatusCode.FAILED_PRECONDITION,
                      lambda: stub.Register(pb.RegisterRequest(session=session, groups=[hp()], tensors=specs(),
                                                               device=UUID)), "CUDA")
    assert "stated[cuda]" in details or "cupy" in details.lower(), details
    # Nothing was registered: the same session registers CPU tensors and steps.
    stub.Register(pb.RegisterRequest(session=session, groups=[hp()], tensors=specs()))
    step(stub, session, 1)


@pytest.mark.parametrize("device", ["GPU-../../etc", "cuda:0 ; rm", "x" * 65])
def test_malformed_device_is_refused(stub, device):  # noqa: F811
    session = attach(stub)
    refused(grpc.StatusCode.INVALID_ARGUMENT,
            lambda: stub.Register(pb.RegisterRequest(session=session, groups=[hp()], tensors=specs(), device=device)),
            "device")


def test_share_device_buffers_on_a_shared_memory_region(stub):  # noqa: F811
    session = registered(stub)
    refused(grpc.StatusCode.INVALID_ARGUMENT,
            lambda: stub.ShareDeviceBuffers(pb.ShareDeviceBuffersRequest(
                session=session, region=0, device=UUID, params=ipc(), grads=ipc())), "region 0", "shared memory")
    step(stub, session, 1)


def test_share_device_buffers_for_a_region_that_does_not_exist(stub):  # noqa: F811
    session = registered(stub)
    refused(grpc.StatusCode.INVALID_ARGUMENT,
            lambda: stub.ShareDeviceBuffers(pb.ShareDeviceBuffersRequest(
                session=session, region=3, device=UUID, params=ipc(), grads=ipc())), "region is 3")
    step(stub, session, 1)


def test_share_device_buffers_needs_the_session_token(stub):  # noqa: F811
    session = registered(stub)
    forged = pb.SessionRef(id=session.id, token=b"\0" * len(session.token))
    refused(grpc.StatusCode.PERMISSION_DENIED,
            lambda: stub.ShareDeviceBuffers(pb.ShareDeviceBuffersRequest(
                session=forged, region=0, device=UUID, params=ipc(), grads=ipc())), "token")
    step(stub, session, 1)
