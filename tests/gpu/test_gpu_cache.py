"""--gpu-cache keeps pages on the GPU between steps (Note [GPU cache residency] in
stated.backends.cuda_pages): the results are the same bits as streaming every page through the staging
ring, and the transfer metrics say which pages moved.

Three daemons with 64KiB pages (tests/gpu/conftest.py): no cache, a cache of 8 pages (smaller than the
model's 24 pages: pages are evicted and written back every step), and a cache larger than the model
(after the first step nothing moves until state_dict() flushes the cache).
"""

from __future__ import annotations

from cuda_env import require_cuda

require_cuda()

import pytest  # noqa: E402
import torch  # noqa: E402

import stated  # noqa: E402
from gpu_helpers import gradients, initial, metric, parameters, run, unique  # noqa: E402

pytestmark = pytest.mark.gpu

CUDA = torch.device("cuda")
SHAPES = [(256, 256), (256,), (256, 256), (256,), (256, 256), (77,)]  # about 197K parameters, 24 AdamW pages
STEPS = 6
SKIP = {3: {1, 2}}  # a step where two tensors have no gradient: masked launches on cached pages too


def train(daemon, cls=stated.AdamW, dtype=torch.float32, **kwargs):
    values, grads = initial(SHAPES), gradients(STEPS, SHAPES)
    params = parameters(values, CUDA, dtype)
    # Both groups set their own lr; the default is there for CAME, whose constructor requires one.
    opt = cls([{"params": params[:2], "lr": 1e-2}, {"params": params[2:], "lr": 3e-3, "weight_decay": 0.1}],
              lr=1e-2, address=daemon.address, job=unique("cache"), **kwargs)
    run(opt, params, grads, SKIP)
    return opt, params


def transfers(daemon) -> dict[str, float]:
    text = daemon.scrape()
    return {"in": metric(text, "stated_transfer_bytes_total", path="host_to_gpu"),
            "out": metric(text, "stated_transfer_bytes_total", path="gpu_to_host"),
            "faults": metric(text, "stated_page_faults_total", tier="gpu"),
            "evictions": metric(text, "stated_page_evictions_total", tier="gpu"),
            "resident": metric(text, "stated_resident_bytes", tier="gpu")}


@pytest.mark.parametrize("cls,kwargs", [(stated.AdamW, {}), (stated.AdamW, dict(master_weights=True)),
                                        (stated.CAME, {})], ids=["adamw", "adamw-bf16-master", "came-two-passes"])
def test_cache_gives_the_same_bits_as_streaming(gpu_daemon, gpu_cache_daemon, gpu_big_cache_daemon, cls, kwargs):
    dtype = torch.bfloat16 if kwargs.get("master_weights") else torch.float32
    runs = [train(d, cls, dtype, **kwargs) for d in (gpu_daemon, gpu_cache_daemon, gpu_big_cache_daemon)]
    (base_opt, base_params), others = runs[0], runs[1:]
    base_state = base_opt.state_dict()["state"]
    # CAME's first pass adds row and column sums with atomics, whose order varies from run to run.
    exact = cls is not stated.CAME
    for opt, params in others:
        for i, (p, q) in enumerate(zip(params, base_params)):
            if exact:
                assert torch.equal(p, q), f"parameter {i}"
            else:
                torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-9)
        state = opt.state_dict()["state"]
        assert state.keys() == base_state.keys()
        for i in base_state:
            for key, value in base_state[i].items():
                if exact:
                    assert torch.equal(state[i][key], value), (i, key)
                else:
                    torch.testing.assert_close(state[i][key], value, rtol=1e-6, atol=1e-12)
    for opt, _ in runs:
        opt.close()


def test_streaming_moves_every_page_both_ways_every_step(gpu_daemon):
    before = transfers(gpu_daemon)
    opt, params = train(gpu_daemon)
    after = transfers(gpu_daemon)
    moved_in, moved_out = after["in"] - before["in"], after["out"] - before["out"]
    state_bytes = sum(8 * p.numel() for p in params)  # exp_avg and exp_avg_sq, fp32
    # A step leaves out the pages that hold only tensors without a gradient (stated.engine; on an H200
    # SKIP's step moved 8 pages fewer), so a step moves at least the state of the tensors that have a
    # gradient, on at least as many pages as those bytes fill.
    stepped = [sum(8 * p.numel() for i, p in enumerate(params) if i not in SKIP.get(step, ()))
               for step in range(STEPS)]
    assert moved_in == moved_out  # every page goes back the way it came
    # Pages hold their fields 64-byte aligned, so they carry a little more than the state itself.
    assert sum(stepped) <= moved_in <= STEPS * state_bytes * 1.01
    assert after["faults"] - before["faults"] >= sum(b // (64 << 10) for b in stepped)
    assert after["evictions"] == before["evictions"] and after["resident"] == 0
    opt.close()


def test_a_cache_larger_than_the_state_moves_nothing_after_the_first_step(gpu_big_cache_daemon):
    daemon = gpu_big_cache_daemon
    values, grads = initial(SHAPES), gradients(STEPS + 1, SHAPES)
    params = parameters(values, CUDA)
    opt = stated.AdamW(params, lr=1e-2, address=daemon.address, job=unique("big-cache"))
    start = transfers(daemon)
    run(opt, params, grads[:1])
    first = transfers(daemon)
    state_in = first["in"] - start["in"]  # every page copied in once
    assert state_in >= sum(8 * p.numel() for p in params)
    assert first["out"] == start["out"]  # and none copied back
    # A copy moves a page up to its last field's end (Page.extent), the gauge counts the page's state
    # bytes as every tier does (Page.nbytes, which includes the last field's alignment padding).
    assert state_in <= first["resident"] - start["resident"] <= state_in * 1.01
    run(opt, params, grads[1:])
    later = transfers(daemon)
    assert (later["in"], later["out"], later["faults"]) == (first["in"], first["out"], first["faults"])
    opt.state_dict()  # flush: every page is dirty and goes back to the host tier once
    flushed = transfers(daemon)
    assert flushed["out"] - later["out"] == state_in
    opt.state_dict()  # nothing changed since: nothing to write back
    assert transfers(daemon)["out"] == flushed["out"]
    run(opt, params, grads[:1])  # the pages stayed on the GPU through the flush
    assert transfers(daemon)["in"] == flushed["in"]
    opt.close()
    assert transfers(daemon)["resident"] == start["resident"]


def test_a_small_cache_evicts_and_writes_back(gpu_cache_daemon):
    before = transfers(gpu_cache_daemon)
    opt, _ = train(gpu_cache_daemon)
    after = transfers(gpu_cache_daemon)
    assert after["evictions"] > before["evictions"]
    assert after["out"] > before["out"] and after["in"] > before["in"]
    assert 0 < after["resident"] <= 8 * 64 * 1024
    opt.close()
