"""Item 7 of issue 11, first drill: `kill -9` of the daemon at random moments, 20 times (drills.kill_cycles).

STATED_DRILL_SEED repeats a run; STATED_DRILL_KILLS (the SIGKILLs) and STATED_DRILL_WIDTH (of the paged
job's layers) make it longer and bigger (`make drill`)."""

from __future__ import annotations

import os
import random

from drills.kill_cycles import KillDrill


def test_kill_9_at_random_moments_loses_nothing_durable(tmp_path):
    seed = int(os.environ.get("STATED_DRILL_SEED") or random.randrange(1 << 31))
    kills = int(os.environ.get("STATED_DRILL_KILLS", "20"))
    width = int(os.environ.get("STATED_DRILL_WIDTH", "384"))
    print(f"kill drill seed {seed} (STATED_DRILL_SEED={seed} repeats it)")
    summary = KillDrill(tmp_path, seed, kills, paged_width=width).run()
    print(f"kill drill: {summary}")
    assert summary["sigkills"] >= kills
