"""The CPU decode kernels (qwen3.kernels) against float32 matrix products, and their torch fallback.

The first test to use the kernel builds it (~12 s on 2 cores; cached in ~/.cache/qwen3/kernels
afterwards). Where the CPU has no AVX512-BF16, the AVX-512 code path is still checked, through a
second build with the intrinsics replaced by scalar code; that build starts in the background when
this module is imported so that both compile at once.
"""

from __future__ import annotations

import os
import threading

import pytest
import torch
import torch.nn.functional as F

from qwen3 import kernels

_EMU_NAMESPACE = "qwen3_kernels_emu"
_emu: dict[str, object] = {}


def _build_emulated() -> None:
    try:
        _emu["ops"] = kernels._load("avx2", _EMU_NAMESPACE, ("QWEN3_EMULATE_AVX512BF16",))
    except Exception as e:  # reported by the test that needs it
        _emu["error"] = e


_emu_thread: threading.Thread | None = None
if kernels.cpu_kernel_isa() == "avx2" and os.environ.get(kernels.DISABLE_ENV, "") in ("", "0"):
    # Started at import so that it compiles while the first test builds the real kernel.
    _emu_thread = threading.Thread(target=_build_emulated, daemon=True)
    _emu_thread.start()


@pytest.fixture(params=["kernel", "fallback"])
def mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Runs a test once with the kernel (where it builds) and once with QWEN3_DISABLE_KERNELS=1."""
    if request.param == "fallback":
        monkeypatch.setenv(kernels.DISABLE_ENV, "1")
        assert not kernels.kernels_available()
    else:
        monkeypatch.delenv(kernels.DISABLE_ENV, raising=False)
    return request.param


def _reference(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    y = x.double() @ w.double().T
    return y if bias is None else y + bias.double()


def _assert_close(y: torch.Tensor, ref: torch.Tensor, rel: float = 1e-2) -> None:
    """bf16 tolerance: every element within rel * (largest |ref|) of the float64 result."""
    err = (y.double() - ref).abs().max().item()
    scale = ref.abs().max().item()
    assert err <= rel * scale, f"max abs error {err:.3g} vs max |ref| {scale:.3g}"


def _kernels_disabled() -> bool:
    return os.environ.get(kernels.DISABLE_ENV, "") not in ("", "0")


def test_kernel_builds_where_the_cpu_supports_it() -> None:
    """In CI (same machine kind) the kernel must build whenever the CPU has AVX512-BF16 or AVX2+FMA.

    Elsewhere (a developer machine without gcc or ninja) a failed build is reported as a skip; the
    other tests then check the fallback.
    """
    isa = kernels.cpu_kernel_isa()
    if isa is None or _kernels_disabled():
        assert not kernels.kernels_available()
        return
    if not kernels.kernels_available() and not os.environ.get("CI"):
        pytest.skip(f"CPU supports {isa} but the kernel did not build (gcc and ninja needed; see the log)")
    assert kernels.kernels_available(), (
        f"CPU supports {isa} but the kernel did not build (see the warning log)"
    )
    assert kernels.kernel_isa() == isa


@pytest.mark.parametrize("n,k", [(1000, 1000), (16, 32), (17, 33), (48, 2048), (3, 7)])
@pytest.mark.parametrize("m", [1, 2, 3, 8])
@pytest.mark.parametrize("with_bias", [False, True])
def test_packed_linear_matches_float(mode: str, n: int, k: int, m: int, with_bias: bool) -> None:
    g = torch.Generator().manual_seed(n * 1000 + k * 10 + m)
    w = torch.randn(n, k, generator=g).bfloat16()
    bias = torch.randn(n, generator=g).bfloat16() if with_bias else None
    packed = kernels.pack_linear_weight(w)
    assert (packed.data is not None) == (mode == "kernel" and kernels.kernels_available())
    for dtype in (torch.bfloat16, torch.float32):
        x = torch.randn(m, k, generator=g).to(dtype)
        y = kernels.packed_linear(x, packed, bias)
        assert y.shape == (m, n) and y.dtype == dtype
        _assert_close(y, _reference(x, w, bias))


def test_large_m_and_leading_dims(mode: str) -> None:
    g = torch.Generator().manual_seed(1)
    w = torch.randn(40, 96, generator=g).bfloat16()
    packed = kernels.pack_linear_weight(w)
    x = torch.randn(3, 7, 96, generator=g).bfloat16()  # 21 rows: several row tiles per block
    y = kernels.packed_linear(x, packed)
    assert y.shape == (3, 7, 40)
    _assert_close(y.reshape(21, 40), _reference(x.reshape(21, 96), w))


def test_non_contiguous_inputs(mode: str) -> None:
    g = torch.Generator().manual_seed(2)
    w = torch.randn(64, 100, generator=g).bfloat16()
    packed = kernels.pack_linear_weight(w.t().contiguous().t())  # non-contiguous weight packs too
    wide = torch.randn(3, 200, generator=g).bfloat16()
    for x in (wide[:, ::2], torch.randn(100, 3, generator=g).bfloat16().t(), wide[:, 50:150]):
        assert not x.is_contiguous()
        _assert_close(kernels.packed_linear(x, packed), _reference(x, w))


def test_other_activation_dtypes(mode: str) -> None:
    g = torch.Generator().manual_seed(3)
    w = torch.randn(32, 64, generator=g).bfloat16()
    x = torch.randn(2, 64, generator=g).half()
    y = kernels.packed_linear(x, kernels.pack_linear_weight(w))
    assert y.dtype == torch.float16
    _assert_close(y, _reference(x, w))


def test_non_bf16_weight_falls_back() -> None:
    w = torch.randn(32, 64)
    packed = kernels.pack_linear_weight(w)
    assert packed.data is None and packed.weight is w
    x = torch.randn(2, 64)
    torch.testing.assert_close(kernels.packed_linear(x, packed), F.linear(x, w))


@pytest.mark.parametrize("m", [1, 3, 8])
def test_gate_up_silu(mode: str, m: int) -> None:
    g = torch.Generator().manual_seed(4 + m)
    n, k = 200, 96
    gate, up = torch.randn(n, k, generator=g).bfloat16(), torch.randn(n, k, generator=g).bfloat16()
    packed = kernels.pack_gate_up_weight(gate, up)
    for dtype in (torch.bfloat16, torch.float32):
        x = torch.randn(m, k, generator=g).to(dtype)
        y = kernels.packed_gate_up_silu(x, packed)
        ref = F.silu(_reference(x, gate)) * _reference(x, up)
        assert y.shape == (m, n) and y.dtype == dtype
        _assert_close(y, ref)
    with pytest.raises(ValueError):
        kernels.packed_linear(x, packed)


def test_linear_dispatch(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(5)
    w = torch.randn(48, 64, generator=g).bfloat16()
    bias = torch.randn(48, generator=g).bfloat16()
    packed = kernels.pack_linear_weight(w)
    monkeypatch.setenv(kernels.ROW_LIMIT_ENV, "8")
    monkeypatch.delitem(kernels._state, "row_limit", raising=False)  # the limit is cached per process
    assert kernels.kernel_row_limit() == (8 if mode == "kernel" and kernels.kernels_available() else 0)
    for m in (1, 8, 9, 40):
        x = torch.randn(m, 64, generator=g).bfloat16()
        _assert_close(kernels.linear(x, w, packed, bias), _reference(x, w, bias))
    x = torch.randn(40, 64, generator=g).bfloat16()  # more rows than the limit: exactly F.linear
    torch.testing.assert_close(kernels.linear(x, w, packed, bias), F.linear(x, w, bias), rtol=0, atol=0)
    x = torch.randn(2, 64, generator=g).bfloat16()
    _assert_close(kernels.linear(x, w, None, bias), _reference(x, w, bias))
    monkeypatch.delenv(kernels.ROW_LIMIT_ENV)
    kernels._state.pop("row_limit", None)
    if mode == "kernel" and kernels.kernels_available():
        assert kernels.kernel_row_limit() >= 8


def test_wrong_feature_count_raises(mode: str) -> None:
    packed = kernels.pack_linear_weight(torch.randn(16, 40).bfloat16())
    with pytest.raises((ValueError, RuntimeError)):
        kernels.packed_linear(torch.randn(1, 41).bfloat16(), packed)


def test_fallback_is_exactly_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(kernels.DISABLE_ENV, "1")
    assert not kernels.kernels_available() and kernels.kernel_isa() is None
    w = torch.randn(24, 40).bfloat16()
    x = torch.randn(2, 40).bfloat16()
    packed = kernels.pack_linear_weight(w)
    assert packed.data is None and packed.weight is w
    torch.testing.assert_close(kernels.packed_linear(x, packed), F.linear(x, w), rtol=0, atol=0)


def test_avx512_path() -> None:
    """The AVX512-BF16 code path: natively where the CPU has it, else through the scalar emulation build."""
    isa = kernels.cpu_kernel_isa()
    if isa is None or _kernels_disabled():
        pytest.skip("no kernel on this CPU, or kernels disabled")  # never the case on CI's machines
    if isa == "avx512bf16":
        if not kernels.kernels_available() and not os.environ.get("CI"):
            pytest.skip("the kernel did not build")
        assert kernels.kernels_available(), "CPU has AVX512-BF16 but the kernel did not build"
        ops = torch.ops.qwen3_kernels
    else:
        assert _emu_thread is not None
        _emu_thread.join()
        if "error" in _emu and not os.environ.get("CI"):
            pytest.skip(f"emulated build failed: {_emu['error']}")
        assert "error" not in _emu, f"emulated build failed: {_emu.get('error')}"
        ops = _emu["ops"]
    assert str(ops.kernel_path()).startswith("avx512bf16")
    g = torch.Generator().manual_seed(6)
    for n, k, m in [(37, 70, 1), (64, 1024, 2), (33, 100, 3), (16, 64, 8), (50, 64, 11)]:
        w = torch.randn(n, k, generator=g).bfloat16()
        bias = torch.randn(n, generator=g)
        data = kernels._blocks(w)
        for dtype in (torch.bfloat16, torch.float32):
            x = torch.randn(m, k, generator=g).to(dtype)
            _assert_close(ops.packed_linear(x, data, n, bias), _reference(x, w, bias))
        gate, up = w, torch.randn(n, k, generator=g).bfloat16()
        pair = torch.stack([kernels._blocks(gate), kernels._blocks(up)], dim=1).reshape(-1, *data.shape[1:])
        x = torch.randn(m, k, generator=g).bfloat16()
        ref = F.silu(_reference(x, gate)) * _reference(x, up)
        _assert_close(ops.packed_gate_up_silu(x, pair, n), ref)


def test_model_with_packed_weights_tracks_the_torch_path(tmp_path) -> None:
    """A bf16 model on the kernels gives the logits of the same model on F.linear, to bf16 accuracy."""
    from qwen3 import load_model
    from tests.reference import make_hf_checkpoint

    folder = make_hf_checkpoint(tmp_path / "ckpt", attention_bias=True)
    plain = load_model(folder, dtype="bfloat16", progress=False)
    packed = load_model(folder, dtype="bfloat16", progress=False)
    assert packed.use_cpu_kernels() == kernels.kernels_available()
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = plain(ids).float(), packed(ids).float()
    assert (a - b).abs().max().item() < 0.05 * a.abs().max().item()
    assert (a.argmax(-1) == b.argmax(-1)).float().mean().item() > 0.9
    fp32 = load_model(folder, progress=False)
    assert not fp32.use_cpu_kernels()  # only bf16 weights are packed
