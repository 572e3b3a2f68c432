"""State bytes per parameter, as the daemon reports them (GetStats, /metrics, `stated status`)."""

from __future__ import annotations

import io

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

import stated
from stated.tools.status import show_status
from stated.v1 import state_service_pb2 as pb


class TinyGPT(torch.nn.Module):
    """GPT-2 style names (wte, wpe, attn.c_attn split into q/k/v projections, mlp c_fc/c_proj, ln_*)."""

    def __init__(self, vocab: int = 512, d: int = 128, layers: int = 2, ctx: int = 64):
        super().__init__()
        self.wte = torch.nn.Embedding(vocab, d)
        self.wpe = torch.nn.Embedding(ctx, d)
        self.blocks = torch.nn.ModuleList()
        for _ in range(layers):
            block = torch.nn.Module()
            block.ln_1 = torch.nn.LayerNorm(d)
            block.q_proj, block.k_proj, block.v_proj, block.o_proj = (torch.nn.Linear(d, d) for _ in range(4))
            block.ln_2 = torch.nn.LayerNorm(d)
            block.c_fc, block.c_proj = torch.nn.Linear(d, 4 * d), torch.nn.Linear(4 * d, d)
            self.blocks.append(block)
        self.ln_f = torch.nn.LayerNorm(d)
        self.lm_head = torch.nn.Linear(d, vocab, bias=False)

    def forward(self, idx):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for b in self.blocks:
            h = b.ln_1(x)
            att = torch.softmax(b.q_proj(h) @ b.k_proj(h).transpose(1, 2) / h.shape[-1] ** 0.5, -1) @ b.v_proj(h)
            x = x + b.o_proj(att)
            x = x + b.c_proj(torch.nn.functional.gelu(b.c_fc(b.ln_2(x))))
        return self.lm_head(self.ln_f(x))


def stats_for(opt) -> pb.SessionStats:
    stats = opt._connection.call("GetStats", pb.GetStatsRequest())
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


def test_adamw_holds_8_bytes_per_parameter(address):
    model = big_matrices()
    opt = stated.AdamW(model.parameters(), address=address)
    one_step(model, opt)
    assert stats_for(opt).state_bytes_per_parameter == 8.0
    opt.close()


def test_adamw8bit_holds_at_most_2_04_bytes_per_parameter(address):
    model = big_matrices()  # every tensor has 4096 elements or more
    opt = stated.AdamW8bit(model.parameters(), address=address)
    one_step(model, opt)
    figure = stats_for(opt).state_bytes_per_parameter
    assert figure <= 2.04
    assert figure == pytest.approx(2 + 2 * 4 / 256)  # two uint8 codes + two fp32 absmax per 256 elements
    opt.close()


def test_lion_holds_4_bytes_per_parameter(address):
    model = big_matrices()
    opt = stated.Lion(model.parameters(), address=address)
    one_step(model, opt)
    assert stats_for(opt).state_bytes_per_parameter == 4.0
    opt.close()


def test_adafactor_holds_its_factored_size(address):
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.Linear(512, 64))
    opt = stated.Adafactor(model.parameters(), address=address)
    one_step(model, opt)
    expected = 4 * ((512 + 256) + 512 + (64 + 512) + 64)  # row + col per matrix, full variance per bias
    stats = stats_for(opt)
    assert stats.state_bytes == expected
    assert stats.state_bytes_per_parameter == pytest.approx(expected / sum(p.numel() for p in model.parameters()))
    opt.close()


def test_slimadam_holds_at_most_4_1_bytes_per_parameter_on_a_gpt(address):
    model = TinyGPT()
    opt = stated.SlimAdam(model.named_parameters(), lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1,
                          address=address)
    one_step(model, opt)
    figure = stats_for(opt).state_bytes_per_parameter
    assert 4.0 < figure <= 4.1
    opt.close()


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
