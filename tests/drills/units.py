"""One (job, rank) of a drill: a model trained by stated.AdamW beside torch.optim.AdamW(fused=True).

Stated's AdamW matches the fused torch one bit for bit, so the reference is the ground truth a resumed
state is held to. The reference steps first and is kept at every step since the last checkpoint the
trainer knows durable: after a daemon died, the step it comes back at may be any of those (a
--checkpoint-every checkpoint, or one whose reply never arrived), and `verify` compares the resumed
parameters and state_dict with the reference at exactly that step. The batch of step n depends only on
(seed, n), so a unit that resumes at step M sees the batches it would have seen.
"""

from __future__ import annotations

import copy

import torch

import stated

HYPER = dict(lr=2e-3, betas=(0.9, 0.99), weight_decay=0.05)
IN, OUT, BATCH = 16, 4, 8


def make_model(width: int, seed: int, depth: int = 1) -> torch.nn.Module:
    """An MLP with `depth` hidden width x width layers."""
    torch.manual_seed(seed)
    layers = [torch.nn.Linear(IN, width), torch.nn.Tanh()]
    for _ in range(depth):
        layers += [torch.nn.Linear(width, width), torch.nn.Tanh()]
    return torch.nn.Sequential(*layers, torch.nn.Linear(width, OUT))


def batch(seed: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return torch.randn(BATCH, IN, generator=g), torch.randn(BATCH, OUT, generator=g)


def loss_backward(model: torch.nn.Module, opt, x, y) -> None:
    opt.zero_grad(set_to_none=False)
    torch.nn.functional.mse_loss(model(x), y).backward()


class Snapshot:
    """The reference's parameters and optimizer state after one step."""

    def __init__(self, model: torch.nn.Module, opt: torch.optim.Optimizer):
        self.params = [p.detach().clone() for p in model.parameters()]
        self.state = copy.deepcopy(opt.state_dict())


def state_differences(ours: dict, theirs: dict) -> list[str]:
    """Where two optimizer `state` dicts differ by a single bit (or in their keys), as short phrases."""
    found = []
    if sorted(ours) != sorted(theirs):
        return [f"state holds tensors {sorted(ours)}, the reference {sorted(theirs)}"]
    for index in theirs:
        if sorted(ours[index]) != sorted(theirs[index]):
            found.append(f"state[{index}] keys {sorted(ours[index])}, the reference {sorted(theirs[index])}")
            continue
        for key, value in theirs[index].items():
            mine = ours[index][key]
            if key == "step":
                if float(mine) != float(value):
                    found.append(f"state[{index}]['step'] is {float(mine)}, the reference {float(value)}")
            elif not torch.equal(mine, value):
                found.append(f"state[{index}][{key!r}] differs by up to {(mine - value).abs().max().item():.3g}")
    return found


class Unit:
    """A (job, rank), its model, its reference, and the reference's snapshots since the checkpoint before
    the last one it knows durable."""

    def __init__(self, job: str, rank: int, width: int, seed: int, depth: int = 1):
        self.job, self.rank, self.width, self.seed, self.depth = job, rank, width, seed, depth
        self.model = make_model(width, seed, depth)
        self.ref = make_model(width, seed, depth)
        self.ref_opt = torch.optim.AdamW(self.ref.parameters(), fused=True, **HYPER)
        self.opt: stated.AdamW | None = None
        self.step = 0
        self.durable = [0]  # the steps opt.checkpoint() returned, oldest first
        self.snapshots = {0: Snapshot(self.ref, self.ref_opt)}

    @property
    def name(self) -> str:
        return f"{self.job}/{self.rank}"

    def attach(self, address: str) -> int | None:
        """A new optimizer with resume=True (fresh model objects: the daemon's parameters replace theirs)."""
        self.model = make_model(self.width, self.seed, self.depth)
        self.opt = stated.AdamW(self.model.parameters(), address=address, job=self.job, rank=self.rank,
                                resume=True, **HYPER)
        return self.opt.resumed_step

    def verify(self, step: int) -> list[str]:
        """Differences between the attached optimizer and the reference at `step` (none: bit-identical);
        the reference and the step count are put back to `step` so that training goes on from there."""
        snapshot = self.snapshots.get(step)
        if snapshot is None:
            return [f"no reference snapshot for step {step} (have {sorted(self.snapshots)})"]
        found = [f"parameter {i} differs by up to {(p - q).abs().max().item():.3g}"
                 for i, (p, q) in enumerate(zip(self.model.parameters(), snapshot.params)) if not torch.equal(p, q)]
        found += state_differences(self.opt.state_dict()["state"], snapshot.state["state"])
        self.rewind(step)
        return found

    def rewind(self, step: int) -> None:
        snapshot = self.snapshots[step]
        with torch.no_grad():
            for p, q in zip(self.ref.parameters(), snapshot.params):
                p.copy_(q)
        self.ref_opt = torch.optim.AdamW(self.ref.parameters(), fused=True, **HYPER)
        self.ref_opt.load_state_dict(copy.deepcopy(snapshot.state))
        self.step = step
        self.snapshots = {s: v for s, v in self.snapshots.items() if s <= step}

    def train(self, steps: int) -> int:
        for _ in range(steps):
            self.train_step()
        return self.step

    def train_step(self) -> None:
        """One step: the reference first (its snapshot kept), then stated (which may raise)."""
        n = self.step + 1
        x, y = batch(self.seed, n)
        loss_backward(self.ref, self.ref_opt, x, y)
        self.ref_opt.step()
        self.snapshots[n] = Snapshot(self.ref, self.ref_opt)
        loss_backward(self.model, self.opt, x, y)
        self.opt.step()
        self.step = n

    def checkpoint(self) -> int:
        durable = self.opt.checkpoint()
        self.durable.append(durable)
        # The two newest checkpoints stay on disk (stated.durability.job_files.KEEP); either may come back.
        oldest = self.durable[-2]
        self.snapshots = {s: v for s, v in self.snapshots.items() if s >= oldest}
        return durable

    def close(self, keep: bool = False) -> None:
        if self.opt is not None:
            self.opt.close(keep=keep)
            self.opt = None

    def forget(self) -> None:
        """Lets go of an optimizer whose daemon died (its Detach fails, or finds no such session)."""
        try:
            self.close()
        except stated.StatedError:
            self.opt = None
