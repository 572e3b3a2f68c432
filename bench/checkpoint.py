"""Checkpoint time of a stated.AdamW job against torch.save of the same state and the disk's bandwidth.

A model of --params float32 CPU parameters with stated.AdamW, once fully resident and once paged
(--host-memory at 25% of the optimizer state), each on its own daemon whose --state-dir is under --dir.
These are timed in one rotation (PERFORMANCE.md: A, B, C, D, A, B, ...), each sample after a step
so that the checkpoint has something new to write:

- checkpoint: `opt.checkpoint()`, the daemon writing every page (a paged job: its resident pages into
  its state file, which it then freezes as the checkpoint's pages file, its spilled pages being there
  already), the param arenas and the small state with O_DIRECT, fsyncing them, then committing the
  manifest (stated/durability/checkpoint.py); the bytes are the committed manifest's data files (all
  its pages, wherever they were written); and the step right after it returns;
- torch.save: `torch.save({"optimizer": opt.state_dict(), "model": model.state_dict()}, file)` to a new
  file in --dir, then `os.fsync` of it (durable, as the checkpoint is). The state_dict() is fetched from
  the daemon before the timer starts: a torch.optim.AdamW's user has it at hand, so only the save counts;
- disk: the disk's sequential write bandwidth, measured twice each round: as many bytes as the
  checkpoint holds, written to a new posix_fallocate'd file in --dir opened with O_DIRECT from one
  4096-aligned 64 MiB buffer, then fsync; once in 64 MiB pwrites one at a time (as `dd oflag=direct
  bs=64M conv=fsync` writes), once in 8 MiB pwrites four at a time. The round's bandwidth is the faster;
- step: a normal step (one that follows a step).

Then the restart: after a step and a checkpoint the daemon is killed with SIGKILL and a new one started
on the same --state-dir (the trainer's model is built before the timer starts). Timed from the start of
the new process: until it answers the health check SERVING, until a `resume=True` optimizer is
constructed (the pages are read from the checkpoint then), and until that optimizer's first step returns.

    python bench/checkpoint.py [--params 200M] [--samples 5] [--restarts 3] [--modes resident,paged]
                               [--baseline-tree DIR]

With --baseline-tree, a second job runs on a daemon from another checkout (`git worktree add DIR REV`):
its checkpoints take turns with this tree's in the rotation, its restarts with this tree's restarts, and
the last lines give this tree's times over the baseline tree's, so that a change is measured against
the code before it in one run.

Targets (issue 11): checkpoint bytes/s at least 0.8 of the disk's write bandwidth; torch.save at least 2x
the checkpoint's time. Memory: the trainer holds the model, its gradients and, for torch.save, a copy of
the optimizer state (about 16 bytes per parameter); the daemon the arenas and the state (about 16 more).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import dataclasses
import gc
import mmap
import os
import re
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402

from common import BenchDaemon, human, ratios, rotated  # noqa: E402
from cpu_step import make_params, parse_count  # noqa: E402
from paging import session_stats  # noqa: E402

JOB = "checkpoint-bench"
PROBE_BUFFER = 64 << 20
# The disk probe's two ways to write (bytes per pwrite, writes in flight): one large write at a time, as
# `dd oflag=direct bs=64M` does, and 8 MiB writes four at a time; each round takes the faster.
PROBES = ((64 << 20, 1), (8 << 20, 4))


def disk_write(directory: str, nbytes: int, buffer: mmap.mmap, piece: int, in_flight: int) -> float:
    """Seconds to write `nbytes` sequentially to a new posix_fallocate'd file in `directory` opened with
    O_DIRECT, in `piece`-byte pwrites of `buffer`, `in_flight` of them at a time, then fsync."""
    path = os.path.join(directory, f"disk-probe-{os.getpid()}")
    nbytes = -(-nbytes // 4096) * 4096  # O_DIRECT moves whole 4096-byte blocks
    view = memoryview(buffer)

    def write(offset: int) -> None:
        n = min(piece, nbytes - offset)
        start = offset % len(buffer) // piece * piece
        if os.pwrite(fd, view[start: start + n], offset) != n:
            raise OSError(f"short write to {path}")

    start = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_DIRECT, 0o600)
    try:
        os.posix_fallocate(fd, 0, nbytes)
        with cf.ThreadPoolExecutor(in_flight) as pool:
            list(pool.map(write, range(0, nbytes, piece)))
        os.fsync(fd)
        return time.perf_counter() - start
    finally:
        os.close(fd)
        os.unlink(path)


def torch_save(directory: str, state: dict) -> tuple[float, int]:
    """Seconds to torch.save `state` to a new file in `directory` and fsync it, and the file's size."""
    path = os.path.join(directory, f"torch-save-{os.getpid()}.pt")
    start = time.perf_counter()
    try:
        with open(path, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        return time.perf_counter() - start, os.path.getsize(path)
    finally:
        os.unlink(path)


def checkpoint_bytes(state_dir: str) -> tuple[int, int]:
    """The data bytes of the newest committed checkpoint of the bench's job, and those of its pages (its
    manifest says)."""
    from stated.durability import job_files
    from stated.durability.manifest import read_manifest
    from stated.paging.state_file import align_up

    directory = job_files.rank_directory(state_dir, JOB, 0)
    newest = job_files.committed_steps(directory)[0]
    manifest = read_manifest(job_files.data_path(directory, newest, ".manifest"))
    return manifest.data_bytes, len(manifest.page_checksums) * align_up(manifest.page_bytes)


def daemon_flags(state_dir: str, budget: int | None) -> list[str]:
    # --exit-with-parent: a bench that fails half-way leaves no daemon behind.
    return ["--state-dir", state_dir, "--exit-with-parent", *(["--host-memory", str(budget)] if budget else [])]


class Job:
    """A daemon (from this tree, or from `tree`) and a stated.AdamW over a model of its own."""

    def __init__(self, daemon: BenchDaemon, flags: list[str], params: list[torch.nn.Parameter], tree: str | None,
                 resume: bool = False):
        import stated

        self.daemon, self.flags, self.params, self.tree = daemon, flags, params, tree
        self.model = torch.nn.ParameterList(params)
        self.opt = stated.AdamW(params, lr=1e-3, address=daemon.address, job=JOB, resume=resume)

    @classmethod
    def start(cls, n: int, flags: list[str], tree: str | None = None) -> Job:
        return cls(BenchDaemon(*flags, tree=tree), flags, make_params(n), tree)

    def state(self) -> dict:
        """What torch.save is given."""
        return {"optimizer": self.opt.state_dict(), "model": self.model.state_dict()}

    def close(self) -> None:
        self.opt.close()  # drops the state and its checkpoints, so that stopping the daemon writes none
        self.daemon.stop()


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


class Checkpoints:
    """The rotation's checkpoint of one job: a step, then the timed opt.checkpoint(), then the step right
    after it (timed too), and the bytes the pager read and wrote meanwhile (a paged job writes its
    resident pages into its state file, which the checkpoint freezes; before that change, it read its
    spilled pages back to copy them)."""

    def __init__(self, job: Job):
        self.job, self.seconds, self.after, self.read, self.written = job, [], [], [], []

    def __call__(self) -> float:
        opt = self.job.opt
        opt.step()
        before = session_stats(opt)
        seconds = timed(opt.checkpoint)
        later = session_stats(opt)
        self.after.append(timed(opt.step))
        self.read.append(later.bytes_read - before.bytes_read)
        self.written.append(later.bytes_written - before.bytes_written)
        return seconds

    def drop_warmup(self, warmup: int) -> Checkpoints:
        self.after, self.read, self.written = self.after[warmup:], self.read[warmup:], self.written[warmup:]
        return self


def rotation(jobs: list[Job], work_dir: str, nbytes: int, page_bytes: int, samples: int, warmup: int, label: str):
    """The timings of the module docstring, rotated: a checkpoint of each job (this tree's, then the
    baseline tree's), then torch.save, the disk probes and a normal step of the first job."""
    job = jobs[0]
    buffer = mmap.mmap(-1, PROBE_BUFFER)
    buffer.write(os.urandom(PROBE_BUFFER))
    checkpoints = [Checkpoints(j) for j in jobs]
    saved = [0]

    def save() -> float:
        job.opt.step()
        state = job.state()
        seconds, saved[0] = torch_save(work_dir, state)
        del state
        gc.collect()
        return seconds

    def step() -> float:
        job.opt.step()
        return timed(job.opt.step)

    def progress(done: int, total: int) -> None:
        print(f"  {label}: round {done} of {total} done{' (warm-up)' if done <= warmup else ''}", flush=True)

    probes = [lambda piece=piece, k=k: disk_write(work_dir, nbytes, buffer, piece, k) for piece, k in PROBES]
    times = rotated([*checkpoints, save, *probes, step], samples, warmup, progress)
    for c, seconds in zip(checkpoints, times):
        c.seconds = seconds
        c.drop_warmup(warmup)
    return Rounds(nbytes, page_bytes, checkpoints, times[len(jobs)], times[len(jobs) + 1: -1], times[-1], saved[0])


@dataclasses.dataclass
class Rounds:
    """What one mode's rotation measured, each list one entry per timed round."""

    nbytes: int  # a checkpoint's data bytes
    page_bytes: int  # of them, its pages'
    checkpoints: list[Checkpoints]  # this tree's, then the baseline tree's
    save: list[float]
    probes: list[list[float]]  # seconds of each of PROBES
    step: list[float]
    saved: int  # the torch.save file's bytes

    @property
    def disk(self) -> list[float]:
        """Each round's disk write time: the faster of the probes."""
        return [min(seconds) for seconds in zip(*self.probes)]


def restart(jobs: list[Job | None], i: int, n: int, label: str) -> tuple[float, float, float]:
    """SIGKILL after a checkpoint, a new daemon on the same state directory, a resumed job in place of
    jobs[i]. Returns the seconds from the new process's start until it was healthy, the resumed optimizer
    existed, and its first step returned."""
    job, jobs[i] = jobs[i], None
    job.opt.step()
    step = job.opt.checkpoint()
    params = make_params(n)  # the restarted trainer's model, built before the clock starts
    flags, tree = job.flags, job.tree
    job.daemon.kill()
    del job  # the trainer lets go of the dead daemon's arenas (the new daemon removes their names)
    gc.collect()
    start = time.perf_counter()
    daemon = BenchDaemon(*flags, tree=tree)
    while not daemon.healthy():
        time.sleep(0.01)
    healthy = time.perf_counter() - start
    job = jobs[i] = Job(daemon, flags, params, tree, resume=True)
    attached = time.perf_counter() - start
    job.opt.step()
    served = time.perf_counter() - start
    if job.opt.resumed_step != step:
        raise RuntimeError(f"{label}: resumed at step {job.opt.resumed_step}, the checkpoint holds {step}")
    recovered = re.search(r"recovered 1 jobs from .* in ([0-9.]+) s", open(daemon.log.name).read())
    recovery = recovered.group(1) if recovered else "?"
    print(f"  {label}: restart: healthy after {healthy:.2f} s (recovery itself {recovery} s), resumed optimizer "
          f"after {attached:.2f} s, first step returned after {served:.2f} s", flush=True)
    return healthy, attached, served


def spread(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
    """Median (min, max) of `values` times `scale`."""
    v = [x * scale for x in values]
    return f"{statistics.median(v):.{digits}f} (min {min(v):.{digits}f}, max {max(v):.{digits}f})"


def ratio_text(a: list[float], b: list[float]) -> str:
    median, low, high = ratios(a, b)
    return f"{median:.2f} (min {low:.2f}, max {high:.2f})"


def verdict(a: list[float], b: list[float], target: float) -> str:
    return "met" if ratios(a, b)[0] >= target else "NOT met"


def run_mode(n: int, mode: str, work_dir: str, args) -> list[str]:
    """One mode's rotation and restarts; prints the figures as it goes and returns the summary lines."""
    budget = 8 * n // 4 if mode == "paged" else None  # 25% of AdamW's fp32 state (8 bytes per parameter)
    label = f"{human(n)} {mode}" + (f" (--host-memory {budget})" if budget else "")
    trees = [None] + ([args.baseline_tree] if args.baseline_tree else [])
    print(f"{label}: starting the daemon{'s' if len(trees) > 1 else ''} and the job ...", flush=True)
    jobs: list[Job | None] = []
    try:
        for i, tree in enumerate(trees):
            jobs.append(Job.start(n, daemon_flags(os.path.join(work_dir, f"state-{mode}-{i}"), budget), tree))
            jobs[-1].opt.step()  # the first step creates every page
            jobs[-1].opt.step()
            jobs[-1].opt.checkpoint()
        nbytes, page_bytes = checkpoint_bytes(os.path.join(work_dir, f"state-{mode}-0"))
        print(f"{label}: a checkpoint holds {nbytes / 1e9:.2f} GB; {args.warmup} + {args.samples} rounds of "
              f"checkpoint{' (this tree, baseline tree)' if len(trees) > 1 else ''}, torch.save, disk write, step",
              flush=True)
        rounds = rotation(jobs, work_dir, nbytes, page_bytes, args.samples, args.warmup, label)
        restarts: list[list[tuple[float, float, float]]] = [[] for _ in jobs]
        for _ in range(args.restarts):
            for i, tree in enumerate(trees):
                restarts[i].append(restart(jobs, i, n, label + (" (baseline tree)" if tree else "")))
    finally:
        for job in jobs:
            if job is not None:
                job.close()
    lines = report(label, rounds, restarts[0])
    if len(trees) > 1:
        lines.append(against_baseline(label, rounds.checkpoints, restarts))
    return lines


def against_baseline(label: str, checkpoints: list[Checkpoints], restarts) -> str:
    mine, base = checkpoints
    line = (f"adamw checkpoint {label}: this tree over the baseline tree: checkpoint time "
            f"{ratio_text(mine.seconds, base.seconds)}, step after a checkpoint {ratio_text(mine.after, base.after)}")
    if restarts[0]:
        served = [[seconds[2] for seconds in r] for r in restarts]
        line += f", restart until the first step returned {ratio_text(*served)}"
    return line


def report(label: str, rounds: Rounds, restarts: list[tuple[float, float, float]]) -> list[str]:
    """Prints the mode's figures; returns its summary lines (ratios are medians of the rounds' ratios)."""
    nbytes, disk, save, step = rounds.nbytes, rounds.disk, rounds.save, rounds.step
    mine = rounds.checkpoints[0]
    ckpt, after = mine.seconds, mine.after
    probes = "; ".join(f"{piece >> 20} MiB writes, {k} in flight: {spread([nbytes / t for t in seconds], 1e-9)}"
                       for (piece, k), seconds in zip(PROBES, rounds.probes))
    print(f"{label}: checkpoint s {spread(ckpt)}, {nbytes / statistics.median(ckpt) / 1e9:.2f} GB/s; "
          f"torch.save + fsync s {spread(save)} ({rounds.saved / 1e9:.2f} GB file); step ms {spread(step, 1e3, 1)}, "
          f"step after a checkpoint ms {spread(after, 1e3, 1)}; disk write GB/s (O_DIRECT, fsync) {probes}",
          flush=True)
    lines = [
        f"adamw checkpoint {label}: checkpoint bytes/s over disk write bandwidth {ratio_text(disk, ckpt)} "
        f"(target >= 0.8: {verdict(disk, ckpt, 0.8)}); torch.save time over checkpoint time "
        f"{ratio_text(save, ckpt)} (target >= 2: {verdict(save, ckpt, 2.0)})",
        f"adamw checkpoint {label}: first step after a checkpoint over a normal step {ratio_text(after, step)}",
    ]
    if any(mine.read) or any(mine.written):
        # A paged job's pages go through its pager (into the state file, or read back from it), not into
        # a `.pages` file of their own: what the disk moved is the rest of the checkpoint and that.
        moved = [nbytes - rounds.page_bytes + r + w for r, w in zip(mine.read, mine.written)]
        scaled = [d * m / nbytes for d, m in zip(disk, moved)]
        lines.append(f"adamw checkpoint {label}: of its {rounds.page_bytes / 1e9:.2f} GB of pages the pager read "
                     f"{spread(mine.read, 1e-9)} GB back and wrote {spread(mine.written, 1e-9)} GB per checkpoint; "
                     f"the disk moved {spread(moved, 1e-9)} GB per checkpoint, {ratio_text(scaled, ckpt)} of its "
                     f"write bandwidth")
    if restarts:
        healthy, attached, served = (list(column) for column in zip(*restarts))
        lines.append(f"adamw checkpoint {label}: restart after kill -9: healthy {spread(healthy)} s, resumed "
                     f"optimizer {spread(attached)} s, first step returned {spread(served)} s")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="200M", help="parameter count, e.g. 50M for a quick run (default 200M)")
    parser.add_argument("--samples", type=int, default=5, help="timed rounds of the rotation per mode (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds before them (default 1)")
    parser.add_argument("--restarts", type=int, default=3, help="daemon restarts timed per mode (default 3)")
    parser.add_argument("--modes", default="resident,paged",
                        help="comma-separated: resident (no --host-memory), paged (--host-memory at 25%% of the "
                             "optimizer state) (default: both)")
    parser.add_argument("--dir", default=None, metavar="DIR",
                        help="where the state directories, the torch.save files and the disk probe go, all on "
                             "one file system (default: a new directory in /var/tmp)")
    parser.add_argument("--baseline-tree", default=None, metavar="DIR",
                        help="also run a job on a daemon from this checkout of the repository (an older commit: "
                             "`git worktree add DIR REV`), its checkpoints in the same rotation and its restarts "
                             "in turn with this tree's, and report this tree's times over it (twice the memory)")
    args = parser.parse_args()
    n = parse_count(args.params)
    modes = args.modes.split(",")
    if any(m not in ("resident", "paged") for m in modes) or args.samples < 1:
        parser.error("--modes takes resident and/or paged; --samples at least 1")
    work_dir = args.dir or tempfile.mkdtemp(prefix="stated-checkpoint-bench-", dir="/var/tmp")
    os.makedirs(work_dir, exist_ok=True)
    print(f"adamw, {human(n)} float32 CPU parameters; files in {work_dir}", flush=True)
    lines = []
    try:
        for mode in modes:
            lines += run_mode(n, mode, work_dir, args)
    finally:
        if not args.dir:
            shutil.rmtree(work_dir, ignore_errors=True)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
