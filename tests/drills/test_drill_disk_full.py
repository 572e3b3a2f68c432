"""Item 7 of issue 11: the disk fills up during a checkpoint (a small tmpfs as the node's directory).

opt.checkpoint() fails with RESOURCE_EXHAUSTED naming the file and the bytes, whether the data files or
the manifest found no room (none at all, or room for only the first block of the manifest); the previous
checkpoint stays whole (a daemon started after kill -9 recovers it, and resume=True brings back the
reference's state at its step); steps go on meanwhile, a --checkpoint-every checkpoint that fails does
not fail its step, and once there is room again checkpoints work.
Four jobs on one node, one way of running out of room each, so that one restart checks them all."""

from __future__ import annotations

import os
import re
import time

import stated
from drills import state_dir
from drills.devices import tmpfs
from drills.node import PAGE, Node, resume
from drills.units import Unit
from stated.paging.state_file import state_path

ROOM = 24 << 20
DATA = ("pages", "params", "small")


def fill(directory: str, leave: int) -> str:
    """A file that takes all but `leave` bytes of the file system's free space; returns its path."""
    path = os.path.join(directory, "spacer")
    st = os.statvfs(directory)
    size = st.f_bavail * st.f_frsize - leave
    assert size > 0, f"only {st.f_bavail * st.f_frsize} bytes free, cannot leave {leave}"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        os.posix_fallocate(fd, 0, size)
    finally:
        os.close(fd)
    return path


def allocated(paths) -> int:
    return sum(os.stat(p).st_blocks * 512 for p in paths)


# job -> (the room left as a function of the bytes its last checkpoint's data files took, the file named)
SCENARIOS = {
    "half-the-data": (lambda data: data // 2, "5.pages"),
    "no-room": (lambda data: 0, "5.pages"),
    "no-room-for-the-manifest": (lambda data: data, "5.manifest"),
    "one-block-of-the-manifest": (lambda data: data + 4096, "5.manifest"),
}


def test_disk_full_during_a_checkpoint_keeps_the_previous_one(tmp_path):
    with tmpfs(str(tmp_path / "node"), ROOM) as directory:
        # Logs elsewhere: a full disk takes no log lines. Step 5 is a --checkpoint-every one too.
        node = Node(directory, "--page-size", str(PAGE), "--checkpoint-every", "5", logs=tmp_path)
        node.start()
        try:
            # 122 tensors in 60 layers: a manifest of more than 8 KiB, so one block holds only part of it.
            units = [Unit(job, 0, 8, seed=i, depth=60) for i, job in enumerate(SCENARIOS)]
            for unit in units:
                unit.attach(node.address)
                assert unit.train(3) == unit.checkpoint() == 3
            for unit in units:
                leave, named = SCENARIOS[unit.job]
                files = state_dir.files(node.state, unit.job, 0, 3)
                assert os.path.getsize(files["manifest"]) > 8192
                spacer = fill(directory, leave(allocated(files[s] for s in DATA)))
                unit.train(2)  # its --checkpoint-every checkpoint fails, the step does not
                # That checkpoint is written behind the step's reply (Note [checkpoints behind the step]).
                deadline = time.monotonic() + 20
                while f"{named}: " not in node.log() and time.monotonic() < deadline:
                    time.sleep(0.05)
                assert f"{named}: " in node.log(), f"{unit.job}: the daemon's log does not name {named}"
                try:
                    unit.opt.checkpoint()
                    raise AssertionError(f"{unit.job}: the checkpoint at step 5 succeeded on a full disk")
                except stated.ResourceExhaustedError as refused:
                    message = str(refused)
                assert os.path.join(node.state, "checkpoints", unit.job, "rank-0", named) in message, message
                assert re.search(r"\(\d+ bytes\) needed", message), message
                assert state_dir.committed(node.state, unit.job, 0) == [3], unit.job
                assert state_dir.uncommitted(node.state) == [], f"{unit.job}: the failed checkpoint left files"
                assert unit.train(2) == 7  # training goes on
                os.remove(spacer)
            node.restart()
            assert node.recovered_problems({u.name: 3 for u in units}) == []
            assert node.bad_log_lines() == []
            for unit in units:
                assert resume(unit, node.address, 3) == []
                assert unit.train(1) == unit.checkpoint() == 4  # there is room again
        finally:
            node.kill()


def test_disk_full_when_a_paged_checkpoint_freezes_its_state_file(tmp_path):
    """A paged checkpoint needs room for its state file's next generation (Note [frozen state files]):
    without it, RESOURCE_EXHAUSTED naming that file and the bytes, the previous checkpoint whole, the
    state file as it was (no generation left half-made), training on, and checkpoints again once there
    is room."""
    with tmpfs(str(tmp_path / "node"), ROOM) as directory:
        node = Node(directory, "--host-memory", str(2 * PAGE), "--page-size", str(PAGE), logs=tmp_path)
        node.start()
        try:
            unit = Unit("paged-full", 0, 256, seed=5)
            unit.attach(node.address)
            assert unit.train(3) == unit.checkpoint() == 3
            live = state_path(node.state, unit.job, 0)
            spacer = fill(directory, os.path.getsize(live) // 2)
            unit.train(2)
            try:
                unit.opt.checkpoint()
                raise AssertionError("the paged checkpoint at step 5 succeeded on a full disk")
            except stated.ResourceExhaustedError as refused:
                message = str(refused)
            assert live[: -len(".state")] + ".next.state" in message, message
            assert re.search(r"\(\d+ bytes\) needed", message), message
            assert state_dir.committed(node.state, unit.job, 0) == [3]
            assert state_dir.uncommitted(node.state) == [], "the failed checkpoint left files"
            assert sorted(os.listdir(node.state)) == sorted(["checkpoints", ".lock", os.path.basename(live)])
            assert unit.train(2) == 7  # training goes on, from the one state file
            os.remove(spacer)
            assert unit.checkpoint() == 7  # there is room again
            node.restart()
            assert node.recovered_problems({unit.name: 7}) == []
            assert resume(unit, node.address, 7) == []
        finally:
            node.kill()
