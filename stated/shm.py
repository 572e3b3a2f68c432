"""POSIX shared memory segments that the daemon creates for arenas.

The daemon creates every segment itself (O_CREAT | O_EXCL, mode 0600, or 0660 with a group) under a
name it chooses, and removes it when the session ends: it never opens a path a client named. Names
carry the daemon's pid, so that a daemon starting after a crash can sweep segments whose creator is
dead (`sweep_stale`).

We work on /dev/shm directly rather than through multiprocessing.shared_memory, whose resource
tracker would unlink segments behind our back (PERFORMANCE.md, Python 3.11 pitfall).
"""

from __future__ import annotations

import mmap
import os
import secrets

import torch

# One definition for both sides: the client checks that a name it is sent carries this prefix.
from stated_client.protocol import PREFIX, SHM_DIR


def segment_name(kind: str) -> str:
    return f"{PREFIX}{os.getpid()}-{kind}-{secrets.token_hex(6)}"


class Segment:
    """A shared memory segment mapped into this process, as a flat uint8 torch tensor."""

    def __init__(self, name: str, nbytes: int, mm: mmap.mmap, owner: bool):
        self.name = name
        self.nbytes = nbytes
        self._mmap = mm
        self._owner = owner
        # A zero-length mapping is not allowed; such a segment holds one spare byte.
        self.tensor = torch.frombuffer(mm, dtype=torch.uint8, count=nbytes) if nbytes else torch.empty(0, dtype=torch.uint8)

    @classmethod
    def create(cls, kind: str, nbytes: int, mode: int = 0o600, gid: int | None = None) -> "Segment":
        name = segment_name(kind)
        path = os.path.join(SHM_DIR, name)
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, mode)
        try:
            if gid is not None:
                os.fchown(fd, -1, gid)
            os.fchmod(fd, mode)  # the umask must not narrow a 0660 request
            os.ftruncate(fd, max(nbytes, 1))
            mm = mmap.mmap(fd, max(nbytes, 1), mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            os.unlink(path)
            raise
        os.close(fd)
        return cls(name, nbytes, mm, owner=True)

    def unlink(self) -> None:
        """Removes the name; memory stays mapped until every process lets go of it."""
        if self._owner:
            try:
                os.unlink(os.path.join(SHM_DIR, self.name))
            except FileNotFoundError:
                pass
            self._owner = False

    def close(self) -> None:
        """Unlinks (if ours) and drops our mapping once no tensor views keep it alive."""
        self.unlink()
        self.tensor = None
        try:
            self._mmap.close()
        except BufferError:
            pass  # torch views still exist; the mapping goes when they do


def list_segments() -> list[str]:
    try:
        return sorted(n for n in os.listdir(SHM_DIR) if n.startswith(PREFIX))
    except FileNotFoundError:
        return []


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale() -> list[str]:
    """Removes segments left by stated daemons that are no longer running; returns their names."""
    removed = []
    for name in list_segments():
        try:
            pid = int(name[len(PREFIX):].split("-", 1)[0])
        except ValueError:
            continue
        try:
            mine = os.stat(os.path.join(SHM_DIR, name)).st_uid == os.getuid()
        except OSError:
            continue
        if mine and pid != os.getpid() and not _pid_alive(pid):
            try:
                os.unlink(os.path.join(SHM_DIR, name))
                removed.append(name)
            except OSError:
                pass
    return removed
