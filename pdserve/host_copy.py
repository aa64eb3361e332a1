"""Host values to the device without the host waiting for the device.

A blocking host->device copy (``torch.tensor(values, device="cuda")``, ``.to("cuda")``,
indexing a CUDA tensor with a Python list) synchronizes the stream: issued while a
forward pass is queued, it makes the host wait for all of it, so the host can no longer
prepare or launch anything beside the GPU. to_device copies through pinned memory,
asynchronously.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def to_device(data: Sequence | Tensor, dtype: torch.dtype, device: torch.device) -> Tensor:
    """`data` (a list, nested lists, or a CPU tensor) as a `dtype` tensor on `device`."""
    t = data.to(dtype) if isinstance(data, Tensor) else torch.tensor(data, dtype=dtype)
    if t.device == device:
        return t
    if t.device.type != "cpu":    # device -> host: must be complete on return
        return t.to(device)
    # Through pinned memory: the driver may stage a pageable source by synchronizing with
    # the stream. torch's caching host allocator reuses the pinned block only once the
    # copy out of it has completed.
    return t.pin_memory().to(device, non_blocking=True)


def row_index(rows: Sequence[int], n: int, device: torch.device) -> Tensor | None:
    """Ascending distinct row numbers out of n as an int64 index on `device` (moved as
    to_device does), or None when they are all n rows: take them all, index nothing."""
    return None if len(rows) == n else to_device(list(rows), torch.int64, device)
