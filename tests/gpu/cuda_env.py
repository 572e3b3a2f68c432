"""What every GPU test module calls first: skip the whole module unless CuPy and a CUDA device (for the
daemon) and torch with CUDA (for the trainer) are all here."""

from __future__ import annotations

import pytest


def require_cuda(devices_needed: int = 1, why: str = "") -> None:
    """Skips unless CuPy, torch with CUDA and `devices_needed` CUDA devices are here (`why`: what the
    devices are for, said in the skip)."""
    cp = pytest.importorskip("cupy", reason="the daemon's CUDA backend needs CuPy (pip install 'stated[cuda]')")
    try:
        devices = cp.cuda.runtime.getDeviceCount()
    except Exception:  # noqa: BLE001 - no driver, no device: the same for these tests
        devices = 0
    if devices < devices_needed:
        pytest.skip(f"{why}{devices_needed} CUDA devices needed, {devices} here" if why or devices_needed > 1
                    else "no CUDA device", allow_module_level=True)
    import torch

    if not torch.cuda.is_available():
        pytest.skip("torch was built without CUDA", allow_module_level=True)
