"""stated.AdamW under 2-rank FSDP2 against torch.optim.AdamW, and host memory per node for DDP, ZeRO-1, FSDP2.

Step time: two ranks under torchrun (gloo on CPU, one OpenMP thread each), one `stated serve` daemon.
Each rank builds identical models (a stack of Linear+GELU blocks, float32), each `fully_shard`-ed per
block and at the root: one stepped by stated.AdamW, one by each torch.optim.AdamW variant asked for.
Full training steps (zero_grad, forward, backward, optimizer step) run in rotation after a warm-up
(stated, torch, ..., then the reverse order every other round); each starts and ends at a barrier, so
both ranks time the same step. Reported from rank 0: the step's median, the forward+backward part and
the optimizer part, and of stated's optimizer part the daemon's round trip (the step channel) and the
copy of the stepped values back into FSDP's shards (the rest, not timed apart: the gradients' copy into
the arena and the checks before it).
torch's default on CPU (foreach=None, no fused=) is its for-loop implementation: DTensors and CPU
tensors take neither foreach nor fused unless asked for.

Host memory: a fresh daemon per layout, the same model: DDP (each rank a full stated.AdamW), ZeRO-1
(ZeroRedundancyOptimizer(optimizer_class=stated.AdamW), each rank half the parameters) and FSDP2 (each
rank its shards). Measured from /proc (as root: the daemon's smaps are not readable otherwise) before
the optimizer is made (after one backward, so gradients exist) and after two steps: the daemon's RSS
and PSS, the trainers' PSS, and the node's PSS (daemon plus trainers: the arenas both map are counted
once). Beside them, the expected optimizer state: 8 bytes per parameter (exp_avg, exp_avg_sq) times the
copies the layout keeps (DDP 2, ZeRO-1 1, FSDP2 1), and the node's PSS growth when the same layout
steps torch.optim.AdamW instead (launched first, in the trainers).

    python bench/distributed.py [--params 50M] [--width 2048] [--batch 32] [--samples 15] [--torch default,fused]

Target (the distributed issue): stated/torch step time at most 1.15 with FSDP2 from 50M parameters.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import BenchDaemon, human, ratios, rotated  # noqa: E402
from cpu_step import parse_count  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYOUTS = {"ddp": 2, "zero1": 1, "fsdp2": 1}  # layout: copies of the optimizer state on the node
TORCH_VARIANTS = {"default": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}
LR = 1e-4


# --- one rank ------------------------------------------------------------------------------------

def build(args):
    """The model, identical on every call: `params` worth of Linear(width, width)+GELU blocks."""
    import torch

    torch.manual_seed(0)
    blocks = max(1, -(-args.params // (args.width * args.width + args.width)))  # at least `params`
    return torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Linear(args.width, args.width), torch.nn.GELU())
                                 for _ in range(blocks)])


def sharded(model, mesh):
    from torch.distributed.fsdp import fully_shard

    for block in model:
        fully_shard(block, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def timed(net, opt, x, parts: list, clocks: tuple = ()):
    """One full training step, timed from a barrier to a barrier; records (forward+backward, optimizer
    step, then the seconds each of `clocks` gained in the step) in `parts` and returns the whole."""
    import torch.distributed as dist

    def step() -> float:
        dist.barrier()
        t0 = time.perf_counter()
        opt.zero_grad()
        net(x).square().mean().backward()
        t1 = time.perf_counter()
        before = [sum(c) for c in clocks]
        opt.step()
        t2 = time.perf_counter()
        dist.barrier()  # the step is over when the slower rank's is
        parts.append((t1 - t0, t2 - t1, *(sum(c) - b for c, b in zip(clocks, before))))
        return time.perf_counter() - t0

    return step


def clock(owner, name: str) -> list:
    """Wraps method `name` of this one object (the client's code is not changed) so that each call is
    timed; returns the list the seconds go to."""
    inner, seconds = getattr(owner, name), []

    def timed_call(*args):
        t0 = time.perf_counter()
        try:
            return inner(*args)
        finally:
            seconds.append(time.perf_counter() - t0)

    setattr(owner, name, timed_call)
    return seconds


def time_worker(args) -> dict:
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    import stated

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    rank = dist.get_rank()
    x = torch.randn(args.batch, args.width, generator=torch.Generator().manual_seed(10 + rank))
    nets = [sharded(build(args), mesh) for _ in range(1 + len(args.torch))]
    opts = [stated.AdamW(nets[0].parameters(), lr=LR)]
    opts += [torch.optim.AdamW(net.parameters(), lr=LR, **TORCH_VARIANTS[v]) for net, v in zip(nets[1:], args.torch)]
    parts = [[] for _ in nets]
    # Where stated's step goes: the round trip to the daemon, and the copies of the stepped values back
    # into the shards (the rest, not timed apart: the gradients' copy into the arena and the checks).
    clocks = (clock(opts[0]._step_line, "step"), clock(opts[0]._mirrors, "from_arena"))
    functions = [timed(nets[0], opts[0], x, parts[0], clocks)]
    functions += [timed(net, opt, x, p) for net, opt, p in zip(nets[1:], opts[1:], parts[1:])]

    def progress(done: int, total: int) -> None:
        if rank == 0:
            print(f"  round {done}/{total} ({'warm-up' if done <= args.warmup else 'timed'})", flush=True)

    times = rotated(functions, args.samples, args.warmup, progress, alternate=len(functions))
    opts[0].close()
    return {"params": sum(p.numel() for p in nets[0].parameters()), "times": times,
            "parts": [p[args.warmup:] for p in parts], "blocks": len(nets[0])}


def memory(pid: int | str = "self") -> dict:
    """A process's resident memory from /proc: VmRSS, its anonymous and shared parts, and PSS (bytes)."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssShmem"):
                out[key] = int(value.split()[0]) * 1024
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            out["Pss"] = next(int(line.split()[1]) * 1024 for line in f if line.startswith("Pss:"))
    except PermissionError:
        # `stated serve` is not dumpable (Note [arenas as file descriptors]): its smaps are root's to read.
        raise SystemExit(f"cannot read /proc/{pid}/smaps_rollup: run the memory phase as root, "
                         f"or leave it out with --skip memory") from None
    return out


def memory_worker(args, mode: str) -> dict:
    """Builds the layout's model, does one backward, makes the optimizer (stated's, or torch's for
    "<layout>-torch") and steps twice; the daemon's and this rank's memory before and after."""
    import torch
    import torch.distributed as dist
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP

    import stated

    rank, (layout, _, torch_baseline) = dist.get_rank(), mode.partition("-")
    cls = torch.optim.AdamW if torch_baseline else stated.AdamW
    if layout == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh

        net = sharded(build(args), init_device_mesh("cpu", (dist.get_world_size(),)))
    else:
        net = DDP(build(args))
    x = torch.randn(args.batch, args.width, generator=torch.Generator().manual_seed(10 + rank))
    net(x).square().mean().backward()
    dist.barrier()
    before = {"daemon": memory(args.daemon_pid) if rank == 0 else None, "rank": memory()}
    dist.barrier()
    if layout == "zero1":
        opt = ZeroRedundancyOptimizer(net.parameters(), optimizer_class=cls, lr=LR)
        local = opt.optim
    else:
        opt = local = cls(net.parameters(), lr=LR)
    for _ in range(2):
        opt.zero_grad()
        net(x).square().mean().backward()
        opt.step()
    dist.barrier()
    after = {"daemon": memory(args.daemon_pid) if rank == 0 else None, "rank": memory()}
    dist.barrier()
    held = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel()
               for group in local.param_groups for p in group["params"])
    if not torch_baseline:
        local.close()
    return {"before": before, "after": after, "held": held, "params": sum(p.numel() for p in net.parameters())}


def worker(args) -> int:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    try:
        result = time_worker(args) if args.worker == "time" else memory_worker(args, args.worker)
        with open(os.path.join(args.out, f"rank{dist.get_rank()}.json"), "w") as f:
            json.dump(result, f)
    finally:
        dist.destroy_process_group()
    return 0


# --- the launcher --------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args, daemon: BenchDaemon, mode: str) -> list[dict]:
    """This script as two ranks under torchrun in `mode`, on `daemon`; each rank's result. The ranks'
    output goes to this terminal (rank 0 prints progress); a run past --timeout is stopped."""
    out = tempfile.mkdtemp(prefix="stated-bench-distributed-")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("TORCHELASTIC_", "MASTER_", "STATED_JOB")) and k not in ("RANK", "WORLD_SIZE")}
    env.update(STATED_ADDRESS=daemon.address, STATED_EMBEDDED="0", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "client"), os.path.join(ROOT, "kernels")]))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
               "--master-port", str(free_port()), os.path.abspath(__file__), "--worker", mode, "--out", out,
               "--daemon-pid", str(daemon.process.pid), "--params", str(args.params), "--width", str(args.width),
               "--batch", str(args.batch), "--samples", str(args.samples), "--warmup", str(args.warmup),
               "--torch", ",".join(args.torch)]
    process = subprocess.Popen(command, env=env, cwd=ROOT, start_new_session=True)
    try:
        code = process.wait(timeout=args.timeout)
    finally:
        if process.poll() is None:  # an error or a timeout here: torchrun stops its ranks on SIGTERM
            os.killpg(process.pid, 15)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, 9)
                process.wait()
    try:
        if code != 0:
            raise RuntimeError(f"torchrun {mode} exited with status {code}")
        return [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in range(2)]
    finally:
        shutil.rmtree(out, ignore_errors=True)


def ms(values) -> str:
    return f"{statistics.median(values) * 1e3:9.1f}"


def time_phase(args) -> list[str]:
    print(f"step time: 2-rank FSDP2, {human(args.params)} parameters, batch {args.batch}x{args.width}, "
          f"{args.warmup} warm-up and {args.samples} timed rounds", flush=True)
    daemon = BenchDaemon()
    try:
        result = launch(args, daemon, "time")[0]
    finally:
        daemon.stop()
    names = ["stated"] + [f"torch-{v}" for v in args.torch]
    print(f"{result['params'] / 1e6:.1f}M parameters in {result['blocks']} blocks, rank 0's medians (ms); "
          f"of stated's optimizer step, the daemon's round trip and the copy back into the shards:", flush=True)
    print(f"{'optimizer':>14s} {'step':>9s} {'fwd+bwd':>9s} {'opt step':>9s} {'daemon':>9s} {'to shards':>9s} "
          f"{'ratio':>6s} {'min':>6s} {'max':>6s}")
    stated_times, stated_parts = result["times"][0], result["parts"][0]
    for name, times, parts in zip(names, result["times"], result["parts"]):
        median, low, high = ratios(stated_times, times)
        columns = " ".join(ms([p[i] for p in parts]) if i < len(parts[0]) else f"{'-':>9s}" for i in range(4))
        print(f"{name:>14s} {ms(times)} {columns} {median:6.3f} {low:6.3f} {high:6.3f}", flush=True)
    lines = []
    # torch's default last: it is the baseline the target is set against.
    for name, times, parts in sorted(zip(names[1:], result["times"][1:], result["parts"][1:]),
                                     key=lambda row: row[0] == "torch-default"):
        median, low, high = ratios(stated_times, times)
        opt_ratio = statistics.median([a[1] / b[1] for a, b in zip(stated_parts, parts)])
        lines.append(f"adamw fsdp2 cpu 2 ranks {human(args.params)} params: stated/{name} step time {median:.2f} "
                     f"(min {low:.2f}, max {high:.2f}); optimizer step alone {opt_ratio:.2f}")
    return lines


def memory_phase(args) -> list[str]:
    rows = []
    for layout, copies in LAYOUTS.items():
        print(f"host memory: {layout}, torch.optim.AdamW then stated.AdamW on a fresh daemon", flush=True)
        daemon = BenchDaemon()
        try:
            baseline, ranks = launch(args, daemon, f"{layout}-torch"), launch(args, daemon, layout)
        finally:
            daemon.stop()
        d0, d1 = ranks[0]["before"]["daemon"], ranks[0]["after"]["daemon"]
        trainers, torch_node = (sum(r["after"]["rank"]["Pss"] - r["before"]["rank"]["Pss"] for r in rs)
                                for rs in (ranks, baseline))
        held = sum(r["held"] for r in ranks)
        rows.append((layout, copies, held, 8 * ranks[0]["params"] * copies, 16 * held, d1["VmRSS"] - d0["VmRSS"],
                     d1["Pss"] - d0["Pss"], trainers, d1["Pss"] - d0["Pss"] + trainers, torch_node))
    # Expected: the state alone (8 B/param, times the copies), and with the arenas beside it (the daemon's
    # parameter and gradient arenas, 8 B more per parameter held).
    print(f"GB; 'held': parameters the ranks' optimizers hold together; 'torch node': node dPSS with "
          f"torch.optim.AdamW\n{'layout':>7s} {'held':>7s} {'state':>7s} {'+arenas':>7s} {'daemon dRSS':>11s} "
          f"{'daemon dPSS':>11s} {'trainers dPSS':>13s} {'node dPSS':>9s} {'torch node':>10s}")
    for layout, copies, held, state, arenas, *measured in rows:
        print(f"{layout:>7s} {held / 1e6:6.1f}M {state / 1e9:7.3f} {arenas / 1e9:7.3f} "
              + " ".join(f"{m / 1e9:{w}.3f}" for m, w in zip(measured, (11, 11, 13, 9, 10))), flush=True)
    return [f"host memory {layout} {human(args.params)} params: daemon holds {rss / 1e9:.2f} GB more, "
            f"{rss / state:.2f}x the {copies} x 8 B/param of state ({rss / arenas:.2f}x with the arenas); "
            f"node {node / 1e9:.2f} GB more (torch.optim.AdamW: {torch_node / 1e9:.2f} GB)"
            for layout, copies, held, state, arenas, rss, pss, trainers, node, torch_node in rows]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", type=parse_count, default=50_000_000, metavar="COUNT",
                   help="parameters of the model, rounded up to whole blocks (default 50M)")
    p.add_argument("--width", type=int, default=2048, help="each block's Linear is WIDTH x WIDTH (default 2048)")
    p.add_argument("--batch", type=int, default=32, help="rows of each rank's input batch (default 32)")
    p.add_argument("--samples", type=int, default=15, help="timed steps per optimizer (default 15)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first (default 2)")
    p.add_argument("--torch", type=lambda s: s.split(","), default=["default", "fused"], metavar="VARIANTS",
                   help="torch.optim.AdamW variants to time against, comma-separated from default (foreach=None: "
                        "the for-loop on CPU), foreach, fused (default: default,fused)")
    p.add_argument("--skip", choices=["time", "memory"], default=None, help="leave out one of the two phases")
    p.add_argument("--timeout", type=float, default=600, help="seconds each torchrun launch may take (default 600)")
    p.add_argument("--worker", default=None, help="(internal) run as one rank, in this mode: time, or a layout "
                                                  "(ddp, zero1, fsdp2), with -torch for torch's optimizer")
    p.add_argument("--out", default=None, help="(internal) where a rank writes its result")
    p.add_argument("--daemon-pid", type=int, default=None, help="(internal) the daemon whose memory a rank reads")
    return p


def main() -> int:
    args = parser().parse_args()
    unknown = [v for v in args.torch if v not in TORCH_VARIANTS]
    if unknown:
        raise SystemExit(f"--torch: unknown variant {unknown[0]!r}; choose from {', '.join(TORCH_VARIANTS)}")
    if args.worker:
        return worker(args)
    lines = []
    if args.skip != "memory":
        lines += memory_phase(args)
    if args.skip != "time":
        lines += time_phase(args)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
