"""torch.distributed.checkpoint with FSDP2 (issue 13, item 4, in part): get_optimizer_state_dict and
dcp.save in the middle of a run leave the optimizer as it was (torch's helpers "initialise" an optimizer
whose `state` looks empty by stepping it: stated_client.held_state), and a fresh model and optimizer
that load the checkpoint continue exactly as the run that saved it. torchrun, two ranks, gloo."""

from __future__ import annotations

from launch import run_ranks


def test_a_distributed_checkpoint_changes_nothing_and_resumes_exactly(daemon, tmp_path):
    for r in run_ranks(daemon, tmp_path, "dcp_worker.py"):
        assert r["within"] == [True, True, True], r  # the run that saved, against torch's that did not
        assert r["exact"], r  # the run that loaded, against the run that saved
