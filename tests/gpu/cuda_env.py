"""What every GPU test module calls first: skip the whole module unless CuPy and a CUDA device (for the
daemon) and torch with CUDA (for the trainer) are all here."""

from __future__ import annotations

import pytest


def require_cuda() -> None:
    cp = pytest.importorskip("cupy", reason="the daemon's CUDA backend needs CuPy (pip install 'stated[cuda]')")
    try:
        devices = cp.cuda.runtime.getDeviceCount()
    except Exception:  # noqa: BLE001 - no driver, no device: the same for these tests
        devices = 0
    if devices == 0:
        pytest.skip("no CUDA device", allow_module_level=True)
    import torch

    if not torch.cuda.is_available():
        pytest.skip("torch was built without CUDA", allow_module_level=True)
