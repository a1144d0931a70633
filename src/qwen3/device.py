"""Host-to-device copies that do not stall the host: the engine's small per-step index tensors."""

from __future__ import annotations

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
