"""Regenerates the committed gRPC code in stated/v1 from protos/stated/v1 (`make protos`).

The generator is pinned (grpcio-tools 1.66.2, protobuf 5.27 gencode) so that the committed code loads
with every protobuf runtime from 5.27 on; tests/stated/test_protos.py regenerates into a temporary
directory and fails when the committed files have drifted.
"""

from __future__ import annotations

import pathlib
import sys

PINNED_GENERATOR = "1.66.2"
REPO = pathlib.Path(__file__).resolve().parents[2]
PROTO_ROOT = REPO / "protos"


def proto_files() -> list[pathlib.Path]:
    return sorted((PROTO_ROOT / "stated" / "v1").glob("*.proto"))


def generator_version() -> str:
    from importlib.metadata import version

    return version("grpcio-tools")


def generate(out_dir: pathlib.Path) -> list[pathlib.Path]:
    """Writes <out_dir>/stated/v1/*_pb2.py and *_pb2_grpc.py; returns the files written."""
    from grpc_tools import protoc

    found = generator_version()
    if found != PINNED_GENERATOR:
        raise RuntimeError(
            f"grpcio-tools {found} is installed but the committed code comes from {PINNED_GENERATOR}; "
            f"run `pip install grpcio-tools=={PINNED_GENERATOR}` (make venv does)"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    protos = [str(p.relative_to(PROTO_ROOT)) for p in proto_files()]
    args = ["protoc", f"-I{PROTO_ROOT}", f"--python_out={out_dir}", f"--grpc_python_out={out_dir}", *protos]
    code = protoc.main(args)
    if code != 0:
        raise RuntimeError(f"protoc failed with exit code {code}: {' '.join(args)}")
    return sorted((out_dir / "stated" / "v1").glob("*_pb2*.py"))


def main() -> int:
    written = generate(REPO)
    for path in written:
        print(f"wrote {path.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
