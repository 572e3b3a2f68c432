"""Item 7 of issue 11: torn and damaged checkpoints (items 2 and 5 of the brief for the drills).

Each job of one paged node has checkpoints at steps 3 and 5; the daemon is killed with SIGKILL and one
file of each job's newest checkpoint is damaged in its own way. A torn manifest, or a data file cut
short, is found by the next daemon at recovery (the job comes back recovered at step 3); a flipped byte
in a data file passes recovery, which reads no pages, and is found by resume=True, which falls back to
step 3. Either way the daemon's log names the file, the trainer resumes at step 3 bit-identical to the
reference, and its next checkpoint (step 5 again) replaces the damaged one and comes back after another
kill -9. A job with both checkpoints damaged fails resume=True with DATA_LOSS naming both and the way
out, and stays recovered for `stated drop`."""

from __future__ import annotations

import os

import pytest

import stated
from drills import state_dir
from drills.node import PAGE, Node, resume
from drills.units import Unit
from stated.paging.state_file import HEADER_BYTES


def cut(path: str) -> None:
    os.truncate(path, os.path.getsize(path) // 2)


def flip(path: str) -> None:
    """XORs one byte of the file's first data: past the header of a frozen state file (a paged job's
    `.pages`, Note [frozen state files]), within the first 4096 bytes of any other."""
    with open(path, "r+b") as f:
        header = HEADER_BYTES if f.read(8) == b"STATEDPG" else 0
        offset = header + min((os.path.getsize(path) - header) // 2, 1000)
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x5A]))


# job -> (file of the newest checkpoint, what is done to it, the step the job is recovered at)
DAMAGE = {
    "manifest-cut": ("manifest", cut, 3),
    "manifest-flipped": ("manifest", flip, 3),
    "pages-cut": ("pages", cut, 3),
    "params-cut": ("params", cut, 3),
    "small-cut": ("small", cut, 3),
    "pages-flipped": ("pages", flip, 5),
    "params-flipped": ("params", flip, 5),
    "small-flipped": ("small", flip, 5),
}


@pytest.fixture
def node(tmp_path):
    node = Node(tmp_path, "--host-memory", str(8 * PAGE), "--page-size", str(PAGE))
    node.start()
    yield node
    node.kill()


def checkpointed(node: Node, job: str, steps=(3, 5)) -> Unit:
    unit = Unit(job, 0, 128, seed=len(job))
    unit.attach(node.address)
    for step in steps:
        assert unit.train(step - unit.step) == unit.checkpoint() == step
    unit.train(1)  # a step that is not durable
    return unit


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(node):
    units = [checkpointed(node, job) for job in DAMAGE]
    hopeless = checkpointed(node, "all-flipped")  # both of its checkpoints are damaged
    node.kill()
    for unit in units:
        suffix, damage, _ = DAMAGE[unit.job]
        damage(state_dir.files(node.state, unit.job, 0, 5)[suffix])
    both = [state_dir.files(node.state, hopeless.job, 0, step)["pages"] for step in (5, 3)]
    for path in both:
        flip(path)
    node.start()
    recovered = {u.name: DAMAGE[u.job][2] for u in units}
    assert node.recovered_problems({**recovered, hopeless.name: 5}) == []
    for unit in units:
        assert resume(unit, node.address, 3) == [], unit.job
        damaged = state_dir.files(node.state, unit.job, 0, 5)[DAMAGE[unit.job][0]]
        assert damaged in node.log(), f"{unit.job}: the daemon's log does not name {damaged}"
    check_a_clear_error(node, hopeless, both)
    for unit in units:
        assert unit.train(2) == unit.checkpoint() == 5
    node.restart()
    assert node.recovered_problems({**{u.name: 5 for u in units}, hopeless.name: 5}) == []
    assert node.bad_log_lines() == []
    for unit in units:
        assert resume(unit, node.address, 5) == [], unit.job


def check_a_clear_error(node: Node, unit: Unit, damaged: list[str]) -> None:
    """With every checkpoint damaged, resume=True is DATA_LOSS naming each and the way out."""
    unit.forget()
    with pytest.raises(stated.StateCorruptError) as refused:
        unit.attach(node.address)
    message = str(refused.value)
    for path in damaged:
        assert path in message, message
    assert "cannot be resumed" in message and f"stated drop {unit.job}" in message, message
