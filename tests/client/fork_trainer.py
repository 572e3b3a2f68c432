"""A trainer that forks children while it trains, for tests/client/test_fork.py:
`python tests/client/fork_trainer.py ADDRESS|embedded MODE...`.

It trains stated.AdamW beside torch.optim.AdamW(fused=True) from the same start; after a few steps it
forks a child per MODE and waits for it (at most CHILD_SECONDS, then kills it), steps again, and at the
end prints one JSON line: per mode the child's exit status, its seconds, what it reported, and whether the
parent stepped after it; then whether every parameter matched torch exactly. Modes, as the child ends:

  exit     falls off the end of the script (the interpreter's normal exit: atexit, finalizers)
  sys.exit calls sys.exit(0)
  os._exit calls os._exit(0)
  gc       drops its references to the optimizer, collects, then exits normally
  use      tries every method of the inherited optimizer and reports what each raised, then exits
  own      makes its own optimizer, trains it a step and closes it, then exits normally
"""

from __future__ import annotations

import gc
import json
import os
import signal
import sys
import time

import torch

import stated

CHILD_SECONDS = 30.0
USES = ("step", "zero_grad", "state_dict", "load_state_dict", "checkpoint", "add_param_group")


def try_uses(opt, model) -> dict[str, list]:
    calls = {"step": opt.step, "zero_grad": lambda: opt.zero_grad(set_to_none=False), "state_dict": opt.state_dict,
             "load_state_dict": lambda: opt.load_state_dict({"state": {}, "param_groups": opt.param_groups}),
             "checkpoint": opt.checkpoint,
             "add_param_group": lambda: opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))]})}
    seen = {}
    for name in USES:
        try:
            calls[name]()
            seen[name] = ["returned", ""]
        except Exception as exc:  # noqa: BLE001 - reported to the test
            seen[name] = [type(exc).__name__, str(exc), isinstance(exc, stated.StatedError)]
    grads = [p.grad for p in model.parameters()]
    seen["grads_intact"] = all(g is not None and bool(g.abs().sum() > 0) for g in grads)
    opt.close()  # releases nothing of the parent's
    seen["close"] = ["returned", ""]
    return seen


def own_optimizer(address: str | None) -> dict:
    model = torch.nn.Linear(3, 1)
    opt = stated.AdamW(model.parameters(), address=address, job=f"child-{os.getpid()}")
    model(torch.randn(2, 3)).sum().backward()
    opt.step()
    session = opt.session_id
    opt.close()
    return {"own_session": session}


def child(mode: str, opt, model, address: str | None, report: int) -> None:
    """Runs in the child; returns when the child is to exit normally."""
    result: dict = {}
    if mode == "use":
        result = try_uses(opt, model)
    elif mode == "own":
        result = own_optimizer(address)
    os.write(report, json.dumps(result).encode())
    os.close(report)
    if mode == "sys.exit":
        sys.exit(0)
    if mode == "os._exit":
        os._exit(0)


def wait(pid: int) -> tuple[int | None, float]:
    started = time.monotonic()
    while time.monotonic() - started < CHILD_SECONDS:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status), time.monotonic() - started
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return None, time.monotonic() - started  # hung


def main() -> dict | None:
    target, modes = sys.argv[1], sys.argv[2:]
    address = None if target == "embedded" else target
    torch.manual_seed(0)
    model, ref = torch.nn.Linear(8, 4), torch.nn.Linear(8, 4)
    ref.load_state_dict(model.state_dict())
    opt = stated.AdamW(model.parameters(), lr=1e-2, address=address, job="fork-parent")
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, fused=True)
    x = torch.randn(16, 8)

    def step() -> None:
        for m, o in ((model, opt), (ref, ref_opt)):
            o.zero_grad()
            m(x).square().mean().backward()
            o.step()

    results = {"session": opt.session_id, "step_channel": opt._step_line is not None, "modes": {}}
    for mode in modes:
        step()
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read)
            child(mode, opt, model, address, write)
            if mode == "gc":
                del opt
                gc.collect()
            return None  # the child ends here, as a script does
        os.close(write)
        code, seconds = wait(pid)
        with os.fdopen(read) as f:
            said = f.read()
        entry = {"code": code, "seconds": seconds, "child": json.loads(said) if said else None}
        try:
            step()
            entry["parent_stepped"] = True
        except stated.StatedError as exc:
            entry["parent_stepped"] = f"{type(exc).__name__}: {exc}"
        results["modes"][mode] = entry
    results["same_as_torch"] = all(torch.equal(p, q) for p, q in zip(model.parameters(), ref.parameters()))
    from stated_client import embedded
    results["embedded_alive"] = embedded.running_target() is not None if address is None else None
    opt.close()
    return results


if __name__ == "__main__":
    outcome = main()
    if outcome is not None:
        print(json.dumps(outcome), flush=True)
