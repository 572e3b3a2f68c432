"""One rank of an FSDP2 run for tests/distributed/test_fsdp2.py (under torchrun, gloo on CPU).

    fsdp2_worker.py OUT_DIR CASE

Two copies of one model, each `fully_shard`-ed the same way: one stepped by a stated optimizer, one by
the reference (torch.optim.AdamW, or for bf16 parameters the hand-made master-weights recipe on the
local shards). The model has shards of uneven sizes, an empty shard (a 1-row parameter over two ranks)
and a frozen parameter. Each rank writes OUT_DIR/rank<R>.json: the largest differences between the two
copies' local shards after every step, the gradient norms, or the error a refused case raised.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

import stated
from placement import ATOL, DEVICE, RTOL, device, start

STEPS = 8


def _lion():
    from lion_pytorch import Lion  # ALGORITHMS.md's reference for Lion

    return Lion


# The other elementwise algorithms, each against its reference.
ALGORITHMS = {"adam": (stated.Adam, torch.optim.Adam), "sgd": (stated.SGD, torch.optim.SGD),
              "lion": (stated.Lion, None)}


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(7, 13)       # 13 rows over 2 ranks: shards of 7 and 6
        self.b = torch.nn.Linear(13, 5)       # 5 rows: 3 and 2
        self.frozen = torch.nn.Linear(5, 5)   # no gradient: no step, for stated as for torch
        self.frozen.requires_grad_(False)
        self.row = torch.nn.Parameter(torch.randn(1, 5) * 0.1)  # one row: rank 1's shard is empty
        self.c = torch.nn.Linear(5, 3)

    def forward(self, x):
        h = torch.tanh(self.b(torch.tanh(self.a(x))))
        return self.c(self.frozen(h) + self.row)


def build(mesh, dtype, policy):
    torch.manual_seed(0)
    net = Net().to(device=device(), dtype=dtype)
    for layer in (net.a, net.b, net.c):
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(net, mesh=mesh, mp_policy=policy)
    return net


def run(case: str, mesh) -> dict:
    dtype = torch.bfloat16 if case == "bf16-master" else torch.float32
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if case == "mp-policy" \
        else MixedPrecisionPolicy()
    ours_net, ref_net = build(mesh, dtype, policy), build(mesh, dtype, policy)
    kwargs = dict(lr=1e-2, weight_decay=0.1)
    if case.startswith("refused-"):
        extra = dict(betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0) if case == "refused-SlimAdam" else {}
        getattr(stated, case.removeprefix("refused-"))(ours_net.parameters(), lr=1e-2, **extra)
        return {"refused": None}
    clip = 0.5 if case == "clip" else None
    ours_cls, ref_cls = ALGORITHMS.get(case, (stated.AdamW, torch.optim.AdamW))
    ref_cls = ref_cls or _lion()
    if case in ALGORITHMS:
        kwargs = dict(lr=1e-2, momentum=0.9) if case == "sgd" else dict(lr=1e-3, weight_decay=0.1)
    groups = [{"params": [ours_net.a.weight, ours_net.row]}, {"params": [p for n, p in ours_net.named_parameters()
                                                                         if n not in ("a.weight", "row")], "lr": 3e-3}]
    ours = ours_cls(groups, **kwargs, max_grad_norm=clip, master_weights=case == "bf16-master")
    ref_params = list(ref_net.parameters())
    if case == "bf16-master":
        masters = [p.to_local().detach().float().clone() for p in ref_params]
        first = [i for i, (n, _) in enumerate(ref_net.named_parameters()) if n in ("a.weight", "row")]
        ref = torch.optim.AdamW([{"params": [masters[i] for i in first]},
                                 {"params": [m for i, m in enumerate(masters) if i not in first], "lr": 3e-3}],
                                **kwargs, fused=True)
    else:
        ref = ref_cls([{"params": [ref_net.a.weight, ref_net.row]},
                       {"params": [p for n, p in ref_net.named_parameters() if n not in ("a.weight", "row")],
                        "lr": 3e-3}], **kwargs)
    # A loss scale of 2^10 growing every 2 steps: the scaled gradients stay finite, the scale changes.
    ours_scaler, ref_scaler = ((torch.amp.GradScaler(DEVICE.type, init_scale=2.0**10, growth_interval=2) for _ in range(2))
                               if case == "scaler" else (None, None))
    g = torch.Generator().manual_seed(100 + dist.get_rank())
    diffs, norms = [], []
    for _ in range(STEPS):
        x, y = torch.randn(6, 7, generator=g).to(device(), dtype), torch.randn(6, 3, generator=g).to(device())
        for net, scaler in ((ours_net, ours_scaler), (ref_net, ref_scaler)):
            net.zero_grad()
            loss = torch.nn.functional.mse_loss(net(x).float(), y)
            (scaler.scale(loss) if scaler else loss).backward()
        if ours_scaler:
            ours_scaler.step(ours)
            ours_scaler.update()
        else:
            ours.step()
        if clip:
            norms.append((ours.last_grad_norm,
                          float(torch.nn.utils.clip_grad_norm_([p for p in ref_params if p.grad is not None], clip,
                                                               foreach=True).full_tensor())))
        if case == "bf16-master":
            for m, p in zip(masters, ref_params):
                m.grad = p.grad.to_local().float() if p.grad is not None else None
            ref.step()
            with torch.no_grad():
                for m, p in zip(masters, ref_params):
                    p.to_local().copy_(m)
        elif ref_scaler:
            ref_scaler.step(ref)
            ref_scaler.update()
        else:
            ref.step()
        diffs.append(max_difference(ours_net, ref_net))
    state = ours.state_dict()["state"]
    kinds = sorted({type(v).__name__ for entry in state.values() for k, v in entry.items() if k != "step"})
    ours.close()
    scales = [ours_scaler.get_scale(), ref_scaler.get_scale()] if ours_scaler else []
    return {"diffs": diffs, "norms": norms, "scales": scales, "state_types": kinds,
            "local_sizes": [p.to_local().numel() for p in ours_net.parameters()]}


def max_difference(a: torch.nn.Module, b: torch.nn.Module) -> dict:
    """Over the two models' local shards: the largest absolute difference, whether every element is
    within the parity tolerance, and whether all are equal."""
    worst, within, exact = 0.0, True, True
    for p, q in zip(a.parameters(), b.parameters()):
        x, y = p.to_local().detach().double(), q.to_local().detach().double()
        if x.numel():
            d = (x - y).abs()
            worst = max(worst, float(d.max()))
            within = within and bool((d <= ATOL + RTOL * y.abs()).all())
            exact = exact and bool(torch.equal(x, y))
    return {"max_abs": worst, "within": within, "exact": exact}


def main() -> int:
    out, case = sys.argv[1], sys.argv[2]
    start()
    mesh = init_device_mesh(DEVICE.type, (dist.get_world_size(),))
    try:
        result = run(case, mesh)
    except stated.StatedError as exc:
        result = {"refused": f"{type(exc).__name__}: {exc}"}
    with open(os.path.join(out, f"rank{dist.get_rank()}.json"), "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
