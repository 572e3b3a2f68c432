"""A removal of checkpoints cut short half-way leaves no manifest without its data files.

The kill drill found it: a daemon killed while its recovery pruned an old checkpoint left that
checkpoint's manifest without its `.params`, and the next daemon reported it as damaged ("unusable");
a `stated drop` cut short the same way could bring a dropped job back. Here the removal is cut short by
data files the file system refuses to unlink (chattr +i), listed before their manifest: the manifests
must go first whatever order the directory lists its files in (Note [checkpoint order] backwards)."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from drills.devices import tmpfs
from stated.durability import job_files

DATA = ("3.pages", "3.params", "3.small")


def chattr(flag: str, paths) -> None:
    done = subprocess.run(["chattr", flag, *paths], capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"chattr {flag} does not work here: {done.stderr.strip()}")


@pytest.mark.parametrize("removal", ["prune", "remove_rank"])
def test_a_removal_cut_short_leaves_no_manifest_without_its_data(tmp_path, removal):
    if shutil.which("chattr") is None:
        pytest.skip("chattr is not installed")
    with tmpfs(str(tmp_path / "fs"), 1 << 20) as state:
        directory = job_files.rank_directory(state, "job", 0, create=True)
        for name in ("3.manifest",) + DATA:  # the manifest first: tmpfs lists the newest files first
            with open(os.path.join(directory, name), "wb") as f:
                f.write(b"x")
        names = os.listdir(directory)
        assert names.index("3.manifest") > min(names.index(n) for n in DATA), names
        stuck = [os.path.join(directory, n) for n in DATA]
        chattr("+i", stuck)
        try:
            if removal == "prune":
                with pytest.raises(PermissionError):
                    job_files.prune(directory, keep=set())
            else:
                job_files.remove_rank(state, "job", 0)  # best effort: what it cannot remove stays
            assert job_files.committed_steps(directory) == [], "a manifest is left without its data"
            assert sorted(os.listdir(directory)) == sorted(DATA)
        finally:
            chattr("-i", stuck)
