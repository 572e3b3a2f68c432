"""The state_dict half of the store: exporting a session's state in the reference's format, and
importing one all or nothing (stated.store.Store inherits it; stated.inconsistency for what a failed
import leaves)."""

from __future__ import annotations

import torch

from stated.errors import InvalidArgument
from stated.inconsistency import Inconsistency
from stated.session import MASTER, MASTER_KEY, Session



def check_import_index(session, index: int, seen: set[int]) -> None:
    """An imported tensor's index: one of the session's tensors, once per stream (added to `seen`)."""
    if not 0 <= index < len(session.tensors):
        raise InvalidArgument(f"header.tensor is {index} but the session has {len(session.tensors)} tensors")
    if index in seen:
        raise InvalidArgument(f"header.tensor {index} appears twice in one ImportState stream")
    seen.add(index)

class StateTransfer:
    """Needs `engine`, `_check_consistent` and `_check_resumed` from the store."""

    def begin_export(self, session: Session) -> None:
        """Before export_tensor calls: state held on a device comes back to the host tier. A half-applied
        state is not exported (Note [half-applied steps])."""
        self._check_consistent(session, "state_dict()")
        self.engine.flush(session)

    def export_tensor(self, session: Session, index: int) -> dict[str, torch.Tensor] | None:
        """The tensor's state_dict entry with the reference's keys, or None if it has no state."""
        place, small = session.tensors[index], session.small[index]
        if not session.algorithm.has_state(small):
            return None
        flat = {f.name: torch.empty(f.count(place.info.numel), dtype=f.dtype) for f in place.fields}
        positions = dict(session.tensor_pages.get(index, []))

        def read(bound) -> None:
            seg = bound.segments[positions[bound.page]]
            for f in place.fields:
                begin = seg.start // f.per
                view = seg.fields[f.name]
                flat[f.name][begin: begin + view.numel()].copy_(view)

        self.engine.visit_pages(session, positions, read, dirty=False)
        master = flat.pop(MASTER.name, None)
        entry = session.algorithm.export_state(place.info, small, flat)
        if master is not None:
            entry[MASTER_KEY] = master.reshape(place.info.shape)
        return entry

    def reset_state(self, session: Session) -> None:
        """Back to the state before the first step: counters at zero, pages zeroed."""
        session.backend.invalidate(session)
        for place in session.tensors:
            session.small[place.info.index] = session.algorithm.init_small_state(
                place.info, session.groups[place.info.group])
        session.bindings.clear()  # they hold the old small-state dicts
        self.engine.reset_pages(session)

    def import_state(self, session: Session, entries: list[tuple[int, dict[str, torch.Tensor]]]) -> tuple[int, int]:
        """Loads state_dict entries all or nothing: every entry is checked before any state changes, then
        all state is reset (torch's load_state_dict replaces it whole) and the entries written.
        Returns (tensors, bytes) loaded. It makes an inconsistent session consistent again; one that fails
        after it began changing state leaves the session inconsistent (Note [half-applied steps])."""
        self._check_resumed(session, "load_state_dict()")
        session.changed_since_durable = True
        staged, seen = [], set()
        for index, entry in entries:
            check_import_index(session, index, seen)
            place = session.tensors[index]
            small = session.algorithm.init_small_state(place.info, session.groups[place.info.group])
            fields = tuple(f for f in place.fields if f is not MASTER)
            try:
                flat = session.algorithm.import_state(place.info, small, entry, fields)
            except (ValueError, KeyError, RuntimeError) as exc:
                raise InvalidArgument(f"the state of tensor {index} does not load: {exc}") from None
            if session.master:  # a state_dict without master copies (from torch) starts them from the arena
                master = entry.get(MASTER_KEY)
                if master is None and session.regions[place.region].device:
                    staged.append((index, small, flat))  # the backend copies it on the device (master_pending)
                    continue
                if master is None:
                    master = session.param_views[index]
                if master.numel() != place.info.numel:
                    raise InvalidArgument(f"state {MASTER_KEY!r} of tensor {index} has {master.numel()} elements, "
                                          f"expected {place.info.numel}")
                flat[MASTER.name] = master.reshape(-1).to(torch.float32)
            staged.append((index, small, flat))
        try:
            nbytes = self._replace_state(session, staged)
        except BaseException as exc:
            session.inconsistent = Inconsistency.of("load_state_dict", session.steps + 1, None, exc)
            raise
        session.inconsistent = None
        return len(staged), nbytes

    def _replace_state(self, session: Session, staged: list[tuple[int, dict, dict[str, torch.Tensor]]]) -> int:
        """Resets all state and writes the checked entries; returns the bytes written."""
        self.reset_state(session)
        for index, small, _flat in staged:
            session.small[index] = small
        session.bindings.clear()  # bound segments carry the small-state dicts just replaced
        return sum(self._write_fields(session, index, flat) for index, _small, flat in staged)

    def _write_fields(self, session: Session, index: int, flat: dict[str, torch.Tensor]) -> int:
        place = session.tensors[index]
        per = {f.name: f.per for f in place.fields}
        positions = dict(session.tensor_pages.get(index, []))

        def write(bound) -> None:
            seg = bound.segments[positions[bound.page]]
            if MASTER.name in flat and bound.page in session.master_pending:
                # this tensor's master is the imported one: the device must not refill it from the parameters
                session.master_pending[bound.page].discard(index)
            for name, view in seg.fields.items():
                if name not in flat:
                    continue
                begin = seg.start // per[name]
                view.copy_(flat[name][begin: begin + view.numel()])

        self.engine.visit_pages(session, positions, write, dirty=True)
        return sum(t.numel() * t.element_size() for t in flat.values())

