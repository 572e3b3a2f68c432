"""FSDP2 (`fully_shard`): each rank registers its local shards with the daemon and the run matches
torch.optim on the same FSDP2 model (Note [sharded parameters] in stated_client.step_inputs).

torchrun with two ranks on gloo, on the real daemon. The model (tests/distributed/fsdp2_worker.py) has
uneven shards, an empty shard, a frozen parameter and two param groups; every rank checks its local
shards against the reference's after every step.
"""

from __future__ import annotations


import pytest

from launch import run_ranks


def run_case(daemon, tmp_path, case: str) -> list[dict]:
    return run_ranks(daemon, tmp_path, "fsdp2_worker.py", case)


@pytest.mark.parametrize("case", ["plain", "mp-policy", "clip", "scaler", "adam", "sgd", "lion"])
def test_fsdp2_matches_torch_optim(daemon, tmp_path, case):
    """fp32 shards (with MixedPrecisionPolicy's bf16 compute, too): every step within the parity
    tolerance of torch.optim.AdamW on the same sharded model (Adam, SGD with momentum and Lion against
    theirs); with max_grad_norm the norm is the global one, equal to clip_grad_norm_ on the DTensors, on
    every rank."""
    ranks = run_case(daemon, tmp_path, case)
    assert ranks[1]["local_sizes"][0] == 0 and ranks[0]["local_sizes"][0] > 0  # the empty shard
    for r in ranks:
        assert all(d["within"] for d in r["diffs"]), r["diffs"]
        assert r["state_types"] == ["DTensor"]  # state_dict speaks DTensor, as torch.optim does under FSDP2
    if case == "clip":
        for ours, torch_norm in ranks[0]["norms"] + ranks[1]["norms"]:
            assert ours == pytest.approx(torch_norm, rel=1e-6)
        assert ranks[0]["norms"] == ranks[1]["norms"]
        assert any(n > 0.5 for _, n in ranks[0]["norms"])  # clipping did something
    if case == "scaler":  # GradScaler (scaler.step(opt), scaler.update()) as with torch.optim
        assert ranks[0]["scales"][0] == ranks[0]["scales"][1] > 2.0**10


def test_fsdp2_bf16_parameters_with_master_weights_are_the_recipe_exactly(daemon, tmp_path):
    """bf16 shards with master_weights=True against the hand-made recipe on the local shards (fp32
    masters stepped by torch.optim.AdamW(fused=True), rounded back): equal bit for bit, as without FSDP2
    (tests/client/test_master_weights.py)."""
    for r in run_case(daemon, tmp_path, "bf16-master"):
        assert all(d["exact"] for d in r["diffs"]), r["diffs"]


@pytest.mark.parametrize("name", ["Adafactor", "CAME", "SlimAdam", "AdamW8bit"])
def test_fsdp2_refuses_an_algorithm_whose_state_needs_whole_tensors(daemon, tmp_path, name):
    for r in run_case(daemon, tmp_path, f"refused-{name}"):
        assert r["refused"].startswith(f"InvalidArgumentError: stated.{name} keeps state shaped by each whole tensor")
        assert f"ZeroRedundancyOptimizer(optimizer_class=stated.{name})" in r["refused"]
