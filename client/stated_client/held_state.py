"""The `state` a stated optimizer shows torch: empty, as the state is in the daemon, yet true once the
daemon holds some.

torch.distributed.checkpoint's get_optimizer_state_dict and set_optimizer_state_dict "initialise" an
optimizer whose `state` is empty by stepping it with zero gradients and lr 0. For a stated optimizer that
has stepped, such a step would count a step in the daemon and decay its moments; its `state` says it is
initialised instead. (For one that never stepped the step is what it is for torch.optim: it leaves the
parameters as they are and makes the state of step 1, which a load then replaces.)
"""

from __future__ import annotations

from collections import defaultdict


class HeldState(defaultdict):
    """A `defaultdict(dict)` that is true when it has entries or `held` is set (the daemon holds state)."""

    def __init__(self, held: bool = False, *args):
        super().__init__(dict, *args)
        self.held = held

    def __bool__(self) -> bool:
        return self.held or len(self) > 0
