"""Device facts and transfers: the host memory this process may still use, and host-to-device copies that
do not stall the host (the engine's small per-step index tensors)."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from functools import lru_cache
from pathlib import Path

import torch


def to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``t`` (a CPU tensor) on ``device``: itself on CPU, else through pinned memory with a non-blocking copy.

    A plain ``torch.tensor(values, device="cuda")`` copies from pageable memory, which waits for the
    device; the engine builds a handful of such tensors per step, so each would be a host sync.
    """
    device = torch.device(device)
    if device.type == "cpu":
        return t
    return t.pin_memory().to(device, non_blocking=True)


def index_tensor(values: list[int], device: torch.device | str) -> torch.Tensor:
    """An int64 index tensor on ``device`` from host ints, without a host sync."""
    return to_device(torch.tensor(values, dtype=torch.long), device)


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def available_cpu_memory() -> int:
    """Bytes of RAM this process can still use: MemAvailable, capped by a cgroup (v2 or v1) limit."""
    candidates = []
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    candidates.append(int(line.split()[1]) * 1024)
                    break
    except OSError:
        pass
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        limit, usage = _read_int(Path(limit_file)), _read_int(Path(usage_file))
        if limit is not None and usage is not None and limit < 1 << 60:
            candidates.append(max(limit - usage, 0))
    if not candidates:  # not Linux: what sysconf says
        candidates.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    return min(candidates)


@lru_cache(maxsize=1)
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


def release_memory() -> None:
    """Give freed heap memory back to the OS (glibc's ``malloc_trim``; a no-op where there is none).

    Tokenizing a megabytes-long prompt briefly takes hundreds of MB; glibc keeps the freed pages in the
    worker thread's arena, so without this a server's RSS stays high after every large request.
    """
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def check_weights_fit(parameters: int, dtype: torch.dtype, device: torch.device | str, source: Path) -> None:
    """Refuse, before anything is allocated, weights that cannot fit the RAM this process has left
    (CPU only; a GPU's own allocator says so clearly enough). ``source`` names the file that describes them."""
    from qwen3.hub import CheckpointError

    if torch.device(device).type != "cpu":
        return
    need, free = parameters * dtype.itemsize, available_cpu_memory()
    if need > free:
        raise CheckpointError(
            f"{source}: the model it describes needs {need / 2**30:.1f} GiB in "
            f"{str(dtype).removeprefix('torch.')}, but only {free / 2**30:.1f} GiB of RAM is available"
        )
