"""The import boundaries between the packages, read from the source with `ast`.

- the client (client/stated_client) imports no `stated` module but the generated wire code, stated.v1;
- the kernels (kernels/stated_kernels) import neither `stated` nor `stated_client`;
- the core (stated/*.py but cli.py and __main__.py, stated/paging/, stated/backends/) imports no grpc:
  errors carry plain status names, and the wire's edge (stated/server/) turns them into gRPC codes;
- only CUDA modules (a file name with `cuda` in it) import cupy.

Every import counts: at the top of a module or inside a function, `import x`, `from x import y`, and
importlib.import_module("x") with a literal name. The last tests show that the checker sees a crossing.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("stated", "client/stated_client", "kernels/stated_kernels")


def within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def module_name(path: str) -> str:
    """'client/stated_client/wire.py' -> 'stated_client.wire' (a package's __init__ keeps its name)."""
    parts = list(PurePosixPath(path).with_suffix("").parts)
    return ".".join(parts[1:] if parts[0] in ("client", "kernels") else parts)


def imports(source: str, path: str) -> Iterator[tuple[int, str]]:
    """(line, absolute module name) for every import in `source`, wherever it stands."""
    package = module_name(path).rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(source, path)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                yield node.lineno, f"{base}.{alias.name}"
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None))
              in ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)):
            yield node.lineno, node.args[0].value


def is_client(path: PurePosixPath) -> bool:
    return path.parts[:2] == ("client", "stated_client")


def is_kernels(path: PurePosixPath) -> bool:
    return path.parts[:2] == ("kernels", "stated_kernels")


def is_core(path: PurePosixPath) -> bool:
    top_level = path.parent == PurePosixPath("stated") and path.name not in ("cli.py", "__main__.py")
    return top_level or path.parts[:2] in (("stated", "paging"), ("stated", "backends"))


def is_cuda(path: PurePosixPath) -> bool:
    return "cuda" in path.stem


@dataclass(frozen=True)
class Rule:
    says: str
    applies: Callable[[PurePosixPath], bool]
    forbids: Callable[[str], bool]


RULES = (
    Rule("the client imports no stated module but stated.v1", is_client,
         lambda name: within(name, "stated") and not within(name, "stated.v1")),
    Rule("stated_kernels imports neither stated nor stated_client", is_kernels,
         lambda name: within(name, "stated") or within(name, "stated_client")),
    Rule("the core imports no grpc", is_core, lambda name: within(name, "grpc") or within(name, "grpc_health")),
    Rule("only CUDA modules import cupy", lambda path: not is_cuda(path), lambda name: within(name, "cupy")),
)


def crossings(sources: dict[str, str]) -> list[str]:
    """One line per forbidden import in `sources` (repository path -> source text)."""
    found = []
    for path, source in sorted(sources.items()):
        rules = [rule for rule in RULES if rule.applies(PurePosixPath(path))]
        for line, name in imports(source, path):
            found += [f"{path}:{line} imports {name} ({rule.says})" for rule in rules if rule.forbids(name)]
    return found


def tree_sources() -> dict[str, str]:
    sources = {}
    for package in PACKAGES:
        for file in sorted((ROOT / package).rglob("*.py")):
            sources[file.relative_to(ROOT).as_posix()] = file.read_text()
    return sources


def test_the_tree_keeps_its_import_boundaries():
    sources = tree_sources()
    assert any(path.startswith("client/stated_client/") for path in sources)
    assert crossings(sources) == []


def test_the_core_loads_no_grpc():
    """Also at run time: importing every core module (and what it imports in turn) loads no grpc."""
    core = sorted(module_name(path) for path in tree_sources()
                  if is_core(PurePosixPath(path)) and not is_cuda(PurePosixPath(path)))
    script = "import sys\n" + "".join(f"import {name.removesuffix('.__init__')}\n" for name in core) + (
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('grpc', 'grpc_health')))")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ), cwd=ROOT)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"


# --- the checker sees a crossing -------------------------------------------------------------------


def test_the_checker_reports_each_kind_of_crossing():
    sources = {
        "client/stated_client/bad.py": "from stated.server.step_channel import frame\n"
                                       "from stated.v1 import state_service_pb2\n",
        "client/stated_client/late.py": "def f():\n    import stated.store\n",
        "client/stated_client/relative.py": "from . import protocol\n",
        "kernels/stated_kernels/bad.py": "import stated_client.wire\n",
        "kernels/stated_kernels/dynamic.py": "import importlib\nimportlib.import_module('stated.errors')\n",
        "stated/store.py": "import grpc\n",
        "stated/paging/pager.py": "from grpc_health.v1 import health\n",
        "stated/server/servicer.py": "import grpc\n",
        "stated/backends/cpu.py": "import cupy as cp\n",
        "stated/backends/cuda_memory.py": "import cupy as cp\n",
    }
    assert crossings(sources) == [
        "client/stated_client/bad.py:1 imports stated.server.step_channel.frame (the client imports no stated "
        "module but stated.v1)",
        "client/stated_client/late.py:2 imports stated.store (the client imports no stated module but stated.v1)",
        "kernels/stated_kernels/bad.py:1 imports stated_client.wire (stated_kernels imports neither stated nor "
        "stated_client)",
        "kernels/stated_kernels/dynamic.py:2 imports stated.errors (stated_kernels imports neither stated nor "
        "stated_client)",
        "stated/backends/cpu.py:1 imports cupy (only CUDA modules import cupy)",
        "stated/paging/pager.py:1 imports grpc_health.v1.health (the core imports no grpc)",
        "stated/store.py:1 imports grpc (the core imports no grpc)",
    ]


def test_the_core_is_the_top_level_paging_and_backends():
    assert is_core(PurePosixPath("stated/errors.py")) and is_core(PurePosixPath("stated/__init__.py"))
    assert is_core(PurePosixPath("stated/paging/disk_pager.py")) and is_core(PurePosixPath("stated/backends/cpu.py"))
    for edge in ("stated/cli.py", "stated/__main__.py", "stated/server/servicer.py", "stated/tools/status.py",
                 "stated/v1/state_service_pb2_grpc.py"):
        assert not is_core(PurePosixPath(edge)), edge
