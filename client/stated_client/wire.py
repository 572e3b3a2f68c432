"""Shared by client and daemon: dtype codes and cutting state tensors into StateChunk messages."""

from __future__ import annotations

import torch

from stated.v1 import state_service_pb2 as pb

# Tensors travel as float32/bfloat16/float16/float64; state fields may also be 8-bit codes.
WIRE_DTYPES = {torch.float32: pb.D_TYPE_FLOAT32, torch.bfloat16: pb.D_TYPE_BFLOAT16,
               torch.float16: pb.D_TYPE_FLOAT16, torch.float64: pb.D_TYPE_FLOAT64, torch.uint8: pb.D_TYPE_UINT8}
TORCH_DTYPES = {v: k for k, v in WIRE_DTYPES.items()}
CHUNK_BYTES = 1 << 20


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def state_chunks(tensor: int, name: str, value: torch.Tensor, chunk_bytes: int = CHUNK_BYTES):
    """StateChunk messages carrying `value` (raw little-endian values), at most chunk_bytes of data each."""
    flat = value.detach().to("cpu").reshape(-1).contiguous()
    if flat.dtype not in WIRE_DTYPES:
        raise ValueError(f"state {name!r} of tensor {tensor} has dtype {dtype_name(flat.dtype)}, which the wire "
                         f"cannot carry")
    raw = flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""
    size = flat.element_size()
    per = max(1, chunk_bytes // size)
    start = 0
    while True:
        end = min(start + per, flat.numel())
        yield pb.StateChunk(tensor=tensor, field=name, dtype=WIRE_DTYPES[flat.dtype], shape=list(value.shape),
                            offset=start, data=raw[start * size: end * size])
        start = end
        if start >= flat.numel():
            return


def tensor_from_bytes(raw: bytes | bytearray, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    value = torch.frombuffer(bytearray(raw), dtype=dtype) if raw else torch.empty(0, dtype=dtype)
    return value.reshape(shape)


def gather_state(replies) -> dict[int, dict[str, torch.Tensor]]:
    """ExportState's replies (a header, then its chunks, per tensor) as {tensor: {"step": ..., field: tensor}}."""
    state: dict[int, dict[str, torch.Tensor]] = {}
    buffers: dict[int, dict] = {}
    current = None
    for reply in replies:
        if reply.HasField("header"):
            current = reply.header.tensor
            state.setdefault(current, {})["step"] = torch.tensor(reply.header.step, dtype=torch.float32)
            buffers.setdefault(current, {})
        else:
            c = reply.chunk
            buffers[current].setdefault(c.field, (bytearray(), TORCH_DTYPES[c.dtype], tuple(c.shape)))[0].extend(c.data)
    for index, fields in buffers.items():
        for name, (raw, dtype, shape) in fields.items():
            state[index][name] = tensor_from_bytes(raw, dtype, shape)
    return state
