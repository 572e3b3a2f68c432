"""torch.distributed.checkpoint with FSDP2 (and DDP): get_optimizer_state_dict and dcp.save in the middle of a run
leave the optimizer as it was (torch's helpers "initialise" an optimizer whose `state` looks empty by
stepping it: stated_client.held_state), a fresh model and optimizer that load the checkpoint continue
exactly as the run that saved it, and a checkpoint saved on two ranks loads on one and on four, and
into a plain torch.optim (full_state_dict=True). torchrun, gloo."""

from __future__ import annotations

import json

import pytest

from launch import launch, run_ranks


@pytest.mark.parametrize("layout", ["fsdp2", "ddp"])
def test_a_distributed_checkpoint_changes_nothing_and_resumes_exactly(daemon, tmp_path, layout):
    for r in run_ranks(daemon, tmp_path, "dcp_worker.py", layout):
        assert r["within"] == [True, True, True], r  # the run that saved, against torch's that did not
        assert r["exact"], r  # the run that loaded, against the run that saved


def test_a_checkpoint_saved_on_two_ranks_loads_on_one_and_on_four(daemon, tmp_path):
    """Resharded by torch.distributed.checkpoint: at each world size the full optimizer state equals the
    one saved, for stated as for torch.optim, and a step after it stays within the parity tolerance of
    torch's; on one rank the full state also loads into an unsharded model's torch.optim.AdamW and
    comes back unchanged."""
    launch(daemon, tmp_path, "reshard_worker.py", "save")
    for world in (1, 4):
        launch(daemon, tmp_path, "reshard_worker.py", "load", ranks=world)
        report = json.load(open(tmp_path / f"load{world}.json"))
        assert report["ours_equal_saved"] and report["torch_equal_saved"] and report["step_within"], report
    assert json.load(open(tmp_path / "load1.json"))["plain_torch_equal"]
