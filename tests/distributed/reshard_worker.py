"""One rank of a run that saves a distributed checkpoint at one world size and loads it at another, for
tests/distributed/test_distributed_checkpoint.py (torchrun, gloo on CPU).

    reshard_worker.py OUT_DIR save       three steps of FSDP2 + stated.AdamW, then dcp.save; rank 0 also
                                         writes the full optimizer state (full_state_dict=True) it saved
    reshard_worker.py OUT_DIR load       at this world size: dcp.load into FSDP2 + stated.AdamW and into
                                         FSDP2 + torch.optim.AdamW; both full states must equal the saved
                                         one; then one step each on the same data

Rank 0 of a load writes OUT_DIR/load<W>.json. With one rank, it also loads the full state into a plain
(unsharded) model and torch.optim.AdamW, the way back to a plain torch checkpoint.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy

import stated
from fsdp2_worker import ATOL, RTOL, Net, build

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def step(net, opt, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(6, 7, generator=g), torch.randn(6, 3, generator=g)
    opt.zero_grad()
    torch.nn.functional.mse_loss(net(x), y).backward()
    opt.step()


def flat(state: dict) -> dict[str, torch.Tensor]:
    """A full optimizer state dict's tensors by "fqn.field" (the step counts as tensors too)."""
    return {f"{fqn}.{k}": torch.as_tensor(v).detach().clone() for fqn, entry in state.get("state", {}).items()
            for k, v in entry.items()}  # (ranks but 0 get an empty full state dict)


def main() -> int:
    out, mode = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    mesh = init_device_mesh("cpu", (world,))
    checkpoint = os.path.join(out, "checkpoint")
    net = build(mesh, torch.float32, MixedPrecisionPolicy())
    opt = stated.AdamW(net.parameters(), lr=1e-2, weight_decay=0.1)
    if mode == "save":
        for i in range(3):
            step(net, opt, 300 + 10 * i + rank)
        opt.zero_grad(set_to_none=True)
        dcp.save({"model": get_model_state_dict(net), "optim": get_optimizer_state_dict(net, opt)},
                 checkpoint_id=checkpoint)
        full = flat(get_optimizer_state_dict(net, opt, options=FULL))
        if rank == 0:
            torch.save(full, os.path.join(out, "full_saved.pt"))
    else:
        ref_net = build(mesh, torch.float32, MixedPrecisionPolicy())
        ref = torch.optim.AdamW(ref_net.parameters(), lr=1e-2, weight_decay=0.1)
        for model, o in ((net, opt), (ref_net, ref)):
            state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, o)}
            dcp.load(state, checkpoint_id=checkpoint)
            set_model_state_dict(model, state["model"])
            set_optimizer_state_dict(model, o, state["optim"])
        ours_full, ref_full = flat(get_optimizer_state_dict(net, opt, options=FULL)), \
            flat(get_optimizer_state_dict(ref_net, ref, options=FULL))
        report = {"world": world}
        if rank == 0:  # the full state dicts are gathered on rank 0 alone
            saved = torch.load(os.path.join(out, "full_saved.pt"))
            report["ours_equal_saved"] = sorted(ours_full) == sorted(saved) and all(
                torch.equal(ours_full[k], saved[k]) for k in saved)
            report["torch_equal_saved"] = all(torch.equal(ref_full[k], saved[k]) for k in saved)
        step(net, opt, 999)
        step(ref_net, ref, 999)
        within = torch.tensor(int(all(bool(((p.to_local() - q.to_local()).abs() <= ATOL + RTOL * q.to_local().abs()).all())
                                      for p, q in zip(net.parameters(), ref_net.parameters()))))
        dist.all_reduce(within, op=dist.ReduceOp.MIN)  # every rank's shards
        report["step_within"] = bool(within)
        if world == 1:  # back to a plain torch checkpoint: an unsharded model and torch.optim
            torch.manual_seed(0)
            plain = Net()
            plain_opt = torch.optim.AdamW(plain.parameters(), lr=1e-2, weight_decay=0.1)
            set_optimizer_state_dict(plain, plain_opt, get_optimizer_state_dict(net, opt, options=FULL),
                                     options=StateDictOptions(full_state_dict=True))
            back = flat(get_optimizer_state_dict(plain, plain_opt, options=FULL))
            mine = flat(get_optimizer_state_dict(net, opt, options=FULL))
            report["plain_torch_equal"] = sorted(back) == sorted(mine) and all(torch.equal(back[k], mine[k])
                                                                                for k in mine)
        if rank == 0:
            with open(os.path.join(out, f"load{world}.json"), "w") as f:
                json.dump(report, f)
    opt.close()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
