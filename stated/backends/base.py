"""The interface between the engine and a device (STYLE.md point 4).

The engine never asks whether it runs on CPU or CUDA. For one step it asks the backend, in order:

1. `check_gradients`: the norm of the (unscaled) gradients and whether any is inf or nan, for
   clipping and mixed precision (Note [gradient checks]);
2. `begin_step`: step counters and the algorithm's pre-pass reductions over whole tensors;
3. per page pass, `host_pages`: which pages of the pass it needs in the host tier; then per page:
   `run_page` gets the page bound to its host buffer (the engine got it from the pager; None for a
   page the backend holds itself), makes its state usable by a kernel (on CPU the host buffer itself;
   on CUDA an asynchronous copy into a staging slot, or a page already in the GPU cache), runs the
   algorithm's update on the page's segments and starts bringing changed state back to the host tier.
   It returns a ticket, or None when the page is finished; `retire(ticket)` waits until the host
   buffer holds the page's result and says whether it changed, and the engine then gives the page
   back to the pager. The engine keeps at most `depth` pages in flight before it retires the oldest,
   so copies, kernels and write-back overlap;
4. `between_passes`, after every pass but the last;
5. `end_step`: waits for everything the backend has in flight. It is called once per step, never per
   page.

`flush` and `invalidate` keep a device-side copy of pages (the GPU cache) coherent with the host tier
around state_dict export and import. A backend never calls the pager: the host pages it needs beyond
the page it runs it borrows from the engine's `HostPages`, handed over by `lend_host_pages` (Note
[host pages lent to a backend] in stated.engine).

Note [gradient checks]: torch's recipe is `scaler.unscale_(opt)`, `clip_grad_norm_(params, max_norm)`,
`scaler.step(opt)`: gradients are divided by the loss scale, their global L2 norm is taken, and they are
multiplied by min(1, max_norm / (norm + 1e-6)); a step whose gradients hold inf or nan is skipped
entirely (no state changes, no step counted). stated does the same in the daemon's pre-pass, so the
trainer makes no pass over its gradients: the backend folds the product (1 / scale) x clip coefficient
into the gradients every kernel of the step reads.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from stated_kernels.spec import Hyperparameters

if TYPE_CHECKING:
    from stated.engine import HostPages
    from stated.session import Binding

# torch.nn.utils.clip_grad_norm_ adds this to the norm before dividing.
CLIP_EPSILON = 1e-6


@dataclasses.dataclass(frozen=True)
class GradientCheck:
    """What the pre-pass learned about this step's gradients."""

    norm: float  # global L2 norm of the unscaled gradients (0 when it was not needed)
    found_inf: bool  # some gradient is inf or nan: the step is skipped

    @staticmethod
    def multiplier(norm: float, grad_scale: float, max_grad_norm: float) -> float:
        """What every gradient is multiplied by: 1/scale, times the clipping coefficient."""
        factor = 1.0 / grad_scale if grad_scale else 1.0
        if max_grad_norm > 0:
            factor *= min(1.0, max_grad_norm / (norm + CLIP_EPSILON))
        return factor


class Backend(abc.ABC):
    name: str = ""
    # Pages in flight (staged, computing or copying back) before the engine retires the oldest.
    depth: int = 1

    def ready(self, session) -> str | None:
        """None when the session can step; else a sentence naming what it still lacks (a device
        backend: the buffers of a region that ShareDeviceBuffers has not brought yet)."""
        return None

    def close(self, session) -> None:
        """The session is going away: release everything held for it."""

    @abc.abstractmethod
    def check_gradients(self, session, active: Sequence[int], grad_scale: float,
                        max_grad_norm: float) -> GradientCheck:
        """Norm and inf/nan check over the gradients of tensors `active` (Note [gradient checks]).
        When found_inf is False, every gradient read by this step's kernels is multiplied by
        `GradientCheck.multiplier`; `grad_scale` 0 means unscaled, `max_grad_norm` 0 no clipping.
        Without scaling and clipping it may return (0, False) without reading the gradients."""

    @abc.abstractmethod
    def begin_step(self, session, groups: list[Hyperparameters], active: Sequence[int]) -> None:
        """Step counters and the algorithm's pre-pass for tensors `active`."""

    def lend_host_pages(self, session, host: HostPages) -> None:
        """Where the backend borrows host pages until the next call (before each step and flush); a
        backend without pages of its own needs none."""

    @abc.abstractmethod
    def run_page(self, session, page: int, bound: Binding | None, groups: list[Hyperparameters],
                 pass_index: int, has_grad: bytes | None) -> Any:
        """Runs pass `pass_index` of the update over one page (only tensors whose has_grad byte is
        set; None means all), `bound` to its host buffer (None for a page `host_pages` left out).
        Returns a ticket for `retire`, or None when the page is finished and its buffer is free."""

    def host_pages(self, session, order: list[int]) -> list[int]:
        """The pages of `order` that this pass will need in the host tier, in order: what the engine
        gets from the pager (return `order` itself for all of them). A device cache leaves out the
        pages it holds."""
        return order

    def retire(self, ticket: Any) -> bool:
        """Waits until the page of `ticket` is back in its host buffer; True when the buffer changed."""
        return True

    def between_passes(self, session, groups: list[Hyperparameters], active: Sequence[int],
                       pass_index: int) -> None:
        """After pass `pass_index`, before the next: the algorithm's per-tensor work."""
        for index in active:
            place = session.tensors[index]
            session.algorithm.between_passes(place.info, session.small[index], groups[place.info.group],
                                             pass_index)

    @abc.abstractmethod
    def end_step(self, session) -> None:
        """Waits for every copy and kernel of this step."""

    def flush(self, session) -> None:
        """Brings every page held on the device back to the host tier (before reading state)."""

    def invalidate(self, session) -> None:
        """Forgets device copies of pages and small state (after the host tier was rewritten)."""
