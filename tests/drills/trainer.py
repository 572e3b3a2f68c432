"""The trainer of the kill drill: `python tests/drills/trainer.py --address A --seed S --unit JOB/RANK/WIDTH ...`.

It outlives the daemons it trains on. Commands come one JSON line at a time on stdin; events go out one
JSON line at a time on stdout (tests/drills/kill_cycles.py reads them):

  {"cmd": "attach", "expect": {"JOB/RANK": step or null}}
      every unit attaches with resume=True and is compared with its reference at the step it resumed at;
      -> {"event": "attached", "units": {"JOB/RANK": {"resumed_step": ..., "differences": [...]}}}, or
      {"event": "gone", "error": ...} when the daemon went away meanwhile
  {"cmd": "train"}
      steps the units in turn, each calling opt.checkpoint() every few steps (seeded), until the daemon
      goes away; -> {"event": "step", "unit", "step"} before each step, {"event": "checkpointing", ...}
      and {"event": "checkpointed", "unit", "step", "seconds"} around each checkpoint, and at the end
      {"event": "gone", "error": ...}. Any other error: {"event": "failed", "error": traceback}, exit 1.
  {"cmd": "close"}
      closes every optimizer (the daemon drops the state and its checkpoints); -> {"event": "closed"}.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
import traceback

import torch

# Before tests/ goes on sys.path: its folder tests/stated would otherwise shadow the editable install's
# `stated` as a namespace package (the install's finder comes after the path's).
import stated

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from drills.units import Unit  # noqa: E402

CHECKPOINT_EVERY = (1, 9)  # steps between a unit's opt.checkpoint() calls, drawn from this range


def emit(**fields) -> None:
    print(json.dumps(fields), flush=True)


def attach(units: list[Unit], address: str, expect: dict) -> None:
    try:
        report = {unit.name: resume(unit, address, expect.get(unit.name)) for unit in units}
    except stated.DaemonUnavailableError as exc:  # killed while the units resumed
        emit(event="gone", error=str(exc).splitlines()[0])
        return
    emit(event="attached", units=report)


def resume(unit: Unit, address: str, wanted: int | None) -> dict:
    unit.forget()
    resumed = unit.attach(address)
    differences = unit.verify(resumed if resumed is not None else 0)
    if resumed != wanted:
        differences.insert(0, f"resumed at step {resumed}, expected {wanted}")
    if resumed is None:  # a first attach: durable from step 0, so every kill has a checkpoint to go back to
        unit.checkpoint()
    return {"resumed_step": resumed, "differences": differences}


def train(units: list[Unit], rng: random.Random) -> None:
    due = {unit.name: unit.step + rng.randint(*CHECKPOINT_EVERY) for unit in units}
    try:
        while True:
            for unit in units:
                emit(event="step", unit=unit.name, step=unit.step + 1)
                unit.train_step()
                if unit.step >= due[unit.name]:
                    emit(event="checkpointing", unit=unit.name, step=unit.step)
                    start = time.perf_counter()
                    step = unit.checkpoint()
                    emit(event="checkpointed", unit=unit.name, step=step, seconds=time.perf_counter() - start)
                    due[unit.name] = unit.step + rng.randint(*CHECKPOINT_EVERY)
    except stated.DaemonUnavailableError as exc:
        emit(event="gone", error=str(exc).splitlines()[0])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--address", required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--unit", action="append", required=True, help="JOB/RANK/WIDTH")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rng = random.Random(args.seed)
    units = []
    for i, spec in enumerate(args.unit):
        job, rank, width = spec.split("/")
        units.append(Unit(job, int(rank), int(width), seed=args.seed * 10 + i))
    try:
        for line in sys.stdin:
            command = json.loads(line)
            if command["cmd"] == "attach":
                attach(units, args.address, command["expect"])
            elif command["cmd"] == "train":
                train(units, rng)
            elif command["cmd"] == "close":
                for unit in units:
                    unit.close()
                emit(event="closed")
                return
    except Exception:  # noqa: BLE001 - whatever it is, the drill reports it
        emit(event="failed", error=traceback.format_exc())
        sys.exit(1)


if __name__ == "__main__":
    main()
