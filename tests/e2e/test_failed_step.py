"""A step that fails half-way, end to end (Note [half-applied steps] in stated.inconsistency): a real
daemon paging through a real state file, one byte of it flipped on disk between steps.

The failed step is DATA_LOSS naming the page; from then on the session is inconsistent (GetStats and
`stated status` say so), a retry and state_dict() are refused with FAILED_PRECONDITION naming the step,
the page and the way back, and nothing changes. After load_state_dict of a state_dict saved earlier (and
the model's parameters put back) the steps go on, with no page slot lost, and match torch.optim.AdamW
replayed from that state.
"""

from __future__ import annotations

import copy
import io
import os

import pytest
import torch

import stated
from stated.paging.state_file import HEADER_BYTES, align_up, state_path
from stated.tools.status import show_status
from support.daemon import DaemonProcess

from test_paging import PAGE, make_model, session_stats, train


def flip_byte(path: str, page: int) -> None:
    with open(path, "r+b") as f:
        f.seek(HEADER_BYTES + page * align_up(PAGE) + 100)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x01]))


def test_a_failed_step_is_refused_until_restored_and_then_matches_torch(tmp_path):
    proc = DaemonProcess(tmp_path, "--host-memory", str(2 * PAGE), "--page-size", str(PAGE))
    proc.start()
    try:
        model = make_model()
        opt = stated.AdamW(model.parameters(), lr=1e-3, address=proc.address, job="half")
        train(model, opt, 2, seed=1)  # a budget of two pages keeps none resident: every page is on disk
        saved_model, saved_opt = copy.deepcopy(model.state_dict()), opt.state_dict()
        train(model, opt, 1, seed=2)
        flip_byte(state_path(os.path.join(proc.directory, "state"), "half"), 3)

        with pytest.raises(stated.StatedError) as caught:
            train(model, opt, 1, seed=3)  # step 4 updates pages 0 to 2, then page 3 fails its checksum
        assert caught.value.code == "DATA_LOSS" and "page 3 of job 'half'" in str(caught.value)
        stats = session_stats(opt)
        assert stats.inconsistent and stats.failed_step == 4 and stats.steps == 3
        assert "step 4 failed at page 3" in stats.inconsistency
        status = io.StringIO()
        show_status(proc.address, status)
        assert "  inconsistent: step 4 failed at page 3 (DATA_LOSS: " in status.getvalue()

        params = [p.detach().clone() for p in model.parameters()]
        for attempt in (lambda: train(model, opt, 1, seed=3), opt.state_dict):
            with pytest.raises(stated.FailedPreconditionError) as refused:
                attempt()
            message = str(refused.value)
            assert "step 4 failed at page 3" in message and "half-applied" in message, message
            assert "saved before step 4" in message and "opt.load_state_dict()" in message, message
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params)), "a refused step changed weights"

        model.load_state_dict(saved_model)
        opt.load_state_dict(saved_opt)
        assert not session_stats(opt).inconsistent
        reference_model = make_model()
        reference_model.load_state_dict(saved_model)
        reference = torch.optim.AdamW(reference_model.parameters(), lr=1e-3, fused=True)
        reference.load_state_dict(saved_opt)
        train(model, opt, 8, seed=4)  # with a slot lost per failed read this ran out of page slots
        train(reference_model, reference, 8, seed=4)
        for p, r in zip(model.parameters(), reference_model.parameters()):
            torch.testing.assert_close(p, r, rtol=1e-6, atol=1e-7)
        ours, theirs = opt.state_dict()["state"], reference.state_dict()["state"]
        for index in theirs:
            assert float(ours[index]["step"]) == float(theirs[index]["step"]) == 10.0
        assert proc.healthy()
        opt.close()
    finally:
        proc.stop()


def test_a_failed_step_goes_back_to_the_daemons_checkpoint_with_resume(tmp_path):
    """The other way back: the refusal names the checkpoint's step; closing with keep and resuming
    continues from that checkpoint, bit for bit as the optimizer was when it was taken."""
    proc = DaemonProcess(tmp_path, "--host-memory", str(2 * PAGE), "--page-size", str(PAGE))
    proc.start()
    try:
        model = make_model()
        opt = stated.AdamW(model.parameters(), lr=1e-3, address=proc.address, job="back")
        train(model, opt, 2, seed=1)
        assert opt.checkpoint() == 2
        saved_params, saved_state = [p.detach().clone() for p in model.parameters()], opt.state_dict()
        train(model, opt, 1, seed=2)
        flip_byte(state_path(os.path.join(proc.directory, "state"), "back"), 3)
        with pytest.raises(stated.StatedError):
            train(model, opt, 1, seed=3)
        with pytest.raises(stated.FailedPreconditionError) as refused:
            train(model, opt, 1, seed=3)
        assert "the daemon's checkpoint at step 2: opt.close(keep=True), then a new optimizer with resume=True" \
            in str(refused.value)
        opt.close(keep=True)

        fresh = make_model(seed=5)
        again = stated.AdamW(fresh.parameters(), lr=1e-3, address=proc.address, job="back", resume=True)
        assert again.resumed_step == 2
        assert all(torch.equal(p, q) for p, q in zip(fresh.parameters(), saved_params))
        state = again.state_dict()["state"]
        for index, entry in saved_state["state"].items():
            for key, value in entry.items():
                assert torch.equal(state[index][key], value), (index, key)
        train(fresh, again, 3, seed=4)  # and it steps on from there
        again.close()
    finally:
        proc.stop()
