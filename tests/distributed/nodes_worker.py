"""One rank of a two-node FSDP2 run for tests/distributed/test_two_nodes.py: torchrun --nnodes 2
--nproc-per-node 2 on loopback (gloo), each node's ranks attached to that node's daemon by STATED_ADDRESS.

    nodes_worker.py OUT_DIR METRICS_URL

Every rank trains its own batches (batches(rank)) on one FSDP2 model sharded over all four ranks with
stated.AdamW. Once every rank has stepped, each node's first rank records what `stated status` and
the metrics at METRICS_URL (its node's daemon) say, while all four are still attached. Each rank writes
OUT_DIR/rank<R>.json: its pid, node, job, and the full parameters at the end.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy

import stated
from fsdp2_worker import build

STEPS = 5
LR, WEIGHT_DECAY = 1e-2, 0.1


def batches(rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Rank `rank`'s batches; the test's single-process reference trains on all ranks' at once."""
    g = torch.Generator().manual_seed(300 + rank)
    return [(torch.randn(6, 7, generator=g), torch.randn(6, 3, generator=g)) for _ in range(STEPS)]


def record_node(out: str, metrics_url: str) -> None:
    status = subprocess.run([sys.executable, "-m", "stated", "status"], capture_output=True, text=True, timeout=60)
    with urllib.request.urlopen(metrics_url, timeout=30) as reply:
        metrics = reply.read().decode()
    node = os.environ["GROUP_RANK"]  # torchrun's node rank
    with open(os.path.join(out, f"node{node}.json"), "w") as f:
        json.dump({"status": status.stdout + status.stderr, "metrics": metrics}, f)


def main() -> int:
    out, metrics_url = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    net = build(init_device_mesh("cpu", (dist.get_world_size(),)), torch.float32, MixedPrecisionPolicy())
    opt = stated.AdamW(net.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    for x, y in batches(rank):
        opt.zero_grad()
        torch.nn.functional.mse_loss(net(x), y).backward()
        opt.step()
    dist.barrier()  # every rank attached and stepped
    if os.environ["LOCAL_RANK"] == "0":
        record_node(out, metrics_url)
    dist.barrier()  # still attached while the node's first rank looks
    full = {name: p.full_tensor().tolist() for name, p in net.named_parameters()}
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"pid": os.getpid(), "node": int(os.environ["GROUP_RANK"]), "job": opt.job, "params": full}, f)
    opt.close()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
