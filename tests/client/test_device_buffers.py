"""The CUDA IPC handle the client sends: torch's shareable handle unwrapped to the 64 bytes of a
cudaIpcMemHandle_t. On an H200 with torch 2.11 `_share_cuda_` gave 66 bytes (a version byte, then 'c',
then the handle) and every CUDA session was refused at ShareDeviceBuffers; tests/gpu cover the real
call, these the forms torch writes."""

from __future__ import annotations

import pytest

from stated_client.device_buffers import IPC_HANDLE_BYTES, ipc_handle
from stated_client.errors import FailedPreconditionError

HANDLE = bytes(range(IPC_HANDLE_BYTES))


def test_a_bare_handle_is_sent_as_it_is():
    assert ipc_handle(HANDLE) == HANDLE


def test_a_versioned_cudamalloc_handle_loses_its_two_leading_bytes():
    assert ipc_handle(b"\x02c" + HANDLE) == HANDLE


@pytest.mark.parametrize("shared,words", [
    (b"\x02e" + bytes(40), "expandable segment"),
    (b"\x02c" + bytes(10), "12 bytes"),
    (bytes(65), "65 bytes"),
])
def test_other_forms_are_refused_saying_what_to_change(shared, words):
    with pytest.raises(FailedPreconditionError, match=words) as info:
        ipc_handle(shared)
    assert "PYTORCH_CUDA_ALLOC_CONF" in str(info.value)
