"""One rank of a DDP run for tests/distributed/test_ddp_and_zero.py (under torchrun, gloo on CPU).

    ddp_worker.py OUT_DIR CASE

CASE "ddp": every rank steps a stated.AdamW over its DDP model's parameters (each rank holds the whole
state, as with torch.optim); "zero": ZeroRedundancyOptimizer(optimizer_class=stated.AdamW) gives each rank
its part of the parameters and state. Beside it in the same process runs the same thing with
torch.optim.AdamW (for "zero", ZeroRedundancyOptimizer(optimizer_class=torch.optim.AdamW)). Each rank
writes OUT_DIR/rank<R>.json: the largest difference from the reference after every step, whether the
ranks' parameters are identical, and how many parameters its stated optimizer holds. "fsdp1": FSDP1
with use_orig_params=True in place of DDP; "fsdp1-clip": the same with max_grad_norm=, which is refused.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.nn.parallel import DistributedDataParallel as DDP

import stated
from placement import ATOL, RTOL, device, start

STEPS = 6


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(9, 17), torch.nn.Tanh(), torch.nn.Linear(17, 13), torch.nn.Tanh(),
                               torch.nn.Linear(13, 4))


def optimizer(case: str, params, cls):
    if case == "fsdp1-clip" and cls is stated.AdamW:
        return cls(params, lr=1e-2, max_grad_norm=1.0)
    if case == "zero":
        return ZeroRedundancyOptimizer(params, optimizer_class=cls, lr=1e-2, weight_decay=0.1)
    return cls(params, lr=1e-2, weight_decay=0.1)


def refused(out: str, exc: Exception) -> int:
    with open(os.path.join(out, f"rank{dist.get_rank()}.json"), "w") as f:
        json.dump({"refused": f"{type(exc).__name__}: {exc}"}, f)
    dist.destroy_process_group()
    return 0


def full_parameters(net, case: str):
    return FSDP.summon_full_params(net) if case.startswith("fsdp1") else contextlib.nullcontext()


def main() -> int:
    out, case = sys.argv[1], sys.argv[2]
    start()
    wrap = (lambda m: FSDP(m, use_orig_params=True, device_id=device())) if case.startswith("fsdp1") else DDP
    ours_net, ref_net = wrap(model().to(device())), wrap(model().to(device()))
    ours = optimizer(case, ours_net.parameters(), stated.AdamW)
    ref = optimizer(case, ref_net.parameters(), torch.optim.AdamW)
    g = torch.Generator().manual_seed(10 + dist.get_rank())  # each rank its own data, as in data parallelism
    within = []
    for _ in range(STEPS):
        x, y = torch.randn(5, 9, generator=g).to(device()), torch.randn(5, 4, generator=g).to(device())
        for net, opt in ((ours_net, ours), (ref_net, ref)):
            opt.zero_grad()
            torch.nn.functional.mse_loss(net(x), y).backward()
            try:
                opt.step()
            except stated.StatedError as exc:  # "fsdp1-clip": refused, as it should be
                return refused(out, exc)
        within.append(all(bool(((p - q).abs() <= ATOL + RTOL * q.abs()).all())
                          for p, q in zip(ours_net.parameters(), ref_net.parameters())))
    local = ours.optim if case == "zero" else ours
    held = sum(p.numel() for group in local.param_groups for p in group["params"])
    with full_parameters(ours_net, case):  # FSDP1's parameters are each rank's parts of its flat buffers
        flat = torch.cat([p.detach().reshape(-1) for p in ours_net.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    with open(os.path.join(out, f"rank{dist.get_rank()}.json"), "w") as f:
        json.dump({"within": within, "identical": all(torch.equal(gathered[0], t) for t in gathered),
                   "held": held, "total": flat.numel(), "job": local.job}, f)
    local.close()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
