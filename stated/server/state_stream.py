"""ImportState's stream put back together: state_dict entries rebuilt from headers and chunks, checked
as they come (the store then loads them all or nothing)."""

from __future__ import annotations

import math

import torch

from stated.errors import InvalidArgument
from stated.v1 import state_service_pb2 as pb
from stated_client.wire import TORCH_DTYPES, WIRE_DTYPES, tensor_from_bytes
from stated_kernels.spec import beyond_float32

# A tensor's sizes are int64s in torch.
MAX_SIZE = (1 << 63) - 1


class Assembler:
    """Rebuilds state_dict entries from an ImportState stream, one tensor at a time."""

    def __init__(self) -> None:
        self.current: tuple[int, float, dict[str, bytearray], dict[str, tuple], set[str]] | None = None

    def header(self, header: pb.TensorStateHeader):
        done = self.finish()
        if not header.step >= 0 or beyond_float32(header.step):
            raise InvalidArgument(f"header.step for tensor {header.tensor} is {header.step}; it must be >= 0 "
                                  f"and finite as a float32 (the reference keeps it as one)")
        if "step" in header.fields:
            raise InvalidArgument(f"header.fields of tensor {header.tensor} names 'step'; the step travels in "
                                  f"header.step")
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
        shape = tuple(chunk.shape)
        if any(n > MAX_SIZE for n in shape):
            raise InvalidArgument(f"chunk.shape {list(shape)} of tensor {tensor} field {chunk.field!r} has a size "
                                  f"above {MAX_SIZE}, the largest a tensor can have")
        buf = data.setdefault(chunk.field, bytearray())
        if meta.setdefault(chunk.field, (dtype, shape)) != (dtype, shape):
            first_dtype, first_shape = meta[chunk.field]
            raise InvalidArgument(f"chunk of tensor {tensor} field {chunk.field!r} has dtype {chunk.dtype} and "
                                  f"shape {list(shape)}, but its first chunk had {WIRE_DTYPES[first_dtype]} and "
                                  f"{list(first_shape)}; a field's chunks must agree")
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
