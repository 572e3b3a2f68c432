"""ImportState's stream put back together: state_dict entries rebuilt from headers and chunks, checked
as they come (the store then loads them all or nothing).

Note [import as it streams]: the stream is checked message by message against the session it names,
before its bytes are kept: a header names one of the session's tensors, once, and at most
MAX_STATE_FIELDS fields; a chunk's shape has at most as many elements as its tensor (no state field of
any algorithm has more: moments are the parameter's shape, factored statistics and 8-bit scales fewer),
and its data may not go beyond that shape. So the stream never makes the daemon hold more than the
session's tensors could take, about MAX_STATE_FIELDS times their size in float64 at worst, and a stream
that promises more is refused at the chunk that goes beyond.
"""

from __future__ import annotations

import math

import torch

from stated.errors import InvalidArgument
from stated.state_transfer import check_import_index
from stated.v1 import state_service_pb2 as pb
from stated_client.wire import TORCH_DTYPES, WIRE_DTYPES, tensor_from_bytes
from stated_kernels.spec import beyond_float32

# A tensor's sizes are int64s in torch.
MAX_SIZE = (1 << 63) - 1
# The most fields one tensor's state has (AdamW8bit with amsgrad and master weights: 7), with room.
MAX_STATE_FIELDS = 16


class Assembler:
    """Rebuilds state_dict entries from an ImportState stream for `session`, one tensor at a time
    (Note [import as it streams])."""

    def __init__(self, session) -> None:
        self.session = session
        self.seen: set[int] = set()
        self.current: tuple[int, float, dict[str, bytearray], dict[str, tuple], set[str]] | None = None

    def header(self, header: pb.TensorStateHeader):
        done = self.finish()
        check_import_index(self.session, header.tensor, self.seen)  # the store's own check, as it streams
        if len(header.fields) > MAX_STATE_FIELDS:
            raise InvalidArgument(f"header.fields of tensor {header.tensor} names {len(header.fields)} fields; a "
                                  f"tensor's state has at most {MAX_STATE_FIELDS}")
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
        numel, elements = self.session.tensors[tensor].info.numel, math.prod(shape)
        if elements > numel:
            raise InvalidArgument(f"chunk.shape {list(shape)} of tensor {tensor} field {chunk.field!r} has "
                                  f"{elements} elements, more than the tensor's {numel}; no state field is "
                                  f"larger than its parameter")
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
        if len(buf) + len(chunk.data) > elements * size:
            raise InvalidArgument(f"chunk of tensor {tensor} field {chunk.field!r} brings its data to "
                                  f"{len(buf) + len(chunk.data)} bytes, beyond the {elements * size} of its "
                                  f"shape {list(shape)} in {str(dtype).removeprefix('torch.')}")
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
