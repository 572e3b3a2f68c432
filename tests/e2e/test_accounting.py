"""State bytes per parameter, as the daemon reports them (GetStats, /metrics, `stated status`)."""

from __future__ import annotations

import io

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

import stated
from stated.tools.status import show_status
from stated.v1 import state_service_pb2 as pb


from support.imports import import_from

# GPT-2 style names (wte, wpe, q/k/v/o projections, mlp c_fc/c_proj, ln_*), as bench/quality.py trains.
TinyGPT = import_from("bench", "tiny_gpt").TinyGPT


def stats_for(opt) -> pb.SessionStats:
    stats = opt._connection.call("GetStats", pb.GetStatsRequest(session=opt._session))
    return [s for s in stats.sessions if s.id == opt.session_id][0]


def one_step(model, opt) -> None:
    if isinstance(model, TinyGPT):
        loss = model(torch.randint(0, 512, (2, 16))).float().logsumexp(-1).mean()
    else:
        loss = model(torch.randn(4, model[0].in_features)).square().mean()
    loss.backward()
    opt.step()


def big_matrices() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(256, 512, bias=False), torch.nn.Linear(512, 256, bias=False))


def stats_after_one_step(address, cls, model, params=None, **kwargs) -> pb.SessionStats:
    """The session's stats after one step of `cls` over `params` (the model's parameters if None)."""
    opt = cls(model.parameters() if params is None else params, address=address, **kwargs)
    one_step(model, opt)
    stats = stats_for(opt)
    opt.close()
    return stats


@pytest.mark.parametrize("cls,figure", [(stated.AdamW, 8.0), (stated.Lion, 4.0)])
def test_holds_a_fixed_number_of_bytes_per_parameter(address, cls, figure):
    assert stats_after_one_step(address, cls, big_matrices()).state_bytes_per_parameter == figure


def test_adamw8bit_holds_at_most_2_04_bytes_per_parameter(address):
    # every tensor of big_matrices has 4096 elements or more
    figure = stats_after_one_step(address, stated.AdamW8bit, big_matrices()).state_bytes_per_parameter
    assert figure <= 2.04
    assert figure == pytest.approx(2 + 2 * 4 / 256)  # two uint8 codes + two fp32 absmax per 256 elements


def test_adafactor_holds_its_factored_size(address):
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.Linear(512, 64))
    stats = stats_after_one_step(address, stated.Adafactor, model)
    expected = 4 * ((512 + 256) + 512 + (64 + 512) + 64)  # row + col per matrix, full variance per bias
    assert stats.state_bytes == expected
    assert stats.state_bytes_per_parameter == pytest.approx(expected / sum(p.numel() for p in model.parameters()))


def test_slimadam_holds_at_most_4_1_bytes_per_parameter_on_a_gpt(address):
    model = TinyGPT(vocab=512)
    stats = stats_after_one_step(address, stated.SlimAdam, model, model.named_parameters(), lr=1e-3,
                                 betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    assert 4.0 < stats.state_bytes_per_parameter <= 4.1


def test_figures_reach_metrics_and_status(daemon):
    model = big_matrices()
    opt = stated.Lion(model.parameters(), address=daemon.address, job="accounting-lion")
    one_step(model, opt)
    families = {f.name: f for f in text_string_to_metric_families(daemon.scrape())}
    per_algorithm = {s.labels["algorithm"]: s.value for s in families["stated_state_bytes_per_parameter"].samples}
    assert per_algorithm["lion"] == 4.0
    assert set(per_algorithm) >= {"adamw", "adamw8bit", "adafactor", "came", "lion", "slimadam", "sgd", "adam"}
    out = io.StringIO()
    show_status(daemon.address, out)
    line = [l for l in out.getvalue().splitlines() if l.startswith("accounting-lion")][0]
    assert "4.000" in line
    opt.close()
