"""deploy/: every file parses, names only metrics the daemon exports, and passes only flags `stated serve`
accepts. YAML checks skip where PyYAML is not installed (it is not a project dependency)."""

from __future__ import annotations

import json
import pathlib
import re

import pytest

from stated.metrics import Metrics

DEPLOY = pathlib.Path(__file__).resolve().parents[2] / "deploy"
METRIC = re.compile(r"(?<![:\w])stated_[a-z_]+\b(?!:)")  # not the middle of a recorded name a:stated_b:c
LABEL = re.compile(r'\b(tier|result|path|code)\s*=~?\s*"([^"]*)"')


def _exported() -> tuple[set[str], dict[str, set[str]]]:
    """Sample names (stated_x_total, stated_y_bucket, ...) and label values the daemon's registry has."""
    names: set[str] = set()
    labels: dict[str, set[str]] = {}
    for family in Metrics().registry.collect():
        for sample in family.samples:
            names.add(sample.name)
            for key, value in sample.labels.items():
                labels.setdefault(key, set()).add(value)
    return names, labels


def _check_queries(exprs: list[str]) -> None:
    names, labels = _exported()
    assert exprs
    for expr in exprs:
        for name in METRIC.findall(expr):
            assert name in names, f"{name} (in {expr!r}) is not a metric the daemon exports"
        for key, value in LABEL.findall(expr):
            for alternative in value.split("|"):
                assert alternative in labels[key], f'{key}="{alternative}" (in {expr!r}) is never exported'


def _yaml():
    return pytest.importorskip("yaml", reason="PyYAML is not installed; the YAML checks need it")


def _serve_flags() -> set[str]:
    from stated.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return set(sub.choices["serve"]._option_string_actions)


def test_dashboard_is_json_over_exported_metrics():
    dash = json.loads((DEPLOY / "grafana" / "stated-dashboard.json").read_text())
    assert dash["panels"] and len({p["id"] for p in dash["panels"]}) == len(dash["panels"])
    _check_queries([t["expr"] for p in dash["panels"] for t in p["targets"]])


def test_rules_parse_and_use_exported_metrics():
    rules = _yaml().safe_load((DEPLOY / "prometheus" / "rules.yaml").read_text())
    all_rules = [r for g in rules["groups"] for r in g["rules"]]
    recorded = {r["record"] for r in all_rules if "record" in r}
    alerts = [r for r in all_rules if "alert" in r]
    assert {"StatedStepStallHigh", "StatedStepLatencyHigh"} <= {a["alert"] for a in alerts}
    for a in alerts:
        assert a["labels"]["severity"] and a["annotations"]["summary"] and "for" in a
    for r in all_rules:
        for used in re.findall(r"\b[a-z_]+:[a-z_0-9]+:[a-z_0-9]+\b", r["expr"]):
            assert used in recorded, f"{used} is used but never recorded"
    _check_queries([r["expr"] for r in all_rules])
    stall = next(a for a in alerts if a["alert"] == "StatedStepStallHigh")
    assert "> 0.20" in stall["expr"] and stall["for"] == "10m"


def test_daemonset_shares_socket_ipc_and_state_dir():
    docs = list(_yaml().safe_load_all((DEPLOY / "kubernetes" / "daemonset.yaml").read_text()))
    ds = next(d for d in docs if d["kind"] == "DaemonSet")
    pod = ds["spec"]["template"]
    spec = pod["spec"]
    assert spec["hostIPC"] is True
    assert pod["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    host_paths = {v["hostPath"]["path"] for v in spec["volumes"] if "hostPath" in v}
    assert host_paths == {"/run/stated", "/var/lib/stated"}
    (daemon,) = spec["containers"]
    assert daemon["resources"]["requests"]["memory"] and daemon["resources"]["requests"]["cpu"]
    assert daemon["args"][0] == "serve"
    monitor = _yaml().safe_load((DEPLOY / "kubernetes" / "podmonitor.yaml").read_text())
    assert monitor["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert monitor["spec"]["podMetricsEndpoints"][0]["port"] == daemon["ports"][0]["name"]


def _unit() -> dict[str, dict[str, list[str]]]:
    """The systemd unit as section -> key -> values, continuation lines joined."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    text = re.sub(r"\\\n\s*", " ", (DEPLOY / "stated.service").read_text())
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key, []).append(value)
    return sections


def test_systemd_unit():
    service = _unit()["Service"]
    one = {k: v[-1] for k, v in service.items()}
    assert one["Restart"] == "on-failure" and one["KillSignal"] == "SIGTERM"
    assert one["LimitMEMLOCK"] == "infinity"
    assert one["RuntimeDirectory"] == "stated" and one["StateDirectory"] == "stated"
    # Settings that would break CUDA devices or CUDA IPC between daemon and trainers must stay off.
    for key in ("PrivateDevices", "PrivateIPC", "ProtectClock", "MemoryDenyWriteExecute"):
        assert one.get(key, "no") == "no", key
    exec_start = one["ExecStart"].split()
    assert exec_start[1] == "serve"
    for flag, value in (("--socket", "/run/stated/stated.sock"), ("--state-dir", "/var/lib/stated"),
                        ("--metrics-addr", "127.0.0.1:9464")):
        assert exec_start[exec_start.index(flag) + 1] == value
    assert "--host-memory" in exec_start


def test_deploy_files_pass_only_flags_that_serve_accepts():
    flags = {a for a in _unit()["Service"]["ExecStart"][-1].split() if a.startswith("--")}
    docs = _yaml().safe_load_all((DEPLOY / "kubernetes" / "daemonset.yaml").read_text())
    ds = next(d for d in docs if d["kind"] == "DaemonSet")
    flags |= {a.split("=", 1)[0] for a in ds["spec"]["template"]["spec"]["containers"][0]["args"][1:]}
    flags |= set(re.findall(r'"(--[a-z-]+)"', (DEPLOY / "Dockerfile").read_text()))
    missing = flags - _serve_flags()
    assert not missing, f"flags that stated serve does not accept: {sorted(missing)}"


def test_dockerfile_copies_what_the_package_needs():
    text = (DEPLOY / "Dockerfile").read_text()
    assert "ARG PYTHON_VERSION=3.11" in text and "FROM python:${PYTHON_VERSION}-slim" in text
    assert 'ARG EXTRAS=""' in text
    root = DEPLOY.parent
    for line in text.splitlines():
        if line.startswith("COPY ") and "--from" not in line:
            for source in line.split()[1:-1]:
                assert (root / source).exists(), f"{source} is copied but not in the repository"
