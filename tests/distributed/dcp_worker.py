"""One rank of an FSDP2 or DDP run that checkpoints with torch.distributed.checkpoint, for
tests/distributed/test_distributed_checkpoint.py (under torchrun, gloo on CPU).

    dcp_worker.py OUT_DIR [fsdp2|ddp]

Steps 1-3, then get_model_state_dict / get_optimizer_state_dict and dcp.save, then steps 4-6, beside
torch.optim.AdamW on the same model which never saves. Then a fresh model and optimizer load the
checkpoint (dcp.load, set_model_state_dict, set_optimizer_state_dict) and take steps 4-6 again. Each
rank writes OUT_DIR/rank<R>.json: whether the saving run stayed within the parity tolerance of torch's
at every step, and whether the loaded run ended equal to the saving run bit for bit.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy
from torch.nn.parallel import DistributedDataParallel as DDP

import stated
from fsdp2_worker import ATOL, RTOL, Net, build


def batches(rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(200 + rank)
    return [(torch.randn(6, 7, generator=g), torch.randn(6, 3, generator=g)) for _ in range(6)]


def train(net, opt, data) -> None:
    for x, y in data:
        opt.zero_grad()
        torch.nn.functional.mse_loss(net(x), y).backward()
        opt.step()


def shards(net) -> list[torch.Tensor]:
    """Each parameter's local shard (FSDP2) or the whole parameter (DDP)."""
    return [(p.to_local() if hasattr(p, "to_local") else p).detach().clone() for p in net.parameters()]


def builder(layout: str):
    if layout == "ddp":
        def build_ddp():
            torch.manual_seed(0)
            return DDP(Net())
        return build_ddp
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    return lambda: build(mesh, torch.float32, MixedPrecisionPolicy())


def main() -> int:
    out, layout = sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "fsdp2"
    dist.init_process_group("gloo")
    new_model = builder(layout)
    data = batches(dist.get_rank())
    ours_net, ref_net = new_model(), new_model()
    ours = stated.AdamW(ours_net.parameters(), lr=1e-2, weight_decay=0.1)
    ref = torch.optim.AdamW(ref_net.parameters(), lr=1e-2, weight_decay=0.1)
    train(ours_net, ours, data[:3])
    train(ref_net, ref, data[:3])
    for opt in (ours, ref):  # gradients gone, as between iterations: the case torch's helpers "initialise"
        opt.zero_grad(set_to_none=True)
    checkpoint = os.path.join(out, "checkpoint")
    dcp.save({"model": get_model_state_dict(ours_net), "optim": get_optimizer_state_dict(ours_net, ours)},
             checkpoint_id=checkpoint)
    within = []
    for batch in data[3:]:
        train(ours_net, ours, [batch])
        train(ref_net, ref, [batch])
        within.append(all(bool(((p - q).abs() <= ATOL + RTOL * q.abs()).all())
                          for p, q in zip(shards(ours_net), shards(ref_net))))
    loaded_net = new_model()
    loaded = stated.AdamW(loaded_net.parameters(), lr=1e-2, weight_decay=0.1)
    state = {"model": get_model_state_dict(loaded_net), "optim": get_optimizer_state_dict(loaded_net, loaded)}
    dcp.load(state, checkpoint_id=checkpoint)
    set_model_state_dict(loaded_net, state["model"])
    set_optimizer_state_dict(loaded_net, loaded, state["optim"])
    train(loaded_net, loaded, data[3:])
    exact = all(torch.equal(p, q) for p, q in zip(shards(loaded_net), shards(ours_net)))
    with open(os.path.join(out, f"rank{dist.get_rank()}.json"), "w") as f:
        json.dump({"within": within, "exact": exact, "jobs": [ours.job, loaded.job]}, f)
    ours.close()
    loaded.close()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
