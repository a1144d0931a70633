"""qwen3 bench's llama.cpp peer (benchmarks/llama_cpp.py): how it is built for the machine it runs on."""

from __future__ import annotations

from qwen3.bench import _llama_cpp_module


def test_llama_cpp_is_built_native_except_for_amx():
    """On a CPU with AMX the peer is built with every other extension the CPU has, and no AMX."""
    harness = _llama_cpp_module()
    assert harness.cmake_options({"avx2", "fma", "f16c"}) == harness.CMAKE_OPTIONS
    assert "-DGGML_NATIVE=ON" in harness.CMAKE_OPTIONS
    xeon = {"sse4_2", "avx", "avx2", "fma", "f16c", "bmi2", "avx512f", "avx512_vnni", "amx_tile", "amx_int8"}
    options = harness.cmake_options(xeon)
    assert "-DGGML_NATIVE=OFF" in options and "-DGGML_NATIVE=ON" not in options
    assert {"-DGGML_AVX512=ON", "-DGGML_AVX512_VNNI=ON", "-DGGML_AVX2=ON", "-DGGML_BMI2=ON"} <= set(options)
    assert {"-DGGML_AVX512_BF16=OFF", "-DGGML_AVX_VNNI=OFF"} <= set(options)  # not in this CPU's flags
    assert {"-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF"} <= set(options)
    assert set(harness.CMAKE_OPTIONS) - {"-DGGML_NATIVE=ON"} <= set(options)
