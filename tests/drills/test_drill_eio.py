"""Item 7 of issue 11: EIO on read and on write from a real failing device (Note [a failing loop
device] in drills.devices: ext4 on a loop device whose end is cut off, since this kernel has no
device-mapper). Each is a clear error, DATA_LOSS naming the file or the page, and nothing durable is lost:
  - a checkpoint whose files land on failed blocks fails naming the file; the previous one stays whole,
    training goes on, and a daemon started after kill -9 recovers the previous one;
  - the newest checkpoint unreadable at resume=True: the daemon's log names the file, the resume falls
    back to the previous checkpoint, bit-identical to the reference;
  - a paged job's state file on failed blocks: the step fails naming the page and the file, the next
    step is refused naming the way back, and resume=True goes on from the checkpoint."""

from __future__ import annotations

import os

import pytest

import stated
from drills import state_dir
from drills.devices import end_of_data, extents, loop_ext4
from drills.node import PAGE, Node, resume
from drills.units import Unit
from stated.paging.state_file import state_path

DISK = 256 << 20
EIO = os.strerror(5)  # "Input/output error"


def starts(paths) -> int:
    return min(start for path in paths for start, _length in extents(path))


def ends(paths) -> int:
    return max(start + length for path in paths for start, length in extents(path))


def checkpoint_files(node: Node, unit: Unit, step: int) -> list[str]:
    return list(state_dir.files(node.state, unit.job, unit.rank, step).values())


def test_eio_writing_a_checkpoint_and_reading_one_at_resume(tmp_path):
    with loop_ext4(str(tmp_path / "disk"), DISK) as disk:
        node = Node(disk.path, "--page-size", str(PAGE), logs=tmp_path)
        node.start()
        try:
            writer, reader = Unit("eio-write", 0, 128, seed=1), Unit("eio-read", 0, 128, seed=2)
            for unit in (writer, reader):
                unit.attach(node.address)
                assert unit.train(3) == unit.checkpoint() == 3
            assert reader.train(2) == reader.checkpoint() == 5
            reader.train(1)

            writer.train(2)
            disk.limit(end_of_data(disk.path))  # every block not yet written fails
            with pytest.raises(stated.StateCorruptError) as refused:
                writer.opt.checkpoint()
            disk.limit(0)
            message = str(refused.value)
            assert f"checkpoint file {node.state}/checkpoints/eio-write/rank-0/5." in message and EIO in message, \
                message
            assert state_dir.committed(node.state, "eio-write", 0) == [3]
            assert state_dir.uncommitted(node.state) == [], "the failed checkpoint left files behind"
            assert writer.train(1) == 6  # training goes on

            node.restart()
            assert node.recovered_problems({writer.name: 3, reader.name: 5}) == []
            assert resume(writer, node.address, 3) == []
            # Then every block past the reader's step 3 fails, which takes some of its step 5 (the disk
            # allocates files as streams, one after the other: drills.devices.loop_ext4).
            newest, kept = checkpoint_files(node, reader, 5), checkpoint_files(node, reader, 3)
            assert ends(newest) > ends(kept), "every block of step 5 lies before the end of step 3"
            disk.limit(ends(kept))
            assert resume(reader, node.address, 3) == []  # step 5 cannot be read: the resume falls back
            failed = [line for line in node.log().splitlines() if "trying an older checkpoint" in line]
            assert failed and f"{node.state}/checkpoints/eio-read/rank-0/5." in failed[0] and EIO in failed[0], \
                node.log()
            disk.limit(0)
            for unit in (writer, reader):
                assert unit.train(2) == unit.checkpoint() == 5
        finally:
            node.kill()


def test_eio_on_a_paged_jobs_state_file(tmp_path):
    with loop_ext4(str(tmp_path / "disk"), DISK) as disk:
        node = Node(disk.path, "--host-memory", str(2 * PAGE), "--page-size", str(PAGE), logs=tmp_path)
        node.start()
        try:
            unit = Unit("eio-page", 0, 256, seed=3)
            unit.attach(node.address)
            assert unit.train(3) == unit.checkpoint() == 3
            unit.train(1)
            pages = state_path(node.state, "eio-page", 0)
            disk.limit(starts([pages]))
            with pytest.raises(stated.StateCorruptError) as refused:
                unit.train(1)
            message = str(refused.value)
            assert "page " in message and pages in message and EIO in message, message
            with pytest.raises(stated.FailedPreconditionError) as again:
                unit.opt.step()
            assert "checkpoint at step 3" in str(again.value) and "resume=True" in str(again.value), again.value
            disk.limit(0)
            unit.close(keep=True)
            assert resume(unit, node.address, 3) == []
            assert unit.train(2) == unit.checkpoint() == 5
        finally:
            node.kill()
