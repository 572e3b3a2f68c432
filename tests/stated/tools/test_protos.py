"""The committed generated code is what the pinned generator makes of protos/ (no drift)."""

from __future__ import annotations

import pathlib

from stated.tools import protogen


def test_generated_code_has_not_drifted(tmp_path):
    written = protogen.generate(tmp_path)
    assert {p.name for p in written} == {"state_service_pb2.py", "state_service_pb2_grpc.py"}
    committed = protogen.REPO / "stated" / "v1"
    for fresh in written:
        ours = committed / fresh.name
        assert ours.exists(), f"{ours} is missing: run `make protos`"
        assert ours.read_bytes() == fresh.read_bytes(), f"{ours} differs from protos/: run `make protos` and commit"


def test_service_has_the_contracted_rpcs():
    from stated.v1 import state_service_pb2 as pb

    service = pb.DESCRIPTOR.services_by_name["StateService"]
    assert pb.DESCRIPTOR.package == "stated.v1"
    methods = {m.name for m in service.methods}
    assert {"Attach", "Register", "Step", "ExportState", "ImportState", "Detach", "GetStats"} <= methods
    for method in service.methods:
        assert method.input_type.name == f"{method.name}Request"
        assert method.output_type.name == f"{method.name}Response"


def test_enums_start_unspecified():
    from stated.v1 import state_service_pb2 as pb

    for enum in pb.DESCRIPTOR.enum_types_by_name.values():
        assert enum.values[0].number == 0 and enum.values[0].name.endswith("_UNSPECIFIED")


def test_proto_lives_in_versioned_package():
    assert (pathlib.Path(protogen.PROTO_ROOT) / "stated" / "v1" / "state_service.proto").exists()
