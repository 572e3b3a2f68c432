"""A forked child never detaches, steps or waits on its parent's session (issue 12, item 7; Note [forked
children] in stated_client.fork_guard), on a real daemon.

The finding: a plain os.fork() child that exited (a DataLoader worker, for one) detached the parent's
session through its copy of the optimizer's finalizer, then hung in a gRPC wait. The trainers here are
real processes (tests/client/fork_trainer.py) whose children end as scripts do; the DataLoader cases run
in this process, whose workers torch forks (or spawns) itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import stated
from stated.v1 import state_service_pb2 as pb

TRAINER = os.path.join(os.path.dirname(__file__), "fork_trainer.py")
MODES = ("exit", "sys.exit", "os._exit", "gc", "use", "own")
# A child of a process that loaded torch takes 1 to 4 s to exit on a loaded two-core machine; the trainer
# kills one after 30 s (it hung forever before), and this bounds the whole run.
RUN_SECONDS = 300


def run_trainer(target: str, *modes: str, env: dict | None = None) -> dict:
    result = subprocess.run([sys.executable, TRAINER, target, *modes], capture_output=True, text=True,
                            timeout=RUN_SECONDS, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def forked(daemon):
    """One trainer that forks a child per mode against the module's daemon."""
    return run_trainer(daemon.address, *MODES), daemon


def detaches_of(daemon, session: str, wait: float = 10.0) -> list[str]:
    """The daemon's log lines of `session`'s detach, waiting up to `wait` s for the first: the daemon
    answers Detach and logs it concurrently, and its log reaches the file when its stream flushes."""
    deadline = time.monotonic() + wait
    while True:
        lines = [line for line in daemon.log().splitlines() if "detach" in line and f"session={session}" in line]
        if lines or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


@pytest.mark.parametrize("mode", ["exit", "sys.exit", "os._exit", "gc"])
def test_a_child_that_exits_leaves_the_parents_session_and_does_not_hang(forked, mode):
    results, _ = forked
    entry = results["modes"][mode]
    assert entry["code"] == 0, f"the child {'hung' if entry['code'] is None else 'failed'}: {entry}"
    assert entry["seconds"] < 25, entry
    assert entry["parent_stepped"] is True, entry


def test_the_parent_matches_torch_exactly_and_detaches_once_at_its_close(forked):
    results, daemon = forked
    assert results["same_as_torch"]
    assert results["step_channel"], "the step channel was not used: its socket was not exercised"
    assert [line.split("reason=")[1].split()[0] for line in detaches_of(daemon, results["session"])] == ["client"]


def test_using_the_inherited_optimizer_raises_naming_its_owner(forked):
    results, _ = forked
    seen = results["modes"]["use"]["child"]
    for name in ("step", "zero_grad", "state_dict", "load_state_dict", "checkpoint", "add_param_group"):
        kind, message, is_stated = seen[name]
        assert kind == "InheritedSessionError" and is_stated, (name, seen[name])
        assert "belongs to process" in message and "is a fork of it" in message, message
        assert "Create this process's own optimizer" in message, message
    assert seen["grads_intact"], "zero_grad in the child zeroed the parent's gradients"
    assert seen["close"] == ["returned", ""]
    assert results["modes"]["use"]["parent_stepped"] is True


def test_a_child_may_make_and_close_its_own_optimizer(forked):
    results, daemon = forked
    entry = results["modes"]["own"]
    assert entry["code"] == 0 and entry["parent_stepped"] is True, entry
    own = entry["child"]["own_session"]
    assert own != results["session"]
    assert [line.split("reason=")[1].split()[0] for line in detaches_of(daemon, own)] == ["client"]


def test_a_childs_exit_leaves_the_parents_private_daemon(tmp_path):
    """The embedded default: the child's exit neither stops the parent's private daemon nor removes it."""
    runtime = tempfile.mkdtemp(dir=tmp_path)
    os.chmod(runtime, 0o700)
    env = {k: v for k, v in os.environ.items() if k not in ("STATED_ADDRESS", "STATED_EMBEDDED")}
    env["XDG_RUNTIME_DIR"] = runtime  # no daemon answers at the default socket there
    results = run_trainer("embedded", "exit", "sys.exit", "own", env=env)
    for mode in ("exit", "sys.exit", "own"):
        assert results["modes"][mode]["code"] == 0 and results["modes"][mode]["parent_stepped"] is True
    assert results["embedded_alive"] and results["same_as_torch"]


def test_an_inherited_optimizer_is_refused_even_without_the_at_fork_hook(address):
    """The pid check alone (a fork that skipped the hooks): the optimizer refuses in another process."""
    opt = stated.AdamW(torch.nn.Linear(2, 2).parameters(), address=address)
    try:
        opt._owner += 1_000_000  # as if this process were a fork of another
        with pytest.raises(stated.InheritedSessionError, match=f"belongs to process {opt._owner}"):
            opt.step()
        opt.close()  # releases nothing: the session is still attached
        assert opt._connection.call("GetStats", pb.GetStatsRequest(session=opt._session)).sessions
    finally:
        opt._owner -= 1_000_000
        opt.close()


# --- DataLoader workers ---------------------------------------------------------------------------

def loader(context: str, seed: int) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    data = TensorDataset(torch.randn(96, 10, generator=generator), torch.randn(96, 3, generator=generator))
    # Workers end with every epoch (persistent_workers off): each epoch's children exit while we train.
    return DataLoader(data, batch_size=16, num_workers=2, multiprocessing_context=context, timeout=60)


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_dataloader_workers_while_training_match_torch(daemon, context):
    torch.manual_seed(1)
    model, ref = torch.nn.Linear(10, 3), torch.nn.Linear(10, 3)
    ref.load_state_dict(model.state_dict())
    opt = stated.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, address=daemon.address,
                       job=f"loader-{context}")
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1, fused=True)
    try:
        steps = 0
        for epoch in range(3):
            for x, y in loader(context, epoch):
                for m, o in ((model, opt), (ref, ref_opt)):
                    o.zero_grad()
                    torch.nn.functional.mse_loss(m(x), y).backward()
                    o.step()
                steps += 1
            for p, q in zip(model.parameters(), ref.parameters()):
                assert torch.equal(p, q), f"epoch {epoch}"
        stats = opt._connection.call("GetStats", pb.GetStatsRequest(session=opt._session))
        assert [s.steps for s in stats.sessions] == [steps] == [18]
        assert detaches_of(daemon, opt.session_id, wait=0) == []
    finally:
        opt.close()
