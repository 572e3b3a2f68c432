"""Imports a module from a folder of the repository that is not on sys.path (tests/gpu's CuPy stand-in,
bench's models) without leaving that folder on sys.path, where its other modules would shadow names."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]


def import_from(folder: str, name: str) -> ModuleType:
    """The module `name` in `folder` (relative to the repository root)."""
    sys.path.insert(0, str(ROOT / folder))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.pop(0)
