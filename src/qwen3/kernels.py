"""qwen3's CPU kernels: linear layers, attention over the paged KV cache, RMSNorm and q/k-norm + RoPE.

At batch 1 a linear layer reads each weight once, so decoding speed is the speed at which the weights
stream from memory; torch's CPU kernels reach a third to a half of the machine's read bandwidth (see
``docs/benchmarks.md``). The C++ kernel in ``csrc/gemv.cpp`` streams weights that were repacked once, at
load, into blocks of 16 output rows, and computes several output rows per instruction (AVX512-BF16
``vdpbf16ps``, or FMA where that is all the CPU has). It runs every row count, decode and prefill alike,
and is batch-invariant: an output row is the same bits whatever else is in the call, because each output
element is one fp32 accumulation over k in order, for any M. That is what makes the engine's results
independent of batching (torch's GEMMs change their blocking with M).

Usage::

    packed = pack_linear_weight(weight)          # once, at load; weight is bf16 or fp32 [N, K]
    y = packed_linear(x, packed, bias)           # x is [..., K], bf16 or float32
    y = linear(x, weight, packed, bias)          # the kernel when packed, F.linear otherwise

The extension is compiled on first use with ``torch.utils.cpp_extension.load`` (gcc + ninja) into
``~/.cache/qwen3/kernels/<hash>``, the hash covering the source, torch's version and the instruction
set flags, so a second process loads the cached build. If the CPU lacks the instructions, the build
fails, or ``QWEN3_DISABLE_KERNELS=1`` is set, one warning is logged (none for the env var) and every
function here computes the same thing with ``torch.nn.functional.linear``: correctness never
depends on the kernel.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import math
import mmap
import os
import shutil
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

__all__ = [
    "DISABLE_ENV",
    "PackedWeight",
    "QuantWeight",
    "concat_quant_rows",
    "cpu_flags",
    "cpu_kernel_isa",
    "gate_up_silu",
    "interleave_gate_up",
    "kernel_isa",
    "kernels_available",
    "linear",
    "pack_gate_up_weight",
    "pack_linear_weight",
    "packed_gate_up_silu",
    "packed_linear",
    "paged_attention",
    "qk_norm_rope",
    "quant_linear",
    "quant_moe",
    "rms_norm",
]

DISABLE_ENV = "QWEN3_DISABLE_KERNELS"
"""Set to 1 to force the pure-torch fallback everywhere."""

ROW_BLOCK = 16
"""Output rows per packed block (one 512-bit register of fp32 accumulators)."""

K_ALIGN = 32
"""K is zero-padded to a multiple of this (one 64-byte cache line of bf16)."""

_KERNEL_DTYPES = (torch.bfloat16, torch.float32)  # activations, and packed weights

# One library: linear layers (gemv.cpp), quantized linear layers and MoE experts (quant.cpp), attention
# over the paged KV cache (attention.cpp), and the fused RMSNorm and q/k-norm + RoPE (norm_rope.cpp);
# common.h holds what they share (hashed into the build's cache key, not compiled on its own).
_CSRC = Path(__file__).parent / "csrc"
_SOURCES = tuple(_CSRC / name for name in ("gemv.cpp", "quant.cpp", "attention.cpp", "norm_rope.cpp"))
_HEADERS = (_CSRC / "common.h",)
_LIBRARY = "qwen3_kernels"

# Compiler flags for each instruction set the C++ source has a path for, best first, with the
# /proc/cpuinfo flags each needs. Explicit flags rather than -march=native: the cache key then names
# exactly what the build may use, and the path the source compiles is the one chosen here.
_ISA_FLAGS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "avx512bf16": (
        ("avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_vnni", "avx2", "fma"),
        (
            "-mavx512f",
            "-mavx512bw",
            "-mavx512vl",
            "-mavx512bf16",
            "-mavx512vnni",
            "-mavx2",
            "-mfma",
            "-mf16c",
        ),
    ),
    "avx2": (("avx2", "fma", "f16c"), ("-mavx2", "-mfma", "-mf16c")),
}

_lock = threading.Lock()
_state: dict[str, object] = {}  # "ops" -> loaded op namespace or None, once tried


def cpu_flags() -> set[str]:
    """The CPU feature flags the kernel reports to userspace (/proc/cpuinfo), empty if unknown."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_kernel_isa() -> str | None:
    """The best kernel instruction set this CPU supports ("avx512bf16", "avx2"), or None.

    None also on non-Linux/non-x86 machines, where the fallback is used.
    """
    flags = cpu_flags()
    for isa, (needed, _) in _ISA_FLAGS.items():
        if all(f in flags for f in needed):
            return isa
    return None


def _build_dir(isa: str, cflags: list[str]) -> Path:
    h = hashlib.sha256()
    for source in (*_SOURCES, *_HEADERS):
        h.update(source.read_bytes())
    for part in (torch.__version__, sys.version, isa, *cflags):
        h.update(b"\0" + part.encode())
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "qwen3" / "kernels" / h.hexdigest()[:16]


def _ensure_ninja_on_path() -> None:
    """torch runs ``ninja`` from PATH; find the one the ``ninja`` wheel installs when the venv is not activated."""
    if shutil.which("ninja"):
        return
    dirs = [Path(sys.executable).parent]
    try:
        import ninja  # the PyPI package

        dirs.insert(0, Path(ninja.BIN_DIR))
    except (ImportError, AttributeError):
        pass
    for d in dirs:
        if (d / "ninja").is_file():
            os.environ["PATH"] = f"{d}{os.pathsep}{os.environ.get('PATH', '')}"
            return


def _load(isa: str, namespace: str = _LIBRARY, defines: tuple[str, ...] = ()) -> object:
    """Builds (or finds the cached build of) the extension for ``isa`` and loads it.

    Returns ``torch.ops.<namespace>``. ``namespace`` and ``defines`` exist for test and tuning builds
    (e.g. the emulated AVX-512 path), which can then live in one process beside the real one.
    """
    ops = getattr(torch.ops, namespace)
    if hasattr(ops, "packed_linear"):
        return ops
    from torch.utils import cpp_extension

    _ensure_ninja_on_path()
    defines = (f"QWEN3_OPS_NAMESPACE={namespace}", *defines)
    # -fno-trapping-math: nothing here relies on floating-point exceptions, and without it gcc will not
    # vectorise the float -> int conversion in the SiLU's exp.
    cflags = [
        "-O3",
        "-fno-trapping-math",
        "-fopenmp",
        "-Wno-unused-function",
        *_ISA_FLAGS[isa][1],
        *(f"-D{d}" for d in defines),
    ]
    build_dir = _build_dir(isa, cflags)
    build_dir.mkdir(parents=True, exist_ok=True)
    import fcntl

    with open(build_dir / "qwen3.flock", "w") as lock:
        # torch serialises builds with a plain "lock" file that stays behind, and makes every later
        # process wait forever, when a builder is killed mid-build (Ctrl-C, a test timeout). An
        # flock is released by the OS when its holder dies; while we hold it no other qwen3 process
        # is building here, so a "lock" file found now is stale.
        fcntl.flock(lock, fcntl.LOCK_EX)
        (build_dir / "lock").unlink(missing_ok=True)
        # is_python_module=False: the library registers torch ops (torch.ops.<namespace>.*) when it
        # is loaded; no pybind11, which keeps the first build to ~12 s instead of ~40 s.
        cpp_extension.load(
            name=f"{namespace}_{build_dir.name}",
            sources=[str(source) for source in _SOURCES],
            extra_cflags=cflags,
            extra_ldflags=["-fopenmp"],
            build_directory=str(build_dir),
            is_python_module=False,
            verbose=False,
        )
    return ops


def _register_fakes() -> None:
    """Shape functions for the ops, so that torch.compile / export can trace through them."""

    def linear_fake(
        x: torch.Tensor, packed: torch.Tensor, n: int, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        return x.new_empty(x.shape[0], n)

    def gate_up_fake(x: torch.Tensor, packed: torch.Tensor, n: int) -> torch.Tensor:
        return x.new_empty(x.shape[0], n)

    try:
        torch.library.register_fake(f"{_LIBRARY}::packed_linear")(linear_fake)
        torch.library.register_fake(f"{_LIBRARY}::packed_gate_up_silu")(gate_up_fake)
        torch.library.register_fake(f"{_LIBRARY}::paged_attention")(lambda q, *_: torch.empty_like(q))
        torch.library.register_fake(f"{_LIBRARY}::rms_norm")(lambda x, *_: torch.empty_like(x))

        def qk_norm_rope_fake(qkv, q_weight, k_weight, cos, sin, hq, hkv, eps):
            d = q_weight.numel()
            return qkv.new_empty(qkv.shape[0], hq, d), qkv.new_empty(qkv.shape[0], hkv, d)

        torch.library.register_fake(f"{_LIBRARY}::qk_norm_rope")(qk_norm_rope_fake)
    except Exception as e:  # only torch.compile needs them
        logger.debug("could not register fake kernels: %s", e)


def _ops() -> object | None:
    """The loaded kernel op namespace, or None when the fallback must be used. Builds once per process."""
    if os.environ.get(DISABLE_ENV, "") not in ("", "0"):
        return None
    if "ops" in _state:
        return _state["ops"]
    with _lock:
        if "ops" in _state:
            return _state["ops"]
        ops = None
        isa = cpu_kernel_isa()
        if isa is None:
            logger.warning(
                "qwen3 CPU kernels unavailable: this CPU has neither AVX512-BF16 nor AVX2+FMA; "
                "using torch.nn.functional.linear"
            )
        else:
            try:
                ops = _load(isa)
                _register_fakes()
                _state["isa"] = str(ops.kernel_path())
                logger.debug("qwen3 CPU kernels loaded (%s)", _state["isa"])
            except Exception as e:  # any build or load failure means: use the fallback
                logger.debug("qwen3 CPU kernel build failed", exc_info=True)
                logger.warning(
                    "qwen3 CPU kernels unavailable (%s: %s); using torch.nn.functional.linear",
                    type(e).__name__,
                    str(e).strip().splitlines()[-1] if str(e).strip() else "",
                )
                ops = None
        _state["ops"] = ops
        return ops


def kernels_available() -> bool:
    """Whether the C++ kernels are built and in use (False under ``QWEN3_DISABLE_KERNELS=1``)."""
    return _ops() is not None


def kernel_isa() -> str | None:
    """The instruction-set path the loaded kernels use ("avx512bf16" or "avx2"), None when unavailable."""
    return None if _ops() is None else str(_state["isa"])


@dataclass(frozen=True, eq=False)
class PackedWeight:
    """A linear weight prepared for ``packed_linear`` / ``packed_gate_up_silu``.

    ``data`` is the packed tensor when the kernel is in use (see ``_blocks``: groups of blocks of 16 rows,
    gate and up blocks alternating for a gate/up pair); otherwise ``data`` is None and ``weight`` keeps the
    original ``[N, K]`` weight (``[2N, K]``, gate rows then up rows, for gate/up) for the ``F.linear``
    fallback.
    """

    out_features: int
    in_features: int
    data: torch.Tensor | None = None
    weight: torch.Tensor | None = None
    gate_up: bool = False

    @property
    def nbytes(self) -> int:
        t = self.data if self.data is not None else self.weight
        return 0 if t is None else t.numel() * t.element_size()


def kernel_group() -> int:
    """Blocks of 16 rows per packed group on the loaded kernel path (4 for AVX-512, 2 for AVX2)."""
    group = _state.get("group")
    if group is None:
        ops = _ops()
        group = _state["group"] = 1 if ops is None else int(ops.kernel_group())
    return group


_HUGE_PAGE = 2 << 20


def huge_page_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """``torch.empty`` for weights the kernels stream, in memory advised for transparent huge pages.

    Why: a decode step reads every weight once, front to back, and with 4 KiB pages each page is a TLB
    miss and a boundary the L2 prefetchers stop at; 2 MiB pages took the bf16 decode products of
    Qwen3-0.6B from 56.5 to 52.0 ms a token on a Granite Rapids-class Xeon (docs/benchmarks.md). Most Linux machines
    run THP in ``madvise`` mode, where only advised memory gets huge pages, so the buffer is an anonymous
    mapping aligned to 2 MiB and advised ``MADV_HUGEPAGE`` (it is freed with the tensor). Small tensors
    and systems without ``madvise`` get plain ``torch.empty``.
    """
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < _HUGE_PAGE or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.empty(shape, dtype=dtype)
    size = -(-nbytes // _HUGE_PAGE) * _HUGE_PAGE + _HUGE_PAGE
    buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # shared would be shmem
    offset = -ctypes.addressof(ctypes.c_char.from_buffer(buf)) % _HUGE_PAGE
    # Only whole huge pages inside the tensor: a huge page over its tail would make up to 2 MiB resident
    # that holds nothing.
    with contextlib.suppress(OSError):  # THP compiled out or off: the mapping works, with small pages
        buf.madvise(mmap.MADV_HUGEPAGE, offset, nbytes // _HUGE_PAGE * _HUGE_PAGE)
    return torch.frombuffer(buf, dtype=torch.uint8, count=nbytes, offset=offset).view(dtype).view(shape)


def _blocks(weight: torch.Tensor, group: int | None = None) -> torch.Tensor:
    """[N, K] -> zero-padded groups of ``group`` blocks of 16 rows, interleaved per k step: bf16
    ``[groups, K_pad/2, group, 16, 2]`` (per k pair, 16x2 weights per block) or fp32 ``[groups, K_pad, group,
    16]`` (per k, 16 weights per block). N is padded to a multiple of 16 x group, K to a multiple of 32."""
    group = group or kernel_group()
    n, k = weight.shape
    rows = ROW_BLOCK * group
    n_pad = -(-n // rows) * rows
    k_pad = -(-k // K_ALIGN) * K_ALIGN
    w = F.pad(weight.detach(), (0, k_pad - k, 0, n_pad - n))
    if w.dtype == torch.float32:
        blocks = w.view(n_pad // rows, group, ROW_BLOCK, k_pad).permute(0, 3, 1, 2)
    else:
        blocks = w.view(n_pad // rows, group, ROW_BLOCK, k_pad // 2, 2).permute(0, 3, 1, 2, 4)
    return huge_page_empty(tuple(blocks.shape), blocks.dtype).copy_(blocks)


def _gate_up_blocks(gate: torch.Tensor, up: torch.Tensor, group: int | None = None) -> torch.Tensor:
    """Gate and up ``[N, K]`` as one packed weight whose blocks of 16 rows alternate gate i, up i."""
    group = group or kernel_group()
    n, k = gate.shape
    pairs = -(-n // ROW_BLOCK)
    pairs = -(-pairs // (group // 2 or 1)) * (group // 2 or 1)  # whole groups of pairs
    pad = (0, 0, 0, pairs * ROW_BLOCK - n)
    g, u = F.pad(gate.detach(), pad), F.pad(up.detach(), pad)
    rows = torch.stack([g.view(pairs, ROW_BLOCK, k), u.view(pairs, ROW_BLOCK, k)], dim=1)
    return _blocks(rows.reshape(2 * pairs * ROW_BLOCK, k), group)


def _kernel_weight_ok(weight: torch.Tensor) -> bool:
    return weight.dtype in _KERNEL_DTYPES and weight.device.type == "cpu" and _ops() is not None


def pack_linear_weight(weight: torch.Tensor) -> PackedWeight:
    """Repacks a bf16 or fp32 ``[N, K]`` linear weight for ``packed_linear`` (do it once, at load).

    Other dtypes or devices, or no kernel: the weight is kept as it is and ``packed_linear`` uses
    ``F.linear``. The packed copy does not alias ``weight``.
    """
    if weight.dim() != 2:
        raise ValueError(f"expected a [N, K] weight, got shape {tuple(weight.shape)}")
    n, k = weight.shape
    if not _kernel_weight_ok(weight):
        return PackedWeight(out_features=n, in_features=k, weight=weight)
    return PackedWeight(out_features=n, in_features=k, data=_blocks(weight))


def pack_gate_up_weight(gate: torch.Tensor, up: torch.Tensor) -> PackedWeight:
    """Packs a SwiGLU MLP's gate and up weights (both ``[N, K]``) for ``packed_gate_up_silu``.

    Blocks of 16 rows alternate gate, up, gate, up... (grouped like any packed weight), so one thread
    computes matching rows of both projections and applies ``silu(g) * u`` at once.
    """
    if gate.shape != up.shape or gate.dim() != 2:
        raise ValueError(
            f"gate and up must be [N, K] of one shape, got {tuple(gate.shape)}, {tuple(up.shape)}"
        )
    n, k = gate.shape
    if not (_kernel_weight_ok(gate) and up.dtype == gate.dtype and up.device == gate.device):
        return PackedWeight(out_features=n, in_features=k, weight=torch.cat([gate, up]), gate_up=True)
    return PackedWeight(out_features=n, in_features=k, data=_gate_up_blocks(gate, up), gate_up=True)


def _as_rows(x: torch.Tensor, k: int) -> torch.Tensor:
    """x [..., K] -> [M, K] in a dtype the kernel takes (bf16 or float32)."""
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} features, the weight expects {k}")
    rows = x.reshape(-1, k)
    return rows if rows.dtype in _KERNEL_DTYPES else rows.float()


def _torch_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear in x's dtype (the kernel's contract), casting the weight and bias where they differ."""
    if weight.dtype != x.dtype:
        weight = weight.to(x.dtype)
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    return F.linear(x, weight, bias)


def packed_linear(x: torch.Tensor, packed: PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T + bias`` for x of shape ``[..., K]`` (meant for a few rows: decode), W packed.

    bf16 and float32 x go to the kernel as they are (with bf16 weights on the AVX512-BF16 path float32 x
    is rounded to bf16, as ``vdpbf16ps`` takes bf16 pairs; accumulation is float32 on every path), other
    dtypes through float32; the result has x's dtype. Any strides are accepted. Not differentiable.
    Whether the kernel runs was decided by ``pack_linear_weight``: a packed weight always uses it.
    """
    data = packed.data
    if data is None:
        if packed.gate_up:
            raise ValueError("this PackedWeight is a gate/up pair; use packed_gate_up_silu")
        return _torch_linear(x, packed.weight, bias)
    if packed.gate_up:
        raise ValueError("this PackedWeight is a gate/up pair; use packed_gate_up_silu")
    y = torch.ops.qwen3_kernels.packed_linear.default(
        _as_rows(x, packed.in_features), data, packed.out_features, bias
    )
    return _like(y, x, packed.out_features)


def packed_gate_up_silu(x: torch.Tensor, packed: PackedWeight) -> torch.Tensor:
    """``silu(x @ Wg.T) * (x @ Wu.T)`` for a ``pack_gate_up_weight`` pair, in one pass over the weights."""
    if not packed.gate_up:
        raise ValueError("packed_gate_up_silu needs a PackedWeight from pack_gate_up_weight")
    data = packed.data
    if data is None:
        gate, up = _torch_linear(x, packed.weight, None).chunk(2, dim=-1)
        return F.silu(gate) * up
    y = torch.ops.qwen3_kernels.packed_gate_up_silu.default(
        _as_rows(x, packed.in_features), data, packed.out_features
    )
    return _like(y, x, packed.out_features)


def gate_up_silu(
    x: torch.Tensor, packed: PackedWeight | QuantWeight | tuple[QuantWeight, QuantWeight]
) -> torch.Tensor:
    """``silu(x @ Wg.T) * (x @ Wu.T)`` on whichever kernel holds the pair: bf16 packed, quantized and
    fused, or quantized in two formats (``(gate, up)``)."""
    if isinstance(packed, QuantWeight):
        return quant_gate_up_silu(x, packed)
    if isinstance(packed, tuple):
        gate, up = packed
        return F.silu(quant_linear(x, gate)) * quant_linear(x, up)
    return packed_gate_up_silu(x, packed)


def _like(y: torch.Tensor, x: torch.Tensor, n: int) -> torch.Tensor:
    """The kernel's [M, N] result with x's leading dimensions and dtype (a view, no copy, for bf16 x)."""
    return (y if y.dtype == x.dtype else y.to(x.dtype)).view(*x.shape[:-1], n)


@dataclass(frozen=True, eq=False)
class QuantWeight:
    """A linear weight (or a stack of MoE experts' weights) held quantized, for ``csrc/quant.cpp``.

    ``parts`` are the kernel's arrays (see quant.cpp): codes uint8 ``[E, G, K * bits]`` for ``G`` groups of
    8 output rows, fp16 scales ``d`` (and mins ``m``) int16 ``[E, G, K / super, 8]``, int8 sub-block
    factors ``sc`` (and ``mc``) ``[E, G, K / block, 8]`` or None. ``fmt`` is ``(bits, block, super)``.
    ``gate_up``: groups alternate a gate and an up projection's 8 rows (``out_features`` rows each), for
    the fused SiLU. ``source`` names the format the blocks came from (a GGUF type).
    """

    out_features: int
    in_features: int
    fmt: tuple[int, int, int]
    parts: tuple[torch.Tensor | None, ...]
    gate_up: bool = False
    source: str = ""

    def __post_init__(self) -> None:
        # the op's list arguments, made once: building them per call costs more than a small product
        object.__setattr__(self, "_args", (list(self.parts), list(self.fmt), self.out_features))

    @property
    def experts(self) -> int:
        return int(self.parts[0].shape[0])

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.parts if t is not None)

    def expert(self, index: int) -> QuantWeight:
        """Expert ``index`` of a stack, as a weight of its own (views, no copy)."""
        parts = tuple(None if t is None else t[index : index + 1] for t in self.parts)
        return QuantWeight(self.out_features, self.in_features, self.fmt, parts, self.gate_up, self.source)

    def rows(self, start: int, stop: int) -> QuantWeight:
        """Output rows ``start:stop`` (multiples of 8) of an unfused weight (views, no copy)."""
        if start % 8 or (stop % 8 and stop != self.out_features) or self.gate_up:
            raise ValueError("rows of a quantized weight are taken in groups of 8")
        groups = slice(start // 8, -(-stop // 8))
        parts = tuple(None if t is None else t[:, groups] for t in self.parts)
        return QuantWeight(stop - start, self.in_features, self.fmt, parts, False, self.source)


def concat_quant_rows(weights: list[QuantWeight]) -> QuantWeight:
    """One weight whose output rows are those of ``weights`` in turn (one format, each a multiple of 8 rows)."""
    first = weights[0]
    if any(w.fmt != first.fmt or w.in_features != first.in_features or w.gate_up for w in weights) or any(
        w.out_features % 8 for w in weights[:-1]
    ):
        raise ValueError("quantized weights concatenate only in one format, in groups of 8 rows")
    parts = tuple(
        None if first.parts[i] is None else torch.cat([w.parts[i] for w in weights], dim=1)
        for i in range(len(first.parts))
    )
    out = sum(w.out_features for w in weights)
    return QuantWeight(
        out, first.in_features, first.fmt, parts, False, "+".join(sorted({w.source for w in weights}))
    )


def interleave_gate_up(gate: QuantWeight, up: QuantWeight) -> QuantWeight:
    """Gate and up weights (one format and shape) as one whose groups alternate gate, up: ``quant_gate_up_silu``."""
    if gate.fmt != up.fmt or gate.out_features != up.out_features or gate.in_features != up.in_features:
        raise ValueError("gate and up must have one format and shape to be fused")
    parts = tuple(
        None if g is None else torch.stack([g, u], dim=2).flatten(1, 2)
        for g, u in zip(gate.parts, up.parts, strict=True)
    )
    return QuantWeight(gate.out_features, gate.in_features, gate.fmt, parts, True, gate.source)


def quant_linear(x: torch.Tensor, weight: QuantWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T + bias`` for x ``[..., K]`` (bf16 or float32; result in x's dtype), W quantized. Kernels loaded."""
    if weight.gate_up:
        raise ValueError("this QuantWeight is a gate/up pair; use quant_gate_up_silu")
    parts, fmt, n = weight._args
    y = torch.ops.qwen3_kernels.quant_linear.default(
        _as_rows(x, weight.in_features), parts, fmt, n, bias, False
    )
    return _like(y, x, n)


def quant_gate_up_silu(x: torch.Tensor, weight: QuantWeight) -> torch.Tensor:
    """``silu(x @ Wg.T) * (x @ Wu.T)`` for an ``interleave_gate_up`` weight, in one pass over it."""
    if not weight.gate_up:
        raise ValueError("quant_gate_up_silu needs a QuantWeight from interleave_gate_up")
    parts, fmt, n = weight._args
    y = torch.ops.qwen3_kernels.quant_linear.default(
        _as_rows(x, weight.in_features), parts, fmt, n, None, True
    )
    return _like(y, x, n)


def quant_moe(
    x: torch.Tensor, gate_up: QuantWeight, down: QuantWeight, expert_ids: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """A MoE layer's experts, read in place: ``sum_j weights[:, j] * expert_{ids[:, j]}(x)`` for x ``[T, H]``.

    ``gate_up`` is the stacked experts' ``interleave_gate_up`` weight, ``down`` their down projections.
    """
    (gu_parts, gu_fmt, _), (down_parts, down_fmt, _) = gate_up._args, down._args
    y = torch.ops.qwen3_kernels.quant_moe.default(
        _as_rows(x, gate_up.in_features), gu_parts, gu_fmt, down_parts, down_fmt, expert_ids.long(), weights
    )
    return _like(y, x, down.out_features)


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slots: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_starts: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Writes a step's new keys/values to a paged KV cache and attends (``csrc/attention.cpp``); bf16 or fp32.

    q ``[N, Hq, D]``, k and v ``[N, Hkv, D]`` (the N new tokens); caches ``[num_blocks, Hkv, block_size,
    D]``, token n going to slot ``slots[n]`` (int64: row ``slot % block_size`` of block ``slot //
    block_size``). Sequence s owns rows ``query_starts[s]:query_starts[s + 1]``, the last of its
    ``seq_lens[s]`` cached tokens, and attends causally through ``block_tables[s]`` (all three int32).
    Returns ``[N, Hq, D]``. Only with the kernels loaded (``kernels_available()``).
    """
    return torch.ops.qwen3_kernels.paged_attention.default(
        q, k, v, key_cache, value_cache, slots, block_tables, seq_lens, query_starts, scale
    )


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``layers.RMSNorm`` in one pass for bf16 or fp32 x and weight (``csrc/norm_rope.cpp``); kernels loaded."""
    return torch.ops.qwen3_kernels.rms_norm.default(x, weight, eps)


def qk_norm_rope(
    qkv: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head RMSNorm then RoPE of the q and k parts of a fused qkv ``[T, (Hq + 2 Hkv) * D]``.

    cos/sin are ``[T, D]`` in qkv's dtype (bf16 or fp32). Returns q ``[T, Hq, D]`` and k ``[T, Hkv, D]``;
    kernels loaded.
    """
    return torch.ops.qwen3_kernels.qk_norm_rope.default(
        qkv, q_weight, k_weight, cos, sin, num_heads, num_kv_heads, eps
    )


def read_bandwidth_probe(buf: torch.Tensor) -> float:
    """Streams a contiguous bf16 buffer once on torch's threads with the kernels' loads (a checksum back).

    The memory-read roofline for benchmarks: what batch-1 decode, which reads every weight once, can
    approach. Kernels loaded.
    """
    return torch.ops.qwen3_kernels.read_bandwidth_probe.default(buf)


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    packed: PackedWeight | QuantWeight | tuple[QuantWeight, ...] | None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, through the packed kernel when there is one (any number of rows).

    A quantized weight (or a tuple of them, blocks of output rows in different formats) runs on the
    quantized kernel; its ``weight`` is then only a placeholder.

    Autograd (training) always takes ``F.linear``: the kernel is not differentiable.
    """
    if isinstance(packed, QuantWeight):
        if x.requires_grad:
            raise RuntimeError("quantized weights are for inference; load the model in bfloat16 to train")
        return quant_linear(x, packed, bias)
    if isinstance(packed, tuple):  # row blocks of one layer held in different quantized formats
        if x.requires_grad:
            raise RuntimeError("quantized weights are for inference; load the model in bfloat16 to train")
        y = torch.cat([quant_linear(x, part) for part in packed], dim=-1)
        return y if bias is None else y + bias.to(y.dtype)
    data = None if packed is None else packed.data
    if data is None or x.requires_grad:
        return _torch_linear(x, weight, bias)
    k = x.shape[-1]
    if x.dtype == torch.bfloat16 and k == packed.in_features:  # the hot path, as little Python as can be
        n = packed.out_features
        rows = x.numel() // max(1, k)
        return torch.ops.qwen3_kernels.packed_linear.default(x.reshape(rows, k), data, n, bias).view(
            *x.shape[:-1], n
        )
    return packed_linear(x, packed, bias)
