"""Host -> device copies that do not make the host wait: `upload`.

A pageable host tensor is copied to a GPU synchronously (the host blocks until the copy is
done); from pinned (page-locked) memory the copy is queued on the stream with
`non_blocking=True`, so the host goes on preparing the next batch. The caching host allocator
keeps the pinned block alive until the queued copy has used it. On CPU nothing changes.
"""

from __future__ import annotations

import torch


def upload(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """`tensor` on `device`; a host tensor bound for CUDA goes through pinned memory, non-blocking."""
    device = torch.device(device)
    if tensor.device.type == "cpu" and device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)
