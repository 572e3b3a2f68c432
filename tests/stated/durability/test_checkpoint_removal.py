"""Old checkpoints go (Note [removing old checkpoints] in stated.durability.checkpoint): a large one's
manifest at once and its data files on the background thread, a small one's files at once. Real files in
tmp_path; the large ones are sparse, so that they cost no disk."""

from __future__ import annotations

import os
import shutil
import types

from stated.durability import checkpoint, job_files


def make_checkpoint(directory: str, step: int, pages_bytes: int) -> None:
    for suffix in (".manifest", ".params", ".small"):
        with open(job_files.data_path(directory, step, suffix), "wb") as f:
            f.write(b"x" * 100)
    with open(job_files.data_path(directory, step, ".pages"), "wb") as f:
        f.truncate(pages_bytes)


def kept(*steps: int) -> list:
    """What _remove_older is told of the checkpoints it keeps: their steps and the .pages files they read."""
    return [types.SimpleNamespace(step=step, page_files={step}) for step in steps]


def names(directory: str) -> list[str]:
    return sorted(os.listdir(directory))


def files_of(*steps: int) -> list[str]:
    return sorted(f"{step}{suffix}" for step in steps for suffix in (".manifest", ".pages", ".params", ".small"))


def test_a_large_checkpoint_leaves_its_manifest_at_once_and_its_data_in_the_background(tmp_path):
    directory = str(tmp_path)
    for step in (1, 2, 3):
        make_checkpoint(directory, step, checkpoint.BACKGROUND_BYTES)
    checkpoint._remove_older(directory, kept(2, 3))
    assert job_files.committed_steps(directory) == [3, 2]  # every reader sees the two newest from now on
    checkpoint._settle_removal(directory)  # what the next checkpoint of the rank does first
    assert names(directory) == files_of(2, 3)
    checkpoint._settle_removal(directory)  # nothing pending any more


def test_a_small_checkpoint_goes_at_once(tmp_path):
    directory = str(tmp_path)
    for step in (4, 5, 6):
        make_checkpoint(directory, step, 64 << 20)
    checkpoint._remove_older(directory, kept(5, 6))
    assert names(directory) == files_of(5, 6)


def test_a_rank_dropped_while_its_files_go_is_no_error(tmp_path):
    directory = str(tmp_path / "rank-0")
    os.makedirs(directory)
    for step in (1, 2, 3):
        make_checkpoint(directory, step, checkpoint.BACKGROUND_BYTES)
    checkpoint._remove_older(directory, kept(2, 3))
    # `stated drop` removes the directory meanwhile, as remove_rank does: whatever the remover has not
    # unlinked yet (the two race for the same files, so neither may insist on any one of them).
    shutil.rmtree(directory, ignore_errors=True)
    checkpoint._settle_removal(directory)
    assert not os.path.exists(directory)
