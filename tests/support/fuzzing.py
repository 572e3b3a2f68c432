"""Seeded generators of hostile requests for the fuzz suite (tests/security/test_fuzz.py): protobuf
messages filled from their descriptors with extreme values, serialized bytes mutated after the fact,
and step-channel frames. Everything comes from one random.Random, so a seed repeats a run."""

from __future__ import annotations

import math
import random

from google.protobuf.descriptor import FieldDescriptor as F

from stated_client.protocol import HEADER

INTS = (0, 1, -1, 2, 7, 255, 4096, 2**31 - 1, -2**31, 2**32 - 1, 2**53, 2**62, 2**63 - 1, -2**63)
UINTS = (0, 1, 2, 7, 255, 4096, 2**31, 2**32 - 1, 2**40, 2**62, 2**64 - 1)
FLOATS = (0.0, -0.0, 1.0, -1.0, 1e-3, 0.5, 0.999, 1e-45, 1e-300, 1e38, 3.5e38, 1e300, -1e300, math.inf, -math.inf,
          math.nan, 2.0**-149, 65504.0)
STRINGS = ("", "x", "adamw", "sgd", "lion", "adafactor", "../../etc/passwd", "a/b", "job\x00nul", "é" * 40,
           "x" * 300, "x" * 5000, "layers.0.weight", "exp_avg", "exp_avg_sq", " ", "\n")
# Shapes: small ones a daemon may well accept (cheap), absurd ones it must refuse; none in between, so
# that the fuzz does not legitimately fill the host's memory.
DIMENSIONS = (0, 1, 2, 3, 8, 64, 2**31, 2**40, 2**62, 2**63 - 1)
SMALL_ELEMENTS = 1 << 14
HYPERPARAMETER_NAMES = ("lr", "beta1", "beta2", "beta3", "eps", "eps1", "eps2", "weight_decay", "momentum",
                        "dampening", "nesterov", "maximize", "amsgrad", "decay_rate", "clip_threshold", "max_grad_norm",
                        "grad_scale", "relative_step", "", "x" * 200, "lr\x00")


class Fuzzer:
    def __init__(self, seed: int, sessions=()):
        self.random = random.Random(seed)
        # SessionRefs the fuzz may name: its own live sessions (so that calls get past the token check),
        # mixed with wrong tokens and unknown ids by `session_ref`.
        self.sessions = list(sessions)

    # --- messages --------------------------------------------------------------------------------

    def message(self, cls, depth: int = 0):
        """An instance of `cls` with a random subset of its fields set to random or extreme values."""
        msg = cls()
        if cls.DESCRIPTOR.full_name == "stated.v1.SessionRef":
            return self.session_ref()
        for field in cls.DESCRIPTOR.fields:
            if self.random.random() < 0.45:
                continue
            if field.type == F.TYPE_MESSAGE and field.message_type.GetOptions().map_entry:
                self._fill_map(getattr(msg, field.name), field.message_type)
            elif field.label == F.LABEL_REPEATED:
                count = self.random.choice((0, 1, 1, 2, 3, 5, 16, 200))
                if field.name == "shape":
                    count = self.random.choice((0, 1, 1, 2, 2, 3, 9, 64))
                container = getattr(msg, field.name)
                for _ in range(count):
                    if field.type == F.TYPE_MESSAGE:
                        if depth < 3:
                            container.add().CopyFrom(self.message(field.message_type._concrete_class, depth + 1))
                    else:
                        container.append(self.scalar(field))
                if field.name == "shape" and self._numel(container) > SMALL_ELEMENTS and self.random.random() < 0.5:
                    del container[:]  # keep most shapes cheap; absurd ones stay absurd
                    container.extend(self.random.choice(((4, 4), (16,), (0, 5), (3, 0, 2))))
            elif field.type == F.TYPE_MESSAGE:
                if depth < 3:
                    getattr(msg, field.name).CopyFrom(self.message(field.message_type._concrete_class, depth + 1))
            else:
                setattr(msg, field.name, self.scalar(field))
        return msg

    def _fill_map(self, container, entry) -> None:
        """A map field (hyperparameters by name): known names and unknown ones, extreme values."""
        key, value = entry.fields_by_name["key"], entry.fields_by_name["value"]
        for _ in range(self.random.choice((0, 1, 3, 5, 8, 40))):
            name = self.random.choice(HYPERPARAMETER_NAMES) if key.type == F.TYPE_STRING else self.scalar(key)
            if value.type == F.TYPE_MESSAGE:
                container[name].CopyFrom(self.message(value.message_type._concrete_class, 3))
            else:
                container[name] = self.scalar(value)

    def _numel(self, shape) -> int:
        n = 1
        for d in shape:
            n *= d
        return n

    def scalar(self, field):
        r = self.random
        t = field.type
        if t in (F.TYPE_DOUBLE, F.TYPE_FLOAT):
            value = r.choice(FLOATS) if r.random() < 0.7 else r.uniform(-10, 10)
            if t == F.TYPE_FLOAT and math.isfinite(value) and abs(value) > 3.4e38:
                value = math.copysign(math.inf, value)
            return value
        if t == F.TYPE_BOOL:
            return r.random() < 0.5
        if t == F.TYPE_STRING:
            return r.choice(STRINGS)
        if t == F.TYPE_BYTES:
            return r.randbytes(r.choice((0, 1, 8, 16, 64, 1000)))
        if t == F.TYPE_ENUM:
            values = [v.number for v in field.enum_type.values]
            return r.choice(values + [max(values) + 1, 99, -1])
        if field.name in ("shape",):
            return r.choice(DIMENSIONS)
        if t in (F.TYPE_UINT32, F.TYPE_FIXED32):
            return r.choice([u for u in UINTS if u < 2**32])
        if t in (F.TYPE_UINT64, F.TYPE_FIXED64):
            return r.choice(UINTS)
        if t in (F.TYPE_INT32, F.TYPE_SINT32, F.TYPE_SFIXED32):
            return r.choice([i for i in INTS if -2**31 <= i < 2**31])
        return r.choice(INTS)

    def session_ref(self):
        from stated.v1 import state_service_pb2 as pb

        r = self.random
        if self.sessions and r.random() < 0.75:
            ref = pb.SessionRef()
            ref.CopyFrom(r.choice(self.sessions))
            if r.random() < 0.2:
                ref.token = r.randbytes(len(ref.token))  # wrong token
            return ref
        return pb.SessionRef(id=r.choice(("", "0" * 16, r.randbytes(8).hex(), "x" * 500)),
                             token=r.randbytes(r.choice((0, 16, 17))))

    # --- bytes -------------------------------------------------------------------------------------

    def mutate(self, data: bytes) -> bytes:
        """`data` bit-flipped, truncated, extended, spliced or replaced."""
        r = self.random
        how = r.randrange(6)
        if how == 0 or not data:
            return r.randbytes(r.choice((1, 3, 10, 100, 4000)))
        if how == 1:
            return data[: r.randrange(len(data))]
        if how == 2:
            b = bytearray(data)
            for _ in range(r.choice((1, 2, 8))):
                b[r.randrange(len(b))] ^= 1 << r.randrange(8)
            return bytes(b)
        if how == 3:
            return data + r.randbytes(r.choice((1, 5, 50)))
        if how == 4:  # a length-delimited field that claims more than follows
            return data + bytes([0x0A]) + b"\xff\xff\xff\x7f" + b"ab"
        i = r.randrange(len(data))
        return data[:i] + r.randbytes(r.choice((1, 4))) + data[i:]

    # --- step-channel frames ------------------------------------------------------------------------

    def frame(self, payloads: list[bytes]) -> tuple[bytes, bool]:
        """Bytes to send on a step-channel connection, and whether they form whole frames (else the
        connection is left cut short)."""
        r = self.random
        how = r.randrange(7)
        if how == 0:
            return r.randbytes(r.choice((1, 4, 5, 64))), False
        payload = r.choice(payloads) if payloads and r.random() < 0.7 else r.randbytes(r.choice((0, 3, 40)))
        if how == 1:
            payload = self.mutate(payload)
        kind = r.choice((0, 0, 0, 1, 2, 3, 7, 255)) if how == 2 else 0
        if how == 3:  # announces more than it sends
            return HEADER.pack(r.choice((len(payload) + 10, 1 << 20, 64 << 20, 2**31, 2**32 - 1)), kind) + payload, False
        if how == 4:  # truncated
            whole = HEADER.pack(len(payload), kind) + payload
            return whole[: r.randrange(max(len(whole), 1))], False
        if how == 5:  # several frames at once
            return b"".join(HEADER.pack(len(p), 0) + p for p in r.choices(payloads or [b""], k=3)), True
        return HEADER.pack(len(payload), kind) + payload, True
