"""What a drill reads of a daemon's --state-dir: the committed checkpoints of each rank, and anything else.

Note [what a state directory may hold]
--------------------------------------
After a daemon started and recovered (and before any trainer attaches) its state directory holds
`.lock` and `checkpoints/<job>/rank-<R>/<step>.{pages,params,small,manifest}`: at most KEEP (2)
checkpoints per rank, each with all four files. Page files (`*.state`), temporary manifests, data
files of a checkpoint never committed are orphans; `orphans` lists them.
"""

from __future__ import annotations

import os
import re

from stated.durability.job_files import KEEP, checkpoints_root, rank_directory

_FILE = re.compile(r"^(\d+)\.(pages|params|small|manifest)$")
SUFFIXES = ("pages", "params", "small", "manifest")
_DIRECTORY = re.compile(r"^checkpoints(/[^/]+(/rank-\d+)?)?$")
_CHECKPOINT_FILE = re.compile(r"^(checkpoints/[^/]+/rank-\d+)/(\d+)\.(?:pages|params|small|manifest)$")


def committed(state_dir: str, job: str, rank: int) -> list[int]:
    """Steps with a `<step>.manifest` in the rank's directory, newest first (the name alone, as a
    client that lists the directory sees it)."""
    directory = rank_directory(state_dir, job, rank)
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    return sorted((int(m.group(1)) for m in map(_FILE.match, names) if m and m.group(2) == "manifest"), reverse=True)


def uncommitted(state_dir: str) -> list[str]:
    """Files a checkpoint under way leaves: temporary manifests and data files without their manifest."""
    found = []
    for directory, _dirs, names in os.walk(checkpoints_root(state_dir)):
        steps = {m.group(1) for m in map(_FILE.match, names) if m and m.group(2) == "manifest"}
        for name in names:
            match = _FILE.match(name)
            if match is None or match.group(1) not in steps:
                found.append(os.path.join(directory, name))
    return sorted(found)


def orphans(state_dir: str) -> list[str]:
    """Everything the state directory holds beyond Note [what a state directory may hold]."""
    found, checkpoints = [], {}
    for directory, dirs, names in os.walk(state_dir):
        relative = os.path.relpath(directory, state_dir)
        found += [os.path.join(relative, d) + "/" for d in dirs
                  if not _DIRECTORY.match(os.path.normpath(os.path.join(relative, d)))]
        for name in names:
            path = os.path.normpath(os.path.join(relative, name))
            match = _CHECKPOINT_FILE.match(path)
            if match:
                checkpoints.setdefault(match.group(1), {}).setdefault(match.group(2), []).append(path)
            elif path != ".lock":
                found.append(path)
    for rank_dir, steps in checkpoints.items():
        for paths in steps.values():
            if len(paths) != len(SUFFIXES):  # a checkpoint without all four files
                found += paths
        if len(steps) > KEEP:
            found.append(f"{rank_dir}/: {len(steps)} checkpoints, more than {KEEP}")
    return sorted(found)


def files(state_dir: str, job: str, rank: int, step: int) -> dict[str, str]:
    """The paths of one checkpoint's four files, by suffix."""
    directory = rank_directory(state_dir, job, rank)
    return {s: os.path.join(directory, f"{step}.{s}") for s in SUFFIXES}
