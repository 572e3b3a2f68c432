"""Two nodes on one machine: two daemons, and `torchrun --nnodes 2 --nproc-per-node 2` launched once per
"node" on loopback with gloo, each node's ranks attached to their own daemon through STATED_ADDRESS. An
FSDP2 model sharded over the four ranks ends where a single process with torch.optim.AdamW on every
rank's batches at once ends; each daemon's `stated status` and metrics show its own node's two ranks and
nothing of the other's."""

from __future__ import annotations

import json
import os
import re
import subprocess

import torch

from fsdp2_worker import ATOL, RTOL, Net
from launch import HERE, env_for, free_port, torchrun
from nodes_worker import LR, STEPS, WEIGHT_DECAY, batches

RANKS = 4


def launch_nodes(daemons, out) -> None:
    port = free_port()
    nodes = []
    for node, daemon in enumerate(daemons):
        command = torchrun("--nnodes", "2", "--node-rank", str(node), "--master-addr", "127.0.0.1",
                           "--master-port", str(port), os.path.join(HERE, "nodes_worker.py"), str(out),
                           f"http://127.0.0.1:{daemon.metrics_port}/metrics")
        nodes.append(subprocess.Popen(command, env=env_for(daemon), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    for node in nodes:
        output, _ = node.communicate(timeout=300)
        assert node.returncode == 0, output[-4000:]


def single_process_reference() -> dict[str, torch.Tensor]:
    """torch.optim.AdamW on the unsharded model, each step's loss the mean of the four ranks' losses (the
    gradient FSDP2's reduce-scatter averages)."""
    torch.manual_seed(0)
    net = Net()
    opt = torch.optim.AdamW(net.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    data = [batches(r) for r in range(RANKS)]
    for step in range(STEPS):
        opt.zero_grad()
        loss = sum(torch.nn.functional.mse_loss(net(x), y) for x, y in (data[r][step] for r in range(RANKS))) / RANKS
        loss.backward()
        opt.step()
    return dict(net.named_parameters())


def sessions_shown(status: str) -> set[tuple[int, int]]:
    """(rank, pid) of each session line of `stated status` (job, rank, algorithm, pid, ...)."""
    rows = [line.split() for line in status.splitlines()[2:]]
    return {(int(row[1]), int(row[3])) for row in rows if len(row) >= 8 and row[1].isdigit()}


def test_two_nodes_each_with_its_daemon_match_a_single_process(spawn, tmp_path):
    daemons = [spawn("node0"), spawn("node1")]
    launch_nodes(daemons, tmp_path)
    ranks = [json.load(open(tmp_path / f"rank{r}.json")) for r in range(RANKS)]
    assert len({r["job"] for r in ranks}) == 1  # one job across both nodes
    reference = single_process_reference()
    for r in ranks:
        for name, values in r["params"].items():
            ours, ref = torch.tensor(values), reference[name].detach()
            assert bool(((ours - ref).abs() <= ATOL + RTOL * ref.abs()).all()), (name, (ours - ref).abs().max())
    total = sum(p.numel() for p in reference.values())
    registered = 0
    for node in (0, 1):
        seen = json.load(open(tmp_path / f"node{node}.json"))
        own = {(rank, r["pid"]) for rank, r in enumerate(ranks) if r["node"] == node}
        assert sessions_shown(seen["status"]) == own and len(own) == 2, seen["status"]
        assert re.search(r"^stated_sessions 2\.0$", seen["metrics"], re.M)
        registered += int(float(re.search(r"^stated_parameters (\S+)$", seen["metrics"], re.M).group(1)))
    assert registered == total  # each node's daemon holds its ranks' shards, together the whole model
