"""The CUDA backend's module loads on a machine without CuPy, and says how to get CuPy when it is made.

A daemon imports stated.backends.cuda only when a client registers CUDA tensors; the store turns the
error raised here into FAILED_PRECONDITION for that client (tests/stated/test_device_input.py). The
error must name the `cuda` extra, so that the fix is one command.
"""

from __future__ import annotations

import builtins
import importlib
import subprocess
import sys

import pytest

from stated.metrics import Metrics


def test_module_imports_without_cupy_in_a_fresh_interpreter():
    """Importing the backend (and the daemon, which names it) loads no CuPy."""
    code = ("import sys; sys.modules['cupy'] = None\n"  # any `import cupy` now fails
            "import stated.backends.cuda as c, stated.daemon\n"
            "assert c.CudaBackend.name == 'cuda' and c.CudaBackend.pin_host_memory\n"
            "print('ok')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


@pytest.fixture
def without_cupy(monkeypatch):
    real_import = builtins.__import__

    def refuse(name, *args, **kwargs):
        if name == "cupy" or name.startswith("cupy."):
            raise ModuleNotFoundError("No module named 'cupy'", name="cupy")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", refuse)
    for name in [n for n in sys.modules if n == "cupy" or n.startswith("cupy.")]:
        monkeypatch.delitem(sys.modules, name)


def test_constructing_without_cupy_names_the_cuda_extra(without_cupy):
    cuda = importlib.import_module("stated.backends.cuda")
    with pytest.raises(ImportError) as info:
        cuda.CudaBackend(1 << 20, 0, 4, Metrics())
    message = str(info.value)
    assert "pip install 'stated[cuda]'" in message, message
    assert "CuPy" in message


def test_the_store_turns_it_into_a_sentence_for_the_client(without_cupy):
    """The daemon's factory raises ImportError; the store's handler reports it (and keeps serving)."""
    from stated.errors import FailedPrecondition
    from stated.store import Store
    from stated.backends.cpu import CpuBackend

    cuda = importlib.import_module("stated.backends.cuda")
    store = Store(CpuBackend(), 1 << 20, cuda_backend=lambda: cuda.CudaBackend(1 << 20, 0, 4, Metrics()))
    session = store.attach("job", 0, "adamw", 1)
    with pytest.raises(FailedPrecondition, match=r"stated\[cuda\]"):
        store.register(session, [{}], [((4,), __import__("torch").float32, 0, "")],
                       device="8a2f0c3e-1b4d-4e5f-9a6b-7c8d9e0f1a2b")
    store.close_all()


@pytest.mark.parametrize("given,expected", [
    (bytes(range(16)), "000102030405060708090a0b0c0d0e0f"),
    ("GPU-8A2F0C3E-1b4d-4e5f-9a6b-7c8d9e0f1a2b", "8a2f0c3e1b4d4e5f9a6b7c8d9e0f1a2b"),
    ("8a2f0c3e-1b4d-4e5f-9a6b-7c8d9e0f1a2b", "8a2f0c3e1b4d4e5f9a6b7c8d9e0f1a2b"),
])
def test_device_uuids_compare_in_one_spelling(given, expected):
    cuda = importlib.import_module("stated.backends.cuda")
    assert cuda.uuid_key(given) == expected
