"""The daemon's Prometheus metrics, on a private registry served at /metrics.

Names follow Prometheus' guides: one prefix, base units as suffixes, `_total` on counters, labels only
from small fixed sets, every labelled child pre-set to 0 so that series exist from the first scrape.
"""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

log = logging.getLogger("stated.metrics")

TIERS = ("gpu", "host", "disk")
FAULT_TIERS = ("gpu", "host")
PREFETCH_RESULTS = ("hit", "late")
TRANSFER_PATHS = ("disk_to_host", "host_to_disk", "host_to_gpu", "gpu_to_host")
STEP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.sessions = Gauge("stated_sessions", "Attached client sessions.", registry=r)
        self.state_bytes = Gauge("stated_state_bytes", "Bytes of optimizer state held, all tiers.", registry=r)
        self.bytes_per_parameter = Gauge(
            "stated_state_bytes_per_parameter",
            "Bytes of optimizer state per registered parameter, by algorithm (jobs are in GetStats and "
            "`stated status`: job names would make an unbounded label).", ["algorithm"], registry=r)
        self.parameters = Gauge("stated_parameters", "Parameters registered by all sessions.", registry=r)
        self.step_duration = Histogram("stated_step_duration_seconds", "Time the daemon spent applying one step.",
                                       buckets=STEP_BUCKETS, registry=r)
        self.steps = Counter("stated_steps_total", "Steps applied.", registry=r)
        # Limits (stated.limits): what the daemon ended because a client held it beyond one.
        self.unwatched_reaped = Counter("stated_unwatched_sessions_reaped_total",
                                        "Sessions detached because they opened no Watch within --watch-timeout.",
                                        registry=r)
        self.step_connections_closed = Counter(
            "stated_step_connections_closed_total", "Step channel connections the daemon closed or refused, by why: "
            "auth_timeout, idle_timeout, max_connections.", ["reason"], registry=r)
        for reason in ("auth_timeout", "idle_timeout", "max_connections"):
            self.step_connections_closed.labels(reason)
        self.errors = Counter("stated_request_errors_total", "Requests refused or failed, by gRPC status code.",
                              ["code"], registry=r)
        for code in ("INVALID_ARGUMENT", "NOT_FOUND", "PERMISSION_DENIED", "ALREADY_EXISTS",
                     "FAILED_PRECONDITION", "RESOURCE_EXHAUSTED", "DATA_LOSS", "INTERNAL"):
            self.errors.labels(code)
        self.page_faults = Counter("stated_page_faults_total", "Pages needed by a step but not resident in the tier.",
                                   ["tier"], registry=r)
        self.page_evictions = Counter("stated_page_evictions_total", "Pages evicted from the tier to make room.",
                                      ["tier"], registry=r)
        for tier in FAULT_TIERS:
            self.page_faults.labels(tier)
            self.page_evictions.labels(tier)
        self.prefetch = Counter("stated_prefetch_total",
                                "Prefetched pages: hit = ready when needed, late = the step waited for it.",
                                ["result"], registry=r)
        for result in PREFETCH_RESULTS:
            self.prefetch.labels(result)
        self.transfer_bytes = Counter("stated_transfer_bytes_total", "Bytes of page state moved between tiers.",
                                      ["path"], registry=r)
        for path in TRANSFER_PATHS:
            self.transfer_bytes.labels(path)
        self.stall_seconds = Counter("stated_step_stall_seconds_total",
                                     "Time steps spent waiting for pages to become resident.", registry=r)
        self.resident_bytes = Gauge("stated_resident_bytes", "Bytes of page state resident in the tier.",
                                    ["tier"], registry=r)
        for tier in TIERS:
            self.resident_bytes.labels(tier)
        self.checkpoints = Counter("stated_checkpoints_total", "Checkpoints written or failed.", ["result"],
                                   registry=r)
        for result in ("written", "failed"):
            self.checkpoints.labels(result)
        self.checkpoint_seconds = Histogram("stated_checkpoint_duration_seconds", "Time one checkpoint took.",
                                            buckets=(0.01, 0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300), registry=r)
        self.checkpoint_bytes = Counter("stated_checkpoint_bytes_total", "Bytes written by checkpoints.",
                                        registry=r)
        self.retained = Gauge("stated_retained_jobs", "(job, rank)s held without a trainer: retained or recovered.",
                              registry=r)

    def serve(self, host: str, port: int):
        """Starts the HTTP endpoint; returns the server (its port is the bound one, for port 0)."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return server
