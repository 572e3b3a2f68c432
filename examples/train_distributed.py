"""A small distributed training run with a stated optimizer: the README's "Distributed training" example.

    torchrun --nproc-per-node 2 examples/train_distributed.py --layout fsdp2
    python examples/train_distributed.py --spawn 2 --layout ddp          # torch.multiprocessing

Every rank attaches to its node's daemon (STATED_ADDRESS, else the default socket; with no daemon there,
one embedded in the first process of the node). All ranks of the run are one job. The loss of rank 0
is printed every step.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist

import stated


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layout", choices=["ddp", "zero1", "fsdp2"], default="fsdp2",
                        help="ddp: DistributedDataParallel, a whole optimizer per rank; zero1: "
                             "ZeroRedundancyOptimizer, each rank its part of the state; fsdp2: fully_shard, each rank "
                             "its shards (default: fsdp2)")
    parser.add_argument("--steps", type=int, default=20, help="training steps (default: 20)")
    parser.add_argument("--width", type=int, default=256, help="hidden width of the model (default: 256)")
    parser.add_argument("--spawn", type=int, default=0, metavar="N",
                        help="start N ranks on this machine with torch.multiprocessing instead of under a launcher "
                             "such as torchrun (default: 0, a launcher started this process)")
    return parser.parse_args()


def model(width: int) -> torch.nn.Module:
    torch.manual_seed(0)  # the same initial weights on every rank
    return torch.nn.Sequential(torch.nn.Linear(32, width), torch.nn.GELU(), torch.nn.Linear(width, width),
                               torch.nn.GELU(), torch.nn.Linear(width, 1))


def wrap(net: torch.nn.Module, layout: str):
    """The model and its optimizer for `layout`: the one line that changes from torch.optim is stated.AdamW."""
    if layout == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for layer in net:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer)
        fully_shard(net)
        return net, stated.AdamW(net.parameters(), lr=1e-3, weight_decay=0.01, max_grad_norm=1.0)
    net = torch.nn.parallel.DistributedDataParallel(net)
    if layout == "zero1":
        from torch.distributed.optim import ZeroRedundancyOptimizer

        return net, ZeroRedundancyOptimizer(net.parameters(), optimizer_class=stated.AdamW, lr=1e-3, weight_decay=0.01)
    return net, stated.AdamW(net.parameters(), lr=1e-3, weight_decay=0.01)


def train(args: argparse.Namespace) -> None:
    dist.init_process_group("gloo")  # "nccl" with CUDA parameters (then .cuda() the model first)
    rank = dist.get_rank()
    net, opt = wrap(model(args.width), args.layout)
    g = torch.Generator().manual_seed(rank)  # each rank its own data
    target = torch.randn(32, 1, generator=torch.Generator().manual_seed(1234))
    for step in range(1, args.steps + 1):
        x = torch.randn(64, 32, generator=g)
        loss = torch.nn.functional.mse_loss(net(x), torch.tanh(x @ target))
        opt.zero_grad()
        loss.backward()
        if args.layout == "zero1":
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)  # whole gradients on every rank
        opt.step()
        if rank == 0:
            print(f"step {step:3d}  loss {loss.item():.5f}", flush=True)
    local = opt.optim if args.layout == "zero1" else opt
    if rank == 0:
        print(f"job {local.job}: {dist.get_world_size()} ranks, {args.layout}", flush=True)
    local.close()
    dist.destroy_process_group()


def spawned(index: int, args: argparse.Namespace, port: int) -> None:
    """A torch.multiprocessing child: the rendezvous torchrun would set up."""
    os.environ.update(RANK=str(index), LOCAL_RANK=str(index), WORLD_SIZE=str(args.spawn), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    train(args)


def main() -> None:
    args = parse_args()
    if args.spawn:
        import socket

        import torch.multiprocessing as mp

        with socket.socket() as s:  # a free port for the rendezvous
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.spawn(spawned, args=(args, port), nprocs=args.spawn)
    else:
        train(args)


if __name__ == "__main__":
    main()
