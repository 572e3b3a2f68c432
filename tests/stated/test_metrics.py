"""The Prometheus endpoint, scraped over HTTP and parsed with prometheus-client's own parser."""

from __future__ import annotations

import torch
from prometheus_client.parser import text_string_to_metric_families

import stated


def scrape(daemon) -> dict[str, dict[tuple, float]]:
    samples: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(daemon.scrape()):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def test_metrics_endpoint_reports_sessions_state_and_step_times(daemon):
    before = scrape(daemon)
    assert before["stated_sessions"][()] == 0
    # Labelled series exist from the first scrape, at zero.
    for tier in ("gpu", "host"):
        assert before["stated_page_faults_total"][(("tier", tier),)] == 0
    for path in ("disk_to_host", "host_to_disk", "host_to_gpu", "gpu_to_host"):
        assert before["stated_transfer_bytes_total"][(("path", path),)] == 0

    model = torch.nn.Linear(64, 32)
    opt = stated.AdamW(model.parameters(), address=daemon.address)
    for _ in range(5):
        opt.zero_grad()
        model(torch.randn(4, 64)).sum().backward()
        opt.step()
    during = scrape(daemon)
    assert during["stated_sessions"][()] == 1
    params = 64 * 32 + 32
    assert during["stated_parameters"][()] == params
    assert during["stated_state_bytes"][()] >= 8 * params  # exp_avg and exp_avg_sq, fp32
    count = during["stated_step_duration_seconds_count"][()] - before["stated_step_duration_seconds_count"][()]
    assert count == 5
    assert during["stated_step_duration_seconds_sum"][()] > 0
    opt.close()
    after = scrape(daemon)
    assert after["stated_sessions"][()] == 0
    assert after["stated_state_bytes"][()] == 0
