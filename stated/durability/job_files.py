"""Where a (job, rank)'s checkpoints live under --state-dir, and the pruning of old and orphan files.

    <state-dir>/checkpoints/<job, percent-encoded>/rank-<R>/<step>.{pages,params,small,manifest}

The newest KEEP checkpoints of a rank stay, so that a damaged newest one (torn data found at resume)
still has one to fall back to; anything else in the directory (older checkpoints, data files of a
checkpoint whose manifest was never committed, temporary manifests) is removed by `prune`.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import urllib.parse

from stated.paging.state_file_space import sync_directory
from stated.paging.state_file import encoded_job_name

log = logging.getLogger("stated.durability.job_files")

KEEP = 2
DATA_SUFFIXES = (".pages", ".params", ".small")
_NAME = re.compile(r"^(\d+)\.(pages|params|small|manifest)(\.tmp)?$")


def checkpoints_root(state_dir: str) -> str:
    return os.path.join(state_dir, "checkpoints")


def rank_directory(state_dir: str, job: str, rank: int, create: bool = False) -> str:
    path = os.path.join(checkpoints_root(state_dir), encoded_job_name(job), f"rank-{rank}")
    if create:
        os.makedirs(path, mode=0o700, exist_ok=True)
    return path


def data_path(directory: str, step: int, suffix: str) -> str:
    return os.path.join(directory, f"{step}{suffix}")


def committed_steps(directory: str) -> list[int]:
    """Steps of the committed checkpoints (those with a manifest), newest first."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    steps = []
    for name in names:
        match = _NAME.match(name)
        if match and match.group(2) == "manifest" and not match.group(3):
            steps.append(int(match.group(1)))
    return sorted(steps, reverse=True)


def prune(directory: str, keep: set[int], pages_of: set[int] = frozenset()) -> list[str]:
    """Removes every file of the directory that is not part of a checkpoint in `keep`, except the
    `.pages` files of the steps in `pages_of` (which kept checkpoints still read); returns them.

    Note [checkpoint order] backwards: the manifests go first, and the directory is synced, before any
    data file. A crash half-way then leaves data files without a manifest, orphans the next recovery
    removes, never a manifest without its data, which that recovery would report as a damaged
    checkpoint (and, after `stated drop`, bring back as a recovered job)."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    doomed = []
    for name in names:
        match = _NAME.match(name)
        if match and not match.group(3) and (int(match.group(1)) in keep
                                              or match.group(2) == "pages" and int(match.group(1)) in pages_of):
            continue
        path = os.path.join(directory, name)
        if os.path.isfile(path) or os.path.islink(path):
            doomed.append(path)
    removed = []
    for commits in (True, False):
        batch = [p for p in doomed if p.endswith(".manifest") == commits]
        for path in batch:
            os.unlink(path)
            removed.append(path)
        if batch:
            sync_directory(directory)
    return removed


def remove_rank(state_dir: str, job: str, rank: int) -> None:
    """Deletes every checkpoint of (job, rank), manifests first (see `prune`), and the job's directory
    once no rank is left."""
    directory = rank_directory(state_dir, job, rank)
    try:
        prune(directory, keep=set())
    except OSError:
        pass  # what is left goes below, or stays for the next recovery to remove
    shutil.rmtree(directory, ignore_errors=True)
    parent = os.path.dirname(directory)
    try:
        os.rmdir(parent)
    except OSError:
        pass  # other ranks remain, or it was never made


def scan(state_dir: str) -> list[tuple[str, int, str]]:
    """(job, rank, directory) of every rank directory under the state directory."""
    root = checkpoints_root(state_dir)
    found = []
    try:
        jobs = sorted(os.listdir(root))
    except FileNotFoundError:
        return found
    for encoded in jobs:
        job_dir = os.path.join(root, encoded)
        if not os.path.isdir(job_dir):
            continue
        for name in sorted(os.listdir(job_dir)):
            match = re.match(r"^rank-(\d+)$", name)
            path = os.path.join(job_dir, name)
            if match and os.path.isdir(path):
                job, rank = urllib.parse.unquote(encoded), int(match.group(1))
                if rank_directory(state_dir, job, rank) != path:
                    # Not a name this daemon writes ("rank-007", "my job"): resume and drop would look for
                    # the other, so it is left alone, not recovered.
                    log.warning("ignored %s: it is not named as this daemon names job %r rank %d (%s)", path, job,
                                rank, rank_directory(state_dir, job, rank))
                    continue
                found.append((job, rank, path))
    return found


def rank_directory_of(manifest_path: str) -> str:
    return os.path.dirname(manifest_path)
