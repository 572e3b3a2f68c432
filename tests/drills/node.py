"""A node of the drills: one --state-dir and the daemons started on it, one after another, each killed
with SIGKILL (or stopped) before the next; and the checks every drill makes after a restart."""

from __future__ import annotations

import os
import signal
import threading

from drills import state_dir
from drills.units import Unit
from stated.v1 import state_service_pb2 as pb
from support.daemon import DaemonProcess, named_segments

PAGE = 64 << 10
# What a daemon's log says when a checkpoint it finds is damaged, or when anything went wrong.
BAD_LOG_LINES = ("unusable", "trying an older checkpoint", "Traceback", " ERROR ")


class Node:
    """Daemons on `directory`/state, their logs in `logs` (default: `directory`)."""

    def __init__(self, directory, *flags: str, logs=None):
        self.directory, self.flags = str(directory), flags
        self.logs = str(logs or directory)
        self.state = os.path.join(self.directory, "state")
        self.daemon: DaemonProcess | None = None
        self.pids: list[int] = []

    @property
    def address(self) -> str:
        return self.daemon.address

    def start(self, kill_after: float | None = None) -> DaemonProcess:
        """A new daemon, serving once this returns; with `kill_after`, killed that many seconds after it
        was started, whether it serves by then or not (it may be recovering)."""
        daemon = DaemonProcess(self.directory, *self.flags)
        daemon.log_path = os.path.join(self.logs, f"daemon-{len(self.pids)}.log")
        self.daemon = daemon
        killer = None
        if kill_after is not None:
            killer = threading.Timer(kill_after, lambda: daemon.process and daemon.process.kill())
            killer.start()
        try:
            daemon.start()
        except RuntimeError:
            if killer is None or daemon.process.returncode != -signal.SIGKILL:
                raise
        finally:
            if daemon.process is not None:
                self.pids.append(daemon.process.pid)
        if killer is not None:
            killer.join()
            self.kill()
        return daemon

    def kill(self) -> None:
        self.daemon.stop(signal.SIGKILL)

    def restart(self) -> DaemonProcess:
        """kill -9 of the daemon, then a new one on the same state directory."""
        self.kill()
        return self.start()

    def stop(self) -> None:
        if self.daemon is not None:
            self.daemon.stop()

    def jobs(self) -> dict[str, pb.JobStats]:
        """GetStats' jobs by "JOB/RANK"."""
        channel, stub = self.daemon.stub()
        with channel:
            return {f"{j.job}/{j.rank}": j for j in stub.GetStats(self.daemon.everything(), timeout=10).jobs}

    def log(self) -> str:
        return self.daemon.log()

    def bad_log_lines(self) -> list[str]:
        return [line for line in self.log().splitlines() if any(word in line for word in BAD_LOG_LINES)]

    def recovered_problems(self, expected: dict[str, int]) -> list[str]:
        """What is wrong with the recovered jobs, against the step each (job, rank) must be recovered at."""
        jobs = self.jobs()
        problems = []
        for unit, step in expected.items():
            job = jobs.get(unit)
            if job is None or (job.state, job.step, job.durable, job.durable_step) != ("recovered", step, True, step):
                problems.append(f"{unit} should be recovered at step {step}; GetStats says {job}")
        left = state_dir.orphans(self.state)
        if left:
            problems.append(f"orphan files in the state directory after recovery: {left}")
        return problems

    def leaked_segments(self) -> list[str]:
        """stated names in /dev/shm after this node's daemons: arenas are memfds, so there must be none."""
        return named_segments()


def resume(unit: Unit, address: str, step: int) -> list[str]:
    """Resumes `unit` (a new optimizer, resume=True) and says how it differs from its reference at `step`."""
    unit.forget()
    resumed = unit.attach(address)
    if resumed != step:
        return [f"{unit.name} resumed at step {resumed}, expected {step}"]
    return unit.verify(step)
