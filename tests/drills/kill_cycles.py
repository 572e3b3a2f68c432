"""The kill drill: `kill -9` of a daemon at random moments while a trainer process trains on it.

Each cycle kills the daemon (SIGKILL) at a moment drawn from a seeded generator (MOMENTS), and checks
what a new daemon on the same --state-dir makes of it:
  - every (job, rank) comes back "recovered" (GetStats' jobs) at the newest checkpoint committed on disk,
    which is no older than the newest one opt.checkpoint() returned (nothing durable is lost) and is
    one the trainer asked for, or a --checkpoint-every one;
  - the state directory holds nothing else (Note [what a state directory may hold] in drills.state_dir),
    and the daemon's log reports no damaged checkpoint;
  - resume=True brings back parameters and state_dict bit-identical to torch.optim.AdamW(fused=True) at
    that step (drills.units), every page read back against its checksum.
The trainer (tests/drills/trainer.py) survives the daemons and goes on from where each resume left it.
"""

from __future__ import annotations

import json
import os
import queue
import random
import subprocess
import sys
import threading
import time
from collections import Counter

from drills import state_dir
from drills.node import PAGE, Node

TRAINER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "trainer.py")
# When the kill lands. The first five while the trainer trains; "mid-shutdown" is a SIGTERM that a
# SIGKILL cuts short (a service manager's stop timeout) while the daemon checkpoints every session.
WHILE_TRAINING = ("any time", "mid-checkpoint", "mid-step of the paged job", "mid-step of a --checkpoint-every step",
                  "mid-shutdown")
COMING_BACK = ("mid-recovery", "mid-resume")
MOMENTS = WHILE_TRAINING + COMING_BACK


class DrillFailure(AssertionError):
    pass


class Trainer:
    """The trainer process; a thread reads its events into a queue."""

    def __init__(self, address: str, seed: int, units: list[str], log_path: str):
        self._log = open(log_path, "ab")
        self.process = subprocess.Popen(
            [sys.executable, TRAINER, "--address", address, "--seed", str(seed), *[f"--unit={u}" for u in units]],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True,
            env=dict(os.environ, STATED_EMBEDDED="0"))
        self.events: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.events.put(json.loads(line))
        self.events.put({"event": "exited"})

    def send(self, **command) -> None:
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()

    def next(self, timeout: float = 60.0) -> dict:
        try:
            event = self.events.get(timeout=timeout)
        except queue.Empty:
            raise DrillFailure(f"the trainer said nothing for {timeout} s") from None
        if event["event"] in ("failed", "exited"):
            raise DrillFailure(f"the trainer stopped: {event.get('error', 'it exited')}")
        return event

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self._log.close()


class Seen:
    """What the trainer said in one cycle: each unit's last step, durable steps and checkpoint under way."""

    def __init__(self, durable: dict[str, int]):
        self.durable = {unit: [step] for unit, step in durable.items()}
        self.last_step = dict(durable)
        self.in_flight: dict[str, int] = {}

    def note(self, event: dict) -> None:
        unit = event.get("unit")
        if event["event"] == "step":
            self.last_step[unit] = event["step"]
        elif event["event"] == "checkpointing":
            self.in_flight[unit] = event["step"]
        elif event["event"] == "checkpointed":
            self.in_flight.pop(unit, None)
            self.durable[unit].append(event["step"])

    def wait(self, trainer: Trainer, match) -> dict:
        while True:
            event = trainer.next()
            self.note(event)
            if match(event):
                return event


class KillDrill:
    """Cycles on one state directory until `kills` daemons were killed with SIGKILL; `run` returns what
    happened, raises DrillFailure naming the seed and the cycle on the first broken promise."""

    def __init__(self, directory: str, seed: int, kills: int, paged_width: int = 384, every: int = 7):
        self.directory, self.seed, self.kills, self.every = str(directory), seed, kills, every
        self.rng = random.Random(seed)
        # Two jobs: "dp" with two small ranks that stay resident, "paged" whose state the budget pages.
        self.units = {"dp/0": 32, "dp/1": 48, "paged/0": paged_width}
        paged_state = 8 * (16 * paged_width + paged_width * paged_width + 4 * paged_width + 2 * paged_width + 4)
        budget = paged_state // 4 + 2 * PAGE
        self.node = Node(directory, "--host-memory", str(budget), "--page-size", str(PAGE), "--checkpoint-every",
                         str(every))
        self.state = self.node.state
        self.moments: Counter = Counter()
        self.half_written = 0
        self.cycle = 0

    def fail(self, what: str) -> DrillFailure:
        return DrillFailure(f"kill drill, seed {self.seed} (STATED_DRILL_SEED={self.seed} repeats it), cycle "
                            f"{self.cycle}: {what}")

    def run(self) -> dict:
        started = time.monotonic()
        daemon = self.node.start()
        trainer = Trainer(daemon.address, self.seed, [f"{u}/{w}" for u, w in self.units.items()],
                          os.path.join(self.directory, "trainer.log"))
        try:
            expected = {u: 0 for u in self.units}  # the trainer checkpoints every unit at its first attach
            self.attach(trainer, {u: None for u in self.units})
            while self.sigkills < self.kills:
                self.cycle += 1
                moment = self.rng.choice(MOMENTS)
                self.moments[moment] += 1
                if moment in COMING_BACK:
                    self.kill_coming_back(trainer, moment, expected)
                else:
                    expected = self.kill_training(trainer, moment, expected)
                self.node.start()
                self.check_recovered(expected)
                self.attach(trainer, expected)
            self.close(trainer)
        finally:
            trainer.stop()
            self.node.kill()
        return {"cycles": self.cycle, "sigkills": self.sigkills, "moments": dict(self.moments),
                "half_written": self.half_written, "seconds": round(time.monotonic() - started, 1)}

    @property
    def sigkills(self) -> int:
        """Every daemon started but the last was killed with SIGKILL."""
        return len(self.node.pids) - 1

    def close(self, trainer: Trainer) -> None:
        trainer.send(cmd="close")
        Seen({}).wait(trainer, lambda e: e["event"] == "closed")
        left = state_dir.orphans(self.state)
        if left:
            raise self.fail(f"closing every optimizer left {left} in the state directory")
        self.node.stop()
        leaked = self.node.leaked_segments()
        if leaked:
            raise self.fail(f"shared memory segments of the drill's daemons are left: {leaked}")

    def attach(self, trainer: Trainer, expect: dict) -> None:
        trainer.send(cmd="attach", expect=expect)
        self.check_attached(Seen({}).wait(trainer, lambda e: e["event"] == "attached"), expect)

    def check_attached(self, event: dict, expect: dict) -> None:
        for unit, result in event["units"].items():
            if result["differences"]:
                raise self.fail(f"{unit} resumed at step {result['resumed_step']} (expected {expect[unit]}) is not "
                                f"the reference's state: {result['differences'][:4]}")

    def kill_training(self, trainer: Trainer, moment: str, durable: dict[str, int]) -> dict[str, int]:
        """Trains, kills the daemon at `moment`, and returns the step each unit must come back at."""
        seen = Seen(durable)
        trainer.send(cmd="train")
        seen.wait(trainer, lambda e: e["event"] == "step")
        if moment == "mid-checkpoint":
            seen.wait(trainer, lambda e: e["event"] == "checkpointing")
        elif moment == "mid-step of the paged job":
            seen.wait(trainer, lambda e: e["event"] == "step" and e["unit"].startswith("paged"))
        elif moment == "mid-step of a --checkpoint-every step":
            seen.wait(trainer, lambda e: e["event"] == "step" and e["step"] % self.every == 0)
        time.sleep(self.rng.uniform(0.0, 0.5 if moment in ("any time", "mid-shutdown") else 0.005))
        if moment == "mid-shutdown":
            self.node.daemon.process.terminate()
            time.sleep(self.rng.uniform(0.0, 0.1))
        self.node.kill()
        seen.wait(trainer, lambda e: e["event"] == "gone")
        if state_dir.uncommitted(self.state):
            self.half_written += 1
        return {unit: self.expected_step(unit, seen, shutdown=moment == "mid-shutdown") for unit in durable}

    def kill_coming_back(self, trainer: Trainer, moment: str, expected: dict[str, int]) -> None:
        """Kills the daemon (between steps: the trainer waits), then the next one while it recovers, or
        while the trainer resumes: nothing changes on disk."""
        self.node.kill()
        if moment == "mid-recovery":
            self.node.start(kill_after=self.rng.uniform(0.0, 3.0))
            return
        self.node.start()
        self.check_recovered(expected)
        trainer.send(cmd="attach", expect=expected)
        time.sleep(self.rng.uniform(0.0, 0.5))
        self.node.kill()
        event = Seen({}).wait(trainer, lambda e: e["event"] in ("attached", "gone"))
        if event["event"] == "attached":
            self.check_attached(event, expected)

    def expected_step(self, unit: str, seen: Seen, shutdown: bool) -> int:
        """The newest committed checkpoint of `unit` on disk, checked against what the trainer knows."""
        job, rank = unit.split("/")
        on_disk = state_dir.committed(self.state, job, int(rank))
        durable, last = seen.durable[unit], seen.last_step[unit]
        if not on_disk:
            raise self.fail(f"{unit} has no committed checkpoint on disk; opt.checkpoint() returned {durable}")
        newest = on_disk[0]
        if newest < max(durable):
            raise self.fail(f"{unit}: the newest checkpoint on disk is step {newest}, but opt.checkpoint() "
                            f"returned step {max(durable)}: a durable step was lost")
        asked = set(durable) | {seen.in_flight.get(unit)} | ({last - 1, last} if shutdown else set())
        if newest > last or not (newest in asked or newest % self.every == 0):
            raise self.fail(f"{unit}: a checkpoint at step {newest} is on disk, which the trainer never asked "
                            f"for (its last step {last}, checkpoints {durable}, --checkpoint-every {self.every}"
                            f"{', a shutdown' if shutdown else ''})")
        return newest

    def check_recovered(self, expected: dict[str, int]) -> None:
        problems = self.node.recovered_problems(expected) + self.node.bad_log_lines()
        if problems:
            raise self.fail("; ".join(problems))
        if self.cycle == 1:
            self.check_jobs_command(expected)

    def check_jobs_command(self, expected: dict[str, int]) -> None:
        """`stated jobs` shows every (job, rank) recovered at its step."""
        shown = subprocess.run([sys.executable, "-m", "stated", "jobs", "--address", self.node.address],
                               capture_output=True, text=True, timeout=60).stdout
        rows = {tuple(line.split()[:2]): line.split()[2:5] for line in shown.splitlines()[1:]}
        for unit, step in expected.items():
            if rows.get(tuple(unit.split("/"))) != ["recovered", "adamw", str(step)]:
                raise self.fail(f"`stated jobs` should show {unit} recovered at step {step}:\n{shown}")
