"""Every CUDA kernel source builds with NVRTC for sm_80 and sm_90, with every (param, state) dtype
instantiation resolving to a kernel symbol. NVRTC needs no GPU, so this runs on every machine that
has the cuda-python and nvidia-cuda-nvrtc-cu12 / nvidia-cuda-runtime-cu12 wheels (the dev extra)."""

from __future__ import annotations

import re

import numpy as np
import pytest

pytest.importorskip("cuda.bindings.nvrtc", reason="cuda-python's NVRTC bindings are not installed")

from stated_kernels import cuda_build, cuda_sources, cuda_tables  # noqa: E402

ARCHS = ("sm_80", "sm_90")


@pytest.fixture(scope="module")
def reports():
    if not cuda_sources.include_dirs():
        pytest.skip("cuda_bf16.h not found (nvidia-cuda-runtime-cu12 is not installed)")
    # Both architectures in one thread pool: NVRTC releases the GIL, so the jobs share the cores.
    return dict(zip(ARCHS, cuda_build.compile_archs(ARCHS)))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("algorithm", sorted(cuda_sources.kernel_sets()))
def test_source_compiles_with_every_instantiation(reports, arch, algorithm):
    report = next(s for s in reports[arch].sources if s.algorithm == algorithm)
    assert report.ok, f"{report.filename} for {arch}:\n{report.log}"
    assert not report.missing, f"unresolved name expressions: {report.missing}"
    assert set(report.lowered) == set(cuda_sources.name_expressions(algorithm))
    assert report.code_bytes > 0
    # Warnings are not errors, but a clean build keeps real problems visible.
    assert "warning" not in report.log, report.log


def test_compiling_leaves_python_s_shared_bytes_alone(reports):
    # A clean build has an empty log: NVRTC wrote its NUL into the buffer it was given.
    assert any(not s.log for r in reports.values() for s in r.sources)
    assert b" "[0] == 32 and " ".encode()[0] == 32


def test_every_kernel_is_instantiated_for_every_dtype_pair():
    for algorithm, spec in cuda_sources.kernel_sets().items():
        kernels = spec.kernels
        names = cuda_sources.name_expressions(algorithm)
        pairs = cuda_sources.dtype_pairs(algorithm)
        assert len(names) == len(kernels) * len(pairs)
        for param, _state in pairs:
            assert any(cuda_sources.CXX_TYPES[param] in n for n in names)


def test_sources_inline_the_header_and_name_their_kernels():
    header = cuda_sources.header()
    assert "struct StSegment" in header and "struct StTensor" in header
    for algorithm, spec in cuda_sources.kernel_sets().items():
        filename, kernels = spec.source, spec.kernels
        text = cuda_sources.source(algorithm)
        assert '#include "stated_common.cuh"' not in text
        assert "struct StSegment" in text
        for kernel in kernels:
            assert re.search(rf"\b{kernel}\(", text), f"{kernel} is not defined in {filename}"
    assert cuda_sources.source("adam") == cuda_sources.source("adamw")


def test_kernel_name_spells_torch_dtypes():
    torch = pytest.importorskip("torch")
    assert cuda_sources.kernel_name("stated_adamw", torch.bfloat16, torch.float32) == \
        "stated_adamw<__nv_bfloat16, float>"
    assert cuda_sources.kernel_name("stated_sgd", "float16", "float16") == "stated_sgd<__half, __half>"
    with pytest.raises(KeyError, match="float64"):
        cuda_sources.kernel_name("stated_sgd", torch.float64, torch.float64)


def test_table_layouts_match_the_header():
    header = cuda_sources.header()
    assert cuda_tables.SEGMENT_DTYPE.itemsize == 128
    assert cuda_tables.TENSOR_DTYPE.itemsize == 256
    assert f"ST_TILE = {cuda_tables.TILE}" in header
    assert f"ST_THREADS = {cuda_tables.THREADS}" in header
    assert f"ST_MAX_FIELDS = {cuda_tables.MAX_FIELDS}" in header
    assert f"ST_HP = {cuda_tables.N_HP}" in header
    assert f"ST_SMALL = {cuda_tables.N_SMALL}" in header
    # Field order of the numpy dtypes is the member order of the structs.
    segment_members = re.search(r"struct StSegment \{(.*?)\};", header, re.S).group(1)
    names = re.findall(r"^\s*(?:long long|unsigned long long|float)\s+(\w+)", segment_members, re.M)
    assert names == list(cuda_tables.SEGMENT_DTYPE.names)
    tensor_members = re.search(r"struct StTensor \{(.*?)\};", header, re.S).group(1)
    names = re.findall(r"^\s*(?:long long|unsigned long long|float)\s+(\w+)", tensor_members, re.M)
    assert names == list(cuda_tables.TENSOR_DTYPE.names)


def test_segment_table_counts_tiles():
    tile = cuda_tables.TILE
    table = cuda_tables.segment_table([
        {"param": 0, "grad": 0, "length": 1, "start": 0, "tensor": 0, "fields": [0, 64]},
        {"param": 64, "grad": 64, "length": tile, "start": 0, "tensor": 1, "fields": [128, None]},
        {"param": 9000, "grad": 9000, "length": 2 * tile + 1, "start": 5, "tensor": 2, "fields": []},
    ])
    assert table["tile0"].tolist() == [0, 1, 2]
    assert cuda_tables.total_tiles(table) == 5
    assert table["field"][1].tolist() == [128] + [-1] * (cuda_tables.MAX_FIELDS - 1)
    assert table["field"][2].tolist() == [-1] * cuda_tables.MAX_FIELDS
    with pytest.raises(ValueError, match="length 0"):
        cuda_tables.segment_table([{"param": 0, "grad": 0, "length": 0, "start": 0, "tensor": 0}])
    assert cuda_tables.total_tiles(cuda_tables.segment_table([])) == 0
    assert np.all(cuda_tables.tensor_table(3)["small"] == 0)


def test_header_builds_as_cplusplus11(reports):
    """CuPy or a caller may add its own -std; the sources must not need more than C++11."""
    report = cuda_build.compile_source("lion", "compute_80", ["-std=c++11"])
    assert report.ok, report.log
    assert not report.missing


def test_schedules_follow_the_cpu_modules():
    """Every algorithm's launches: as many page kernels as the CPU module has passes, a between list
    after every pass but the last, and only kernels that its source defines."""
    import stated_kernels

    for name, algorithm in stated_kernels.ALGORITHMS.items():
        schedule = algorithm.cuda.schedule
        kernels = set(algorithm.cuda.kernels)
        assert schedule.passes == algorithm.passes, name
        assert len(schedule.between) <= algorithm.passes - 1, name
        named = set(schedule.pages) | set(schedule.prepass) | {k for ks in schedule.between for k in ks}
        assert named == kernels, f"{name}: scheduled {sorted(named)}, defined {sorted(kernels)}"
        assert algorithm.cuda.single_block <= kernels, name
        # The kernels' source defines every scheduled kernel (checked by name in the text).
        text = cuda_sources.source(name)
        assert all(re.search(rf"\b{k}\(", text) for k in kernels), name


def test_gradstats_is_templated_on_the_gradient_type_alone():
    names = cuda_sources.name_expressions("gradstats")
    assert "stated_gradstats_partial<__nv_bfloat16>" in names
    assert len(names) == 2 * len(cuda_sources.CXX_TYPES)
    assert cuda_sources.kernel_name("stated_gradstats_finish", "float16") == "stated_gradstats_finish<__half>"
