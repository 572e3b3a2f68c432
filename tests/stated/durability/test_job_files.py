"""The files of a rank's checkpoints: committed steps, pruning of old and orphan files, job names."""

from __future__ import annotations

import os

from stated.durability import job_files


def touch(directory, *names):
    for name in names:
        open(os.path.join(directory, name), "w").close()


def test_committed_steps_are_those_with_a_manifest_newest_first(tmp_path):
    touch(tmp_path, "3.manifest", "3.pages", "12.manifest", "12.pages", "20.pages", "21.manifest.tmp")
    assert job_files.committed_steps(str(tmp_path)) == [12, 3]
    assert job_files.committed_steps(str(tmp_path / "missing")) == []


def test_prune_keeps_only_the_checkpoints_named(tmp_path):
    touch(tmp_path, *(f"{s}.{k}" for s in (3, 12) for k in ("manifest", "pages", "params", "small")),
          "20.pages", "20.params", "21.manifest.tmp", "stray")
    removed = job_files.prune(str(tmp_path), keep={12})
    assert sorted(os.listdir(tmp_path)) == ["12.manifest", "12.pages", "12.params", "12.small"]
    assert len(removed) == 8  # step 3 (4 files), the orphans of 20, the temporary, the stray


def test_job_names_cannot_leave_the_directory_and_scan_gives_them_back(tmp_path):
    for job, rank in (("../escape", 0), (".hidden", 1), ("a b/c", 2), ("plain", 3)):
        path = job_files.rank_directory(str(tmp_path), job, rank, create=True)
        assert os.path.realpath(path).startswith(os.path.realpath(tmp_path / "checkpoints") + os.sep)
    found = {(job, rank) for job, rank, _ in job_files.scan(str(tmp_path))}
    assert found == {("../escape", 0), (".hidden", 1), ("a b/c", 2), ("plain", 3)}


def test_remove_rank_removes_the_job_directory_with_its_last_rank(tmp_path):
    for rank in (0, 1):
        touch(job_files.rank_directory(str(tmp_path), "j", rank, create=True), "1.pages")
    job_files.remove_rank(str(tmp_path), "j", 0)
    assert os.listdir(tmp_path / "checkpoints" / "j") == ["rank-1"]
    job_files.remove_rank(str(tmp_path), "j", 1)
    assert os.listdir(tmp_path / "checkpoints") == []
