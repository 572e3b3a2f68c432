"""Session.step_counters: every tensor's step counter in one tensor, advanced in one operation.

The counters must count exactly as one `+= 1` per tensor with a gradient would, across steps that skip
tensors, a param group added later, state imported from a state_dict and a reset, where the small
states are replaced and the counters rebuilt from their values.
"""

from __future__ import annotations

import torch

from stated.backends.cpu import CpuBackend
from stated.metrics import Metrics
from stated.paging.daemon_paging import Paging
from stated.store import Store

HP = {"lr": 1e-3}


def steps(store: Store, session) -> list[float]:
    store.begin_export(session)
    out = []
    for index in range(len(session.tensors)):
        entry = store.export_tensor(session, index)
        out.append(float(entry["step"]) if entry is not None else 0.0)
    return out


def test_counters_follow_skips_new_groups_imports_and_resets():
    store = Store(CpuBackend(), 1 << 20, paging=Paging(Metrics()))
    session = store.attach("counters", 0, "adamw", 1)
    try:
        store.register(session, [HP], [((10,), torch.float32, 0, f"a{i}") for i in range(3)])
        store.step(session, 1, [HP], b"\x01\x01\x01")
        store.step(session, 2, [HP], b"\x01\x00\x01")  # tensor 1 has no gradient
        assert steps(store, session) == [2.0, 1.0, 2.0]

        store.register(session, [HP], [((10,), torch.float32, 0, "b")])  # a group added later
        store.step(session, 3, [HP, HP], b"\x00\x01\x01\x01")
        assert steps(store, session) == [2.0, 2.0, 3.0, 1.0]

        entries = [(0, {"step": torch.tensor(7.0), "exp_avg": torch.zeros(10), "exp_avg_sq": torch.zeros(10)})]
        store.import_state(session, entries)  # tensor 0 at step 7, the rest as never stepped
        store.step(session, 4, [HP, HP], b"\x01\x01\x00\x01")
        assert steps(store, session) == [8.0, 1.0, 0.0, 1.0]
        # The small states' counters are views of the one tensor again, and only of it.
        counters = session.step_counters()
        assert all(small["step"]._base is counters for small in session.small)

        store.reset_state(session)
        store.step(session, 5, [HP, HP], b"\x01\x01\x01\x01")
        assert steps(store, session) == [1.0, 1.0, 1.0, 1.0]
    finally:
        store.detach(session)
        store.paging.close()
