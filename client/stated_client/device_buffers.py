"""The client's side of CUDA parameters: one flat parameter and one flat gradient buffer per region,
allocated on the parameters' device and shared with the daemon through CUDA IPC once, at registration.

The daemon lays the region out (RegisterResponse placements, the same byte offsets as a shared-memory
arena); the client allocates the two buffers with torch, makes every parameter a view of the first, and
sends the IPC handle of each buffer's cudaMalloc block with the buffer's offset inside it
(`torch.UntypedStorage._share_cuda_`). The buffers must live as long as the session: the optimizer
holds them.
"""

from __future__ import annotations

import torch

from stated.v1 import state_service_pb2 as pb
from stated_client.errors import FailedPreconditionError

IPC_HANDLE_BYTES = 64  # sizeof(cudaIpcMemHandle_t), what the daemon opens with cudaIpcOpenMemHandle


def device_uuid(device: torch.device) -> str:
    """The device's UUID as the daemon matches it: the same GPU whatever CUDA_VISIBLE_DEVICES says."""
    uuid = str(torch.cuda.get_device_properties(device).uuid)
    return uuid.removeprefix("GPU-")


def allocate(nbytes: int, device: torch.device) -> torch.Tensor:
    """A flat uint8 buffer of `nbytes` on `device`, zeroed (padding between tensors stays zero)."""
    return torch.zeros(max(nbytes, 1), dtype=torch.uint8, device=device)


def ipc_buffer(buffer: torch.Tensor) -> pb.CudaIpcBuffer:
    """The CUDA IPC description of `buffer`: its block's handle and where it starts in the block."""
    storage = buffer.untyped_storage()
    shared = storage._share_cuda_()
    # (device, handle, storage size, storage offset in the block, ref counter handle, ref counter
    # offset, event handle, event sync required): the first four are what the daemon needs.
    handle, size, offset = shared[1], int(shared[2]), int(shared[3])
    start = offset + buffer.storage_offset() * buffer.element_size()
    return pb.CudaIpcBuffer(handle=ipc_handle(bytes(handle)), offset_bytes=start,
                            size_bytes=size - buffer.storage_offset() * buffer.element_size())


def ipc_handle(shared: bytes) -> bytes:
    """The cudaIpcMemHandle_t inside what `_share_cuda_` gives: newer torch (2.11 was seen on an H200)
    puts a version byte and a type byte before it ('c': a cudaMalloc block; 'e': an expandable
    segment, which has no such handle); older torch gives the handle alone."""
    if len(shared) == IPC_HANDLE_BYTES:
        return shared
    if len(shared) == IPC_HANDLE_BYTES + 2 and shared[1:2] == b"c":
        return shared[2:]
    what = ("an expandable segment" if shared[1:2] == b"e" and len(shared) > 2
            else f"a handle of {len(shared)} bytes in a form this client does not know")
    raise FailedPreconditionError(f"torch shared the parameters' CUDA memory as {what}, which the daemon cannot "
                                  f"open with CUDA IPC; run without expandable segments (leave "
                                  f"'expandable_segments:True' out of PYTORCH_CUDA_ALLOC_CONF)")
