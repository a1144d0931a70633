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


def test_fp32_weights_and_other_dtypes(mode: str) -> None:
    """fp32 weights run on the kernel too (FMA path); fp16 weights fall back to F.linear."""
    g = torch.Generator().manual_seed(8)
    w = torch.randn(40, 72, generator=g)
    packed = kernels.pack_linear_weight(w)
    assert (packed.data is not None) == (mode == "kernel" and kernels.kernels_available())
    x = torch.randn(5, 72, generator=g)
    y = kernels.packed_linear(x, packed)
    assert y.dtype == torch.float32
    assert (y.double() - _reference(x, w)).abs().max().item() < 1e-4
    half = torch.randn(32, 64, generator=g).half()
    fallback = kernels.pack_linear_weight(half)
    assert fallback.data is None and fallback.weight is half
    xh = torch.randn(2, 64, generator=g).half()
    torch.testing.assert_close(kernels.packed_linear(xh, fallback), F.linear(xh, half))


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


def test_linear_dispatch(mode: str) -> None:
    """``linear`` takes the kernel for every row count when the weight is packed, F.linear otherwise."""
    g = torch.Generator().manual_seed(5)
    w = torch.randn(48, 64, generator=g).bfloat16()
    bias = torch.randn(48, generator=g).bfloat16()
    packed = kernels.pack_linear_weight(w)
    for m in (1, 8, 9, 40, 300):
        x = torch.randn(m, 64, generator=g).bfloat16()
        y = kernels.linear(x, w, packed, bias)
        _assert_close(y, _reference(x, w, bias))
        if packed.data is not None:
            torch.testing.assert_close(y, kernels.packed_linear(x, packed, bias), rtol=0, atol=0)
    x = torch.randn(2, 64, generator=g).bfloat16()
    _assert_close(kernels.linear(x, w, None, bias), _reference(x, w, bias))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rows_are_batch_invariant(dtype: torch.dtype) -> None:
    """A row's output is the same bits whatever else is in the call: alone, at any position of any M."""
    _needs_kernels()
    g = torch.Generator().manual_seed(11)
    for n, k in [(37, 70), (100, 256), (200, 1024)]:
        w = torch.randn(n, k, generator=g).to(dtype)
        bias = torch.randn(n, generator=g).to(dtype)
        packed = kernels.pack_linear_weight(w)
        gate_up = kernels.pack_gate_up_weight(w, torch.randn(n, k, generator=g).to(dtype))
        x = torch.randn(41, k, generator=g).to(dtype)
        full = kernels.packed_linear(x, packed, bias)
        full_gu = kernels.packed_gate_up_silu(x, gate_up)
        for lo, hi in [(0, 1), (7, 8), (40, 41), (3, 10), (5, 41), (0, 17)]:
            assert torch.equal(kernels.packed_linear(x[lo:hi], packed, bias), full[lo:hi]), (n, k, lo, hi)
            assert torch.equal(kernels.packed_gate_up_silu(x[lo:hi], gate_up), full_gu[lo:hi]), (n, k, lo, hi)


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
        group = int(ops.kernel_group())
        data = kernels._blocks(w, group)
        for dtype in (torch.bfloat16, torch.float32):
            x = torch.randn(m, k, generator=g).to(dtype)
            _assert_close(ops.packed_linear(x, data, n, bias), _reference(x, w, bias))
        gate, up = w, torch.randn(n, k, generator=g).bfloat16()
        pair = kernels._gate_up_blocks(gate, up, group)
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
    assert fp32.use_cpu_kernels() == kernels.kernels_available()  # fp32 runs on the kernels too
    with torch.no_grad():
        assert (fp32(ids) - load_model(folder, progress=False)(ids)).abs().max().item() < 1e-4
    assert not load_model(folder, dtype="float16", progress=False).use_cpu_kernels()


def _needs_kernels() -> None:
    if not kernels.kernels_available():
        pytest.skip("the kernels are not built here (test_kernel_builds_where_the_cpu_supports_it says why)")


@pytest.mark.parametrize("hq,hkv,d", [(16, 8, 128), (4, 2, 64), (12, 1, 32), (3, 3, 16)])
def test_paged_attention_matches_float(hq: int, hkv: int, d: int) -> None:
    """Decodes and prompt chunks of one step, over shuffled blocks, against float64 causal attention."""
    _needs_kernels()
    g = torch.Generator().manual_seed(hq * 100 + d)
    block_size, num_blocks = 16, 64
    keys = torch.randn(num_blocks, hkv, block_size, d, generator=g).bfloat16()
    values = torch.randn(num_blocks, hkv, block_size, d, generator=g).bfloat16()
    spans = [(37, 1), (0, 1), (100, 1), (250, 3), (0, 23), (5, 40), (16, 16)]  # (context, new tokens)
    free = torch.randperm(num_blocks, generator=g).tolist()
    tables = []
    for context, n in spans:
        count = -(-(context + n) // block_size)
        tables.append(free[:count])
        free = free[count:]
    width = max(len(t) for t in tables)
    block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    seq_lens = torch.tensor([c + n for c, n in spans], dtype=torch.int32)
    starts = torch.tensor([0, *torch.tensor([n for _, n in spans]).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(int(starts[-1]), hq, d, generator=g).bfloat16()
    # The new tokens' keys and values go in through the call; v as a strided view, as the model passes it.
    new = [(s, p) for s, (context, n) in enumerate(spans) for p in range(context, context + n)]
    slots = torch.tensor([tables[s][p // block_size] * block_size + p % block_size for s, p in new])
    new_k = keys[slots // block_size, :, slots % block_size].clone()
    new_v = torch.cat([values[slots // block_size, :, slots % block_size], new_k], dim=-1)[..., :d]
    keys[slots // block_size, :, slots % block_size] = 0
    values[slots // block_size, :, slots % block_size] = 0
    cache_k, cache_v = keys.clone(), values.clone()
    keys[slots // block_size, :, slots % block_size] = new_k
    values[slots // block_size, :, slots % block_size] = new_v
    scale = d**-0.5
    args = (block_tables, seq_lens, starts, scale)
    out = kernels.paged_attention(q, new_k, new_v, cache_k, cache_v, slots, *args)
    assert torch.equal(cache_k, keys) and torch.equal(cache_v, values)
    assert out.shape == q.shape and out.dtype == torch.bfloat16
    for s, (context, n) in enumerate(spans):
        pos = torch.arange(context + n)
        block, row = torch.tensor(tables[s])[pos // block_size], pos % block_size
        k = keys[block, :, row].double().transpose(0, 1).repeat_interleave(hq // hkv, dim=0)
        v = values[block, :, row].double().transpose(0, 1).repeat_interleave(hq // hkv, dim=0)
        rows = q[starts[s] : starts[s + 1]].double().transpose(0, 1)
        mask = torch.ones(n, context + n, dtype=torch.bool).tril(context)
        weights = (rows @ k.transpose(1, 2) * scale).masked_fill(~mask, float("-inf")).softmax(-1)
        ref = (weights @ v).transpose(0, 1)
        _assert_close(out[starts[s] : starts[s + 1]], ref, rel=1e-2)


def test_fused_norm_and_rope_match_the_torch_path() -> None:
    """rms_norm and qk_norm_rope round where layers.RMSNorm and apply_rotary do: equal to 1 bf16 ulp."""
    _needs_kernels()
    from qwen3.layers import RMSNorm, apply_rotary

    g = torch.Generator().manual_seed(7)
    tokens, hq, hkv, d = 9, 16, 8, 128

    def norm(dim: int) -> RMSNorm:
        module = RMSNorm(dim, 1e-6).to(torch.bfloat16)
        module.weight.data = (torch.randn(dim, generator=g) * 0.1 + 1).bfloat16()
        return module

    def close(a: torch.Tensor, b: torch.Tensor) -> None:  # mean(x^2) may be summed in another order
        torch.testing.assert_close(a, b, rtol=2**-7, atol=1e-6)
        assert (a != b).float().mean().item() < 0.01

    hidden = norm(1024)
    x = (torch.randn(5, 1024, generator=g) * 3).bfloat16()
    with torch.no_grad():
        close(kernels.rms_norm(x, hidden.weight, hidden.eps), hidden(x))
    qkv = torch.randn(tokens, (hq + 2 * hkv) * d, generator=g).bfloat16()
    q_norm, k_norm = norm(d), norm(d)
    angles = torch.randn(tokens, d, generator=g)
    cos, sin = angles.cos().bfloat16(), angles.sin().bfloat16()
    q, k, _ = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
    with torch.no_grad():
        ref_q = apply_rotary(q_norm(q.view(1, tokens, hq, d)), cos[None], sin[None])[0]
        ref_k = apply_rotary(k_norm(k.view(1, tokens, hkv, d)), cos[None], sin[None])[0]
        fused_q, fused_k = kernels.qk_norm_rope(qkv, q_norm.weight, k_norm.weight, cos, sin, hq, hkv, 1e-6)
    close(fused_q, ref_q)
    close(fused_k, ref_k)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_engine_kernel_attention_tracks_the_torch_path(tiny_checkpoint, dtype: str) -> None:
    """An engine step (decodes and a prompt chunk together) gives the same logits on the two backends."""
    _needs_kernels()
    from qwen3.llm import LLM
    from qwen3.sampling import SamplingParams

    def llm(backend: str) -> LLM:
        return LLM(str(tiny_checkpoint), dtype=dtype, max_model_len=256, kv_cache_memory="8MiB",
                   attention_backend=backend, progress=False)  # fmt: skip

    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    logits = {}
    for backend in ("kernel", "torch"):
        engine = llm(backend).engine
        g = torch.Generator().manual_seed(3)
        for i, length in enumerate([5, 40, 17]):
            if i:
                engine.step()
            engine.add_request(f"r{i}", torch.randint(0, 150000, (length,), generator=g).tolist(), params)
        scheduled = engine.scheduler.schedule().scheduled
        assert {n for _, n in scheduled} != {1}, "the step should mix decodes and a prompt chunk"
        seqs, logits[backend] = engine.runner.run(scheduled)
        order = {s.request_id: i for i, s in enumerate(seqs)}
        logits[backend] = logits[backend][[order[f"r{i}"] for i in range(3) if f"r{i}" in order]]
    kernel, torch_ = logits["kernel"].float(), logits["torch"].float()
    err = (kernel - torch_).abs().max().item()
    assert err < (0.05 if dtype == "bfloat16" else 1e-4) * torch_.abs().max().item()
    assert torch.equal(kernel.argmax(-1), torch_.argmax(-1))


def test_huge_page_buffers_are_aligned_zeroed_and_outlive_their_maker() -> None:
    """Packed weights live in 2 MiB-aligned anonymous memory advised for huge pages (small ones: torch.empty)."""
    t = kernels.huge_page_empty((3, 1 << 20), torch.bfloat16)  # 6 MiB
    assert t.shape == (3, 1 << 20) and t.dtype == torch.bfloat16 and t.is_contiguous()
    assert t.data_ptr() % (2 << 20) == 0 and not t.any()
    view = t[1:]
    del t  # the mapping belongs to the tensor's storage: a view keeps it alive
    view.fill_(1.5)
    assert view.float().sum().item() == 1.5 * 2 * (1 << 20)
    small = kernels.huge_page_empty((5, 7), torch.int16)
    assert small.shape == (5, 7) and small.dtype == torch.int16
    if kernels.kernels_available():
        w = torch.randn(1024, 1536, dtype=torch.bfloat16)
        packed = kernels.pack_linear_weight(w)
        assert packed.data.data_ptr() % (2 << 20) == 0
        x = torch.randn(3, 1536, dtype=torch.bfloat16)
        _assert_close(kernels.packed_linear(x, packed), _reference(x, w))
