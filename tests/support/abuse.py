"""What the security tests share: a bystander job checked against torch while the daemon is abused,
and raw gRPC calls that send bytes no stub would."""

from __future__ import annotations

import uuid

import torch

import stated
from stated.v1 import state_service_pb2 as pb

SERVICE = pb.DESCRIPTOR.services_by_name["StateService"]
ADAMW = dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.05)


def unique(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


def gradients(shapes, step: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return [torch.randn(shape, generator=g) for shape in shapes]


def initial(shapes, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for shape in shapes]


def run(opt, params, first: int, last: int) -> None:
    for step in range(first, last + 1):
        for p, grad in zip(params, gradients([p.shape for p in params], step)):
            p.grad = grad
        opt.step()


class Bystander:
    """A job stepping beside the abuse, checked against torch.optim.AdamW(fused=True) bit for bit."""

    SHAPES = ((16, 8), (8,))

    def __init__(self, proc):
        self.ours = [torch.nn.Parameter(v) for v in initial(self.SHAPES, seed=7)]
        self.theirs = [torch.nn.Parameter(v.clone()) for v in self.ours]
        self.opt = stated.AdamW(self.ours, address=proc.address, job=unique("bystander"), **ADAMW)
        self.reference = torch.optim.AdamW(self.theirs, fused=True, **ADAMW)
        self.steps = 0

    def step(self) -> None:
        self.steps += 1
        run(self.opt, self.ours, self.steps, self.steps)
        run(self.reference, self.theirs, self.steps, self.steps)
        for p, q in zip(self.ours, self.theirs):
            assert torch.equal(p.detach(), q.detach()), (p - q).abs().max()

    def close(self) -> None:
        self.opt.close()


def raw_call(channel, method):
    """A call of `method` that sends and receives raw bytes, in the method's own streaming shape."""
    path = f"/{SERVICE.full_name}/{method.name}"
    kind = {(False, False): channel.unary_unary, (False, True): channel.unary_stream,
            (True, False): channel.stream_unary, (True, True): channel.stream_stream}[
        (method.client_streaming, method.server_streaming)]
    call = kind(path, request_serializer=None, response_deserializer=None)
    if method.client_streaming:
        return lambda payload: call(iter([payload]), timeout=10)
    return lambda payload: call(payload, timeout=10)
