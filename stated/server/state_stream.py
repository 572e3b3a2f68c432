"""ImportState's stream put back together: state_dict entries rebuilt from headers and chunks, checked
as they come (the store then loads them all or nothing)."""

from __future__ import annotations

import math

import torch

from stated.errors import InvalidArgument
from stated.v1 import state_service_pb2 as pb
from stated_client.wire import TORCH_DTYPES, tensor_from_bytes


class Assembler:
    """Rebuilds state_dict entries from an ImportState stream, one tensor at a time."""

    def __init__(self) -> None:
        self.current: tuple[int, float, dict[str, bytearray], dict[str, tuple], set[str]] | None = None

    def header(self, header: pb.TensorStateHeader):
        done = self.finish()
        if not header.step >= 0 or header.step != header.step:
            raise InvalidArgument(f"header.step for tensor {header.tensor} is {header.step}; it must be >= 0")
        self.current = (header.tensor, header.step, {}, {}, set(header.fields))
        return done

    def chunk(self, chunk: pb.StateChunk):
        if self.current is None:
            raise InvalidArgument("a chunk came before any header; each tensor's state starts with a header")
        tensor, _step, data, meta, expected = self.current
        if chunk.tensor != tensor:
            raise InvalidArgument(f"chunk.tensor is {chunk.tensor} inside the state of tensor {tensor}")
        if chunk.field not in expected:
            raise InvalidArgument(f"chunk.field {chunk.field!r} of tensor {tensor} was not announced in its header")
        dtype = TORCH_DTYPES.get(chunk.dtype)
        if dtype is None:
            raise InvalidArgument(f"chunk.dtype {chunk.dtype} of tensor {tensor} field {chunk.field!r} is not known")
        buf = data.setdefault(chunk.field, bytearray())
        meta.setdefault(chunk.field, (dtype, tuple(chunk.shape)))
        size = dtype.itemsize
        if chunk.offset * size != len(buf):
            raise InvalidArgument(f"chunk.offset {chunk.offset} of tensor {tensor} field {chunk.field!r} does not "
                                  f"follow the previous chunk (expected {len(buf) // size})")
        buf.extend(chunk.data)
        return None

    def finish(self):
        if self.current is None:
            return None
        tensor, step, data, meta, expected = self.current
        self.current = None
        missing = expected - set(data)
        if missing:
            raise InvalidArgument(f"the state of tensor {tensor} announced {sorted(missing)} but sent no data for them")
        entry = {"step": torch.tensor(step, dtype=torch.float32)}
        for name, raw in data.items():
            dtype, shape = meta[name]
            numel = math.prod(shape)
            size = dtype.itemsize
            if len(raw) != numel * size:
                raise InvalidArgument(f"field {name!r} of tensor {tensor} has {len(raw) // size} values but its "
                                      f"shape {list(shape)} needs {numel}")
            entry[name] = tensor_from_bytes(raw, dtype, shape)
        return tensor, entry
