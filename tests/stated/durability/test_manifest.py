"""Manifests: written atomically, read back whole, and a torn or damaged one told apart (Note [checkpoint
order] in stated.durability.manifest)."""

from __future__ import annotations

import json
import os

import pytest

from stated.durability.manifest import Manifest, read_manifest, write_manifest
from stated.errors import DataLoss


def manifest(step: int = 7) -> Manifest:
    regions = [{"device": "", "arena_bytes": 4096, "groups": [{"lr": 0.1, "amsgrad": False}],
                "tensors": [[[4, 8], "float32", 0, "w"], [[8], "float32", 0, "b"]]}]
    return Manifest("job", 2, step, "adamw", False, 65536, regions, [1, 2, 3],
                    [[step, 0], [step, 65536], [3, 4096]], [4], 5, 100, 1.5)


def test_a_written_manifest_reads_back_equal_and_leaves_no_temporary(tmp_path):
    path = write_manifest(str(tmp_path), manifest())
    assert os.path.basename(path) == "7.manifest" and sorted(os.listdir(tmp_path)) == ["7.manifest"]
    again = read_manifest(path)
    assert again.body() == manifest().body() and again.path == path
    assert again.fingerprint == manifest().fingerprint


def test_the_fingerprint_follows_the_layout_not_the_hyperparameters():
    a, b = manifest(), manifest()
    b.regions = [{**b.regions[0], "groups": [{"lr": 0.5, "amsgrad": False}]}]
    assert a.fingerprint == b.fingerprint
    b.regions[0]["tensors"][0][0] = [4, 9]
    assert a.fingerprint != b.fingerprint


@pytest.mark.parametrize("damage", ["truncate", "flip", "edit", "empty"])
def test_a_torn_or_damaged_manifest_is_data_loss_naming_it(tmp_path, damage):
    path = write_manifest(str(tmp_path), manifest())
    raw = open(path, "rb").read()
    if damage == "truncate":
        raw = raw[: len(raw) // 2]
    elif damage == "flip":
        i = raw.index(b'"step"') + 10
        raw = raw[:i] + bytes([raw[i] ^ 0x01]) + raw[i + 1:]
    elif damage == "edit":  # valid JSON, a changed value: only the checksum tells
        body = json.loads(raw)
        body["step"] = 8
        raw = json.dumps(body).encode()
    else:
        raw = b""
    with open(path, "wb") as f:
        f.write(raw)
    with pytest.raises(DataLoss, match=str(path)):
        read_manifest(path)


def test_a_format_2_manifest_reads_with_its_slots_as_byte_offsets(tmp_path):
    """Format 2 (before frozen state files) said a page's place in slots; it still resumes."""
    from stated.durability.manifest import _body_checksum

    body = {**manifest().body(), "format": 2, "page_places": [[7, 0], [7, 1], [3, 2]]}
    body.pop("checksum", None)
    path = tmp_path / "7.manifest"
    path.write_text(json.dumps({**body, "checksum": _body_checksum(body)}))
    again = read_manifest(str(path))
    assert again.page_places == [[7, 0], [7, 65536], [3, 2 * 65536]]
    assert again.page_checksums == [1, 2, 3] and again.step == 7
