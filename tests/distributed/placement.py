"""Where the distributed workers run: CPU with gloo (this machine), or with STATED_TEST_DEVICE=cuda
(tests/distributed/test_on_gpus.py) CUDA parameters with NCCL, one GPU per rank."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

DEVICE = torch.device(os.environ.get("STATED_TEST_DEVICE", "cpu"))

# The parity tolerance of the first issue (tests/client/test_parity.py): rtol 1e-6, atol 1e-7. On CUDA
# the daemon's kernels round differently from torch's (FMA contraction, the order of sqrt and division:
# an ulp or two per step), and the differences feed back through the forward pass of the next steps,
# so the GPU runs take ten times that, as tests/gpu's trajectory tests do.
RTOL, ATOL = (1e-5, 1e-6) if DEVICE.type == "cuda" else (1e-6, 1e-7)


def start() -> None:
    """The process group; on CUDA each rank takes the GPU of its local rank."""
    if DEVICE.type == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if DEVICE.type == "cuda" else "gloo")


def device() -> torch.device:
    """This rank's device."""
    return torch.device("cuda", torch.cuda.current_device()) if DEVICE.type == "cuda" else DEVICE
