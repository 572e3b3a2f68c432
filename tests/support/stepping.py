"""Steps a Store directly (no daemon) with seeded parameters and gradients, for tests that compare two
backends or two ways of running pages bit for bit."""

from __future__ import annotations

import torch

from stated.store import Store


def step_store(store: Store, algorithm: str, hp: dict, shapes: list[tuple[int, ...]], master: bool = False,
               steps: int = 6, name: str = "layers.{}.weight"):
    """Registers `shapes` in one group, steps them `steps` times (the third tensor skips every third
    step) and returns (parameters, exported state, page faults); detaches and closes the paging."""
    session = store.attach("stepping", 0, algorithm, 1, master_weights=master)
    dtype = torch.bfloat16 if master else torch.float32
    try:
        store.register(session, [hp], [(shape, dtype, 0, name.format(i)) for i, shape in enumerate(shapes)])
        g = torch.Generator().manual_seed(1)
        for i, shape in enumerate(shapes):
            session.param_views[i].copy_(torch.randn(shape, generator=g).reshape(-1))
        for number in range(1, steps + 1):
            for i, shape in enumerate(shapes):
                session.grad_views[i].copy_(torch.randn(shape, generator=g).reshape(-1) * 1e-2)
            has_grad = bytes(0 if (number % 3 == 0 and i == 2) else 1 for i in range(len(shapes)))
            store.step(session, number, [hp], has_grad)
        store.begin_export(session)
        params = [v.clone() for v in session.param_views]
        state = [store.export_tensor(session, i) for i in range(len(shapes))]
        return params, state, session.pager.faults
    finally:
        store.detach(session)
        store.paging.close()
