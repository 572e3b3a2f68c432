"""`stated status` against a real daemon."""

from __future__ import annotations

import io
import subprocess
import sys

import torch

import stated
from stated.tools.status import show_status


def test_status_lists_sessions(daemon):
    model = torch.nn.Linear(100, 10)
    opt = stated.AdamW(model.parameters(), address=daemon.address, job="status-job", rank=3)
    model(torch.randn(2, 100)).sum().backward()
    opt.step()
    out = io.StringIO()
    assert show_status(daemon.address, out) == 0
    text = out.getvalue()
    assert "1 sessions" in text
    line = [l for l in text.splitlines() if l.startswith("status-job")][0]
    assert line.split()[1] == "3" and "adamw" in line and "1,010" in line
    opt.close()


def test_status_without_daemon_names_the_address(tmp_path):
    missing = tmp_path / "nothing.sock"
    result = subprocess.run([sys.executable, "-m", "stated", "status", "--address", str(missing)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert str(missing) in result.stderr
