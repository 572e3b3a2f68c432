"""What the adversarial tests share: the durability tests' model, training and daemon helpers, and checks
that a daemon took a user's mistake as a refusal (no INTERNAL, no traceback) and kept serving another job."""

from __future__ import annotations

import os

import stated
from e2e.test_durability import HYPER, assert_same, jobs, make_model, params_of, train, unique
from stated.cli import main

__all__ = ["HYPER", "assert_same", "jobs", "make_model", "params_of", "train", "unique", "Bystander",
           "assert_clean_log", "checkpoint_files", "checkpointed_job", "cli"]

SMALL_PAGES = ("--page-size", "64KiB")


def assert_clean_log(proc) -> None:
    """User mistakes are refusals: the daemon logged no traceback and no INTERNAL error."""
    log = proc.log()
    for sign in ("Traceback", "INTERNAL", "Task exception was never retrieved"):
        assert sign not in log, log[-4000:]


def cli(capsys, *args: str) -> tuple[int, str, str]:
    """`stated ARGS` in this process (the command's own code, without a Python start-up per call): its exit
    status, stdout and stderr."""
    capsys.readouterr()
    try:
        status = main(list(args))
    except SystemExit as exc:  # argparse's refusals
        status = exc.code
    out, err = capsys.readouterr()
    return status, out, err


def checkpoint_files(proc) -> list[str]:
    """Every file under the daemon's checkpoints folder, relative to it."""
    root = os.path.join(proc.directory, "state", "checkpoints")
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, names in os.walk(root) for f in names)


def checkpointed_job(proc, steps: int = 2, rank: int = 0, job: str | None = None, named: bool = False):
    """A job trained `steps` steps and checkpointed there: (its optimizer, its job, its parameters)."""
    job = job or unique("job")
    model = make_model(rank)
    opt = stated.AdamW(model.named_parameters() if named else model.parameters(), address=proc.address, job=job,
                       rank=rank, **HYPER)
    train(model, opt, 1, steps)
    assert opt.checkpoint() == steps
    return opt, job, params_of(model)


class Bystander:
    """A second job training beside the one a test abuses: it must step on and checkpoint untouched."""

    def __init__(self, proc, job: str | None = None):
        self.job = job or unique("bystander")
        self.model = make_model(seed=11)
        self.opt = stated.AdamW(self.model.parameters(), address=proc.address, job=self.job, **HYPER)
        self.steps = 0

    def step_and_checkpoint(self) -> None:
        train(self.model, self.opt, self.steps + 1, self.steps + 2)
        self.steps += 2
        assert self.opt.checkpoint() == self.steps

    def close(self) -> None:
        self.opt.close()
