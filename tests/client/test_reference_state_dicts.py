"""A stated checkpoint of a memory-lean algorithm loads into its reference optimizer (and the reference's
into stated), and both go on the same way (tolerances as in tests/kernels, which compare the math)."""

from __future__ import annotations

import pytest
import torch

import stated

from test_parity import data, make_model, train  # noqa: E402


def references():
    lion = pytest.importorskip("lion_pytorch")
    came = pytest.importorskip("came_pytorch")
    return {
        # name: (stated class, reference class, kwargs, rtol)
        "lion": (stated.Lion, lion.Lion, dict(lr=1e-4, weight_decay=0.1), 1e-6),
        "adafactor": (stated.Adafactor, torch.optim.Adafactor, dict(lr=1e-2), 1e-5),
        "came": (stated.CAME, came.CAME, dict(lr=2e-4, weight_decay=1e-2), 1e-5),
    }


@pytest.mark.parametrize("name", ["lion", "adafactor", "came"])
@pytest.mark.parametrize("direction", ["stated-to-reference", "reference-to-stated"])
def test_checkpoints_cross_over(address, name, direction):
    ours_cls, ref_cls, kwargs, rtol = references()[name]
    X, Y = data(40)
    first, second = make_model(), make_model()
    if direction == "stated-to-reference":
        a = ours_cls(first.parameters(), address=address, **kwargs)
        make_b = lambda params: ref_cls(params, **kwargs)  # noqa: E731
    else:
        a = ref_cls(first.parameters(), **kwargs)
        make_b = lambda params: ours_cls(params, address=address, **kwargs)  # noqa: E731
    keep = torch.optim.lr_scheduler.LambdaLR(a, lambda i: 1.0)
    train(first, a, keep, X[:20], Y[:20])
    with torch.no_grad():
        for p, q in zip(second.parameters(), first.parameters()):
            p.copy_(q)
    b = make_b(second.parameters())
    b.load_state_dict(a.state_dict())
    train(first, a, keep, X[20:], Y[20:])
    train(second, b, torch.optim.lr_scheduler.LambdaLR(b, lambda i: 1.0), X[20:], Y[20:])
    for p, q in zip(first.parameters(), second.parameters()):
        torch.testing.assert_close(p, q, rtol=rtol, atol=1e-7)
    for opt in (a, b):
        if isinstance(opt, stated.StatedOptimizer):
            opt.close()
